"""`spo-ray bench`: both engines on identical work, one table (issue 7), FLOPs per kept pair by role (issue 9).

    spo-ray bench --size bench --samplers 1 2 4 --rounds 3 --out bench-out

Every engine run gets the same config (prompts, seeds, model, pool size, steps, rounds); the Ray
runs differ only in the number of sampler actors (one scorer, one trainer worker, lag 1, one torch
thread per actor unless ``ray.<role>.torch_threads`` overrides say otherwise). The Ray runs share one local cluster that this command starts itself
(``ray.init(address="local")``, its own temp dir, no dashboard; logical CPUs are not the physical
cores: 1, 2 and 4 samplers are logical resources on whatever the machine has).

Sizes: ``tiny`` (tests), ``bench`` (SD1.5-shaped, UNet widths 128/256 at 32x32 latents: the UNet
dominates a CPU run), and ``sd15`` / ``sdxl``: the published UNet/VAE/PickScore configs with random
weights on the meta device, for FLOP counting (nothing is downloaded; the engines run only at the
tiny and bench sizes).

Throughput is measured in steady state: kept pairs of rounds 2..N over the time from the end of
round 1 to the end of round N (start-up, model loading and Ray Train's start are excluded and
reported separately as end-to-end rates).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from spo_ray.bench.flops import (
    ASSUMED_KEPT_FRACTION,
    PUBLISHED_SAMPLING,
    RUNNABLE,
    SIZES,
    flops_report,
    guided_forwards_per_prompt,
    shapes_for,
    training_flops_measured,
    unet_flops,
)
from spo_ray.bench.report import evaluate_targets, render_markdown
from spo_ray.bench.roles import measured_peak_flops, role_throughput
from spo_ray.bench.runs import BenchOptions, bench_config, machine, run_in_process_bench, run_ray_bench

__all__ = ["BenchOptions", "flops_report", "guided_forwards_per_prompt", "run_bench", "shapes_for", "unet_flops"]


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Run the suite; write ``bench.json`` and ``bench.md`` under ``opts.out``; return the result."""
    if opts.size not in SIZES:
        raise ValueError(f"unknown size {opts.size!r}; expected one of {SIZES}")
    started = time.time()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"options": asdict(opts), "machine": machine(), "runs": []}
    if opts.size in RUNNABLE:
        if "in-process" in opts.engines:
            result["runs"].append(run_in_process_bench(opts))
        if "ray" in opts.engines:
            for n in opts.samplers:
                result["runs"].append(run_ray_bench(opts, n))
        result["targets"] = evaluate_targets(result["runs"])
    if opts.flops:
        runs = result["runs"]
        kept_fraction = (statistics.mean(r["kept"] / max(r["scoring_events"], 1) for r in runs)
                         if runs else ASSUMED_KEPT_FRACTION)
        sampling = dict(num_steps=opts.steps, divert_start_step=4, pool_size=4, num_inner_steps=0)
        if opts.size not in RUNNABLE:
            sampling = dict(num_steps=20, divert_start_step=4, **PUBLISHED_SAMPLING[opts.size])
        flops = flops_report(opts.size, kept_fraction=kept_fraction, **sampling)
        if torch.cuda.is_available():
            flops["roles_measured"] = role_throughput(opts.size, torch.device("cuda"), torch.bfloat16, flops=flops)
        elif opts.size in RUNNABLE:  # the published sizes are too slow for a CPU
            flops["roles_measured"] = role_throughput(opts.size, torch.device("cpu"), torch.float32, batch=2,
                                                      seconds=0.5 if opts.size == "tiny" else 2.0, flops=flops)
        if opts.size in RUNNABLE:
            flops["measured_training"] = training_flops_measured(bench_config(opts, "flops", 1))
            base = next((r for r in runs if r["engine"] == "in-process"), None)
            if base is not None:  # the engines run on the CPU (run.device=cpu): one CPU peak for both lines
                cpu_roles = flops.get("roles_measured", {})
                peak = (cpu_roles["peak_flops_per_s"] if cpu_roles.get("device") == "cpu"
                        else measured_peak_flops(torch.device("cpu"), torch.float32, n=1024))
                rate = flops["after"]["total_per_kept_pair"] * base["kept_pairs_per_s"]
                flops["achieved"] = {"flops_per_s": rate, "peak_flops_per_s": peak, "mfu": rate / peak}
        result["flops"] = flops
    result["seconds"] = time.time() - started
    result["markdown"] = render_markdown(result)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "bench.md").write_text(result["markdown"])
    return result
