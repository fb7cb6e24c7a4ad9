"""Both engines on identical work: the configs, the runs and each run's row of measurements."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TARGET_RATIO = 0.9  # distributed >= 0.9x in-process kept pairs/s
TARGET_HOP = 1.5  # each hop's bytes <= 1.5x its tensor minimum
DEMO_PROMPTS = 16  # the runs use the demo prompt file's 16 prompts
# Pairs kept per scoring event assumed for the published sizes (not run here); the runnable sizes
# use the kept fraction their own runs measured.
BRIGHTNESS_SCALE = {"bench": 20000.0}

# Published configs (stable-diffusion-v1-5, stable-diffusion-xl-base-1.0, PickScore_v1 = CLIP ViT-H/14).


@dataclass
class BenchOptions:
    size: str = "bench"
    samplers: list[int] = field(default_factory=lambda: [1, 2, 4])
    engines: list[str] = field(default_factory=lambda: ["in-process", "ray"])
    rounds: int = 3  # round 1 is start-up; rounds 2..N are the steady window
    prompts_per_round: int = 4
    steps: int = 10
    out: str = "bench-out"
    ray_cpus: int = 8  # logical CPUs of the local cluster (roles are 1 logical CPU each)
    flops: bool = True
    overrides: list[str] = field(default_factory=list)


def bench_config(opts: BenchOptions, engine: str, samplers: int):
    """The one config every engine run shares (only the run name and the sampler count differ)."""
    from spo_ray.config import load_config
    from spo_ray.tiny import ensure_tiny_pipeline

    prompts = opts.rounds * opts.prompts_per_round
    # The brightness rule's gaps shrink with image size (a mean over 256x256 pixels): this scale
    # keeps ~60% of scoring events at the bench size, as the preset's 5000 does at the tiny size.
    scale = [f"scorer.kwargs={{scale: {BRIGHTNESS_SCALE[opts.size]}}}"] if opts.size in BRIGHTNESS_SCALE else []
    overrides = [*scale,
        f"model.pretrained={ensure_tiny_pipeline('sd15', opts.size)}", "model.dtype=fp32",
        f"sampling.num_steps={opts.steps}", f"sampling.prompts_per_round={opts.prompts_per_round}",
        f"train.epochs={max(1, math.ceil(prompts / DEMO_PROMPTS))}", f"data.max_prompts={DEMO_PROMPTS}",
        f"run.max_rounds={opts.rounds}", "run.checkpoint_every_rounds=0", "run.progress=false", "run.device=cpu",
        "tracking.enabled=false", f"run.output_dir={Path(opts.out).resolve() / 'runs'}",
        f"run.name=bench-{engine}-{samplers}",
        f"ray.num_samplers={samplers}", "ray.num_scorers=1", "ray.num_trainers=1", "ray.max_policy_lag=1",
        "ray.torch_threads_per_actor=1",  # roles do not oversubscribe the cores
        *opts.overrides,
    ]
    return load_config("tiny-sd15", overrides=overrides)


def _records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if r["kind"] == kind]


def round_sizes(cfg) -> dict[int, int]:
    """Prompts per round of a bench run's prompt plan (an epoch's last round may be short)."""
    from spo_ray.components import prompt_plan

    return {r.index: len(r.prompt_ids) for r in prompt_plan(cfg, DEMO_PROMPTS).rounds()}


def measure_run(engine: str, summary: dict[str, Any], run_dir: Path, wall: float, samplers: int,
                prompts_per_round: dict[int, int]) -> dict[str, Any]:
    """One engine run's row. Every rate and fraction is over the steady window, from the end of
    round 1 to the end of round N (start-up excluded), the same definition for both engines.

    Prompts/s is the engines' comparable rate: every prompt costs the same sampling and scoring
    work, while how many of its pairs are kept depends on the policy that sampled it, which at lag 1
    is not the in-process engine's (so kept pairs per round differ between the engines)."""
    from spo_ray import telemetry

    rounds = sorted(_records(run_dir, "round"), key=lambda r: r["round"])
    if len(rounds) < 2:
        raise ValueError(f"{run_dir}: the benchmark needs at least 2 rounds to measure a steady state")
    steady = rounds[1:]
    window = (rounds[0]["time"], rounds[-1]["time"])
    span = max(window[1] - window[0], 1e-9)
    pairs = sum(len(r.get("pair_ids", [])) for r in steady)
    steady_ids = {r["round"] for r in steady}
    steps = sum(1 for r in _records(run_dir, "step") if r.get("round") in steady_ids)
    tel = telemetry.summarize(summary.get("telemetry", {}).get("snapshots", {}), window)["roles"]
    sampler, scorer, trainer = (tel.get(r, {}) for r in ("sampler", "scorer", "trainer"))
    if engine == "ray":  # rank 0's round records: round r trains between the ends of rounds r-1 and r
        waits = sum(r.get("wait_seconds", 0.0) for r in steady)
        trainer_busy = span - waits
    else:
        waits, trainer_busy = 0.0, trainer.get("busy_seconds", 0.0)
    n_samplers, n_scorers = max(sampler.get("actors", 1), 1), max(scorer.get("actors", 1), 1)
    busy = {
        "sampler": sampler.get("busy_seconds", 0.0) / span / n_samplers,
        "scorer": scorer.get("busy_seconds", 0.0) / span / n_scorers,
        "trainer": trainer_busy / span,
    }
    sc, so = sampler.get("counters", {}), scorer.get("counters", {})
    st, sot = sampler.get("totals", {}), scorer.get("totals", {})
    acc = summary["accounting"]
    lags = summary.get("lags") or [0] * len(rounds)
    row: dict[str, Any] = {
        "engine": engine, "samplers": samplers if engine == "ray" else None, "rounds": len(rounds),
        "kept_pairs_per_s": pairs / span, "steady_window_s": span, "steady_pairs": pairs,
        "prompts_per_s": sum(prompts_per_round[r["round"]] for r in steady) / span,
        "kept_pairs_per_s_end_to_end": acc["trained"] / max(wall, 1e-9), "wall_s": wall,
        "kept": acc["kept"], "scoring_events": acc["scoring_events"], "optimizer_steps": acc["optimizer_steps"],
        "unet_forwards_per_s_per_sampler": sc.get("unet_forwards", 0) / span / n_samplers,
        "images_scored_per_s_per_scorer": so.get("images_scored", 0) / span / n_scorers,
        "optimizer_steps_per_s": steps / span,
        "busy_fraction": busy,
        "wall_split": {"sampling": busy["sampler"], "scoring": busy["scorer"], "training": busy["trainer"],
                       "waiting": waits / span},
        "peak_rss_mib": {r: tel.get(r, {}).get("peak_rss_bytes", 0) / 2**20 for r in ("sampler", "scorer", "trainer")},
        "policy_lag": {str(k): v for k, v in sorted(Counter(int(x) for x in lags).items())},  # JSON keys
        "unet_forwards": st.get("unet_forwards", 0), "prompts": acc["prompts"],
        # Whole run, the engine's own processes (in process: one process for all roles; on Ray the
        # role actors, not Ray's own daemons): robust to other tenants, unlike wall-clock rates.
        "cpu_seconds": (sampler.get("cpu_seconds", 0.0) if engine == "in-process"
                        else sum(tel.get(r, {}).get("cpu_seconds", 0.0) for r in ("sampler", "scorer", "trainer"))),
    }
    row["cpu_seconds_per_kept_pair"] = row["cpu_seconds"] / max(acc["kept"], 1)
    if engine == "ray":
        row["hops"] = {
            "sampler_to_scorer": {
                "bytes": st.get("bytes_out", 0), "min_bytes": st.get("min_bytes_out", 0),
                "per_scoring_event": st.get("bytes_out", 0) / max(acc["scoring_events"], 1),
                "min_per_scoring_event": st.get("min_bytes_out", 0) / max(acc["scoring_events"], 1),
                "ratio": st.get("bytes_out", 0) / max(st.get("min_bytes_out", 1), 1),
            },
            "scorer_to_trainer": {
                "bytes": sot.get("bytes_out", 0), "min_bytes": sot.get("min_bytes_out", 0),
                "per_kept_pair": sot.get("bytes_out", 0) / max(acc["kept"], 1),
                "min_per_kept_pair": sot.get("min_bytes_out", 0) / max(acc["kept"], 1),
                "ratio": sot.get("bytes_out", 0) / max(sot.get("min_bytes_out", 1), 1),
            },
        }
        row["bottleneck"] = max(busy, key=busy.get)  # the busiest role (per actor) bounds the stream
    return row


def run_in_process_bench(opts: BenchOptions) -> dict[str, Any]:
    from spo_ray.local_engine import run_in_process

    cfg = bench_config(opts, "in-process", 1)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a fresh run: no appended metrics, no resume
    started, load = time.time(), os.getloadavg()[0]
    summary = run_in_process(cfg)
    row = measure_run("in-process", summary, cfg.run_dir, time.time() - started, 1, round_sizes(cfg))
    return {**row, "load_average": [load, os.getloadavg()[0]]}


def start_local_ray(opts: BenchOptions) -> None:
    """A local cluster of this process' own (own temp dir, random ports, no dashboard)."""
    import ray

    if ray.is_initialized():
        return
    env = {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # ray.train.report blocks ~1.5 s per call otherwise
        "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "torch_extensions"),
        "OMP_NUM_THREADS": "1",
    }
    os.environ.update({k: v for k, v in env.items() if k != "OMP_NUM_THREADS"})
    ray.init(
        address="local", num_cpus=opts.ray_cpus, include_dashboard=False, log_to_driver=False,
        _temp_dir=f"/tmp/ray-spo-bench-{os.getpid()}", runtime_env={"env_vars": env},
    )


def run_ray_bench(opts: BenchOptions, samplers: int) -> dict[str, Any]:
    from spo_ray.config import role_threads
    from spo_ray.ray.driver import run_on_ray

    cfg = bench_config(opts, "ray", samplers)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a fresh run: no appended metrics, no resume
    start_local_ray(opts)
    started, load = time.time(), os.getloadavg()[0]
    summary = run_on_ray(cfg)
    row = measure_run("ray", summary, cfg.run_dir, time.time() - started, samplers, round_sizes(cfg))
    threads = {role: role_threads(cfg.ray, role) for role in ("sampler", "scorer", "trainer")}
    return {**row, "torch_threads": threads, "load_average": [load, os.getloadavg()[0]]}


# ----------------------------------------------------------------------------- the report


def machine() -> dict[str, Any]:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_cores": os.cpu_count(), "memory_gib": round(mem, 1), "gpu": gpu, "platform": platform.platform(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
