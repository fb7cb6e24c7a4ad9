"""`spo-ray bench --scale`: the Ray engine's per-unit costs at 1, 2, 4 and 8 trainer ranks (gloo) and
samplers, as logical resources on one machine, with the tiny model; then the cluster cases
extrapolated from them.

Each run: the tiny SD1.5 preset, 8 prompts per round, 16 transition pairs per micro-batch, lag 1,
ZeRO-2, a checkpoint every round, tracking off. Measured per run, from the roles' telemetry:

- bytes received per trainer rank per round (routed pairs, ``routing.route_round``): they must
  fall as ranks grow (O(round / ranks));
- bytes through any single coordination actor per policy version (the PolicyStore handles
  references only; the weights go from rank 0's object store to each sampler);
- publish-to-usable time (rank 0's publish to a sampler holding the version);
- rank 0's serial time per round (the snapshot for publishing, the round's records, and the
  checkpoint write) and checkpoint write time;
- peak host memory per trainer rank.

The extrapolation (``extrapolate``) multiplies per-unit costs by the model's sizes at the three
cases of the cluster issue; its formulas are printed with it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spo_ray.bench.runs import BenchOptions, start_local_ray

SCALES = ((1, 1), (2, 2), (4, 4), (8, 8))  # (trainer ranks, samplers)


@dataclass
class ScaleOptions:
    scales: list[tuple[int, int]] = field(default_factory=lambda: list(SCALES))
    rounds: int = 3
    out: str = "bench-out"


def scale_config(trainers: int, samplers: int, opts: ScaleOptions):
    from spo_ray.config import load_config

    return load_config("tiny-sd15", overrides=[
        f"run.output_dir={Path(opts.out).resolve() / 'scale'}", f"run.name=scale-t{trainers}-s{samplers}",
        f"run.max_rounds={opts.rounds}", "run.checkpoint_every_rounds=1", "run.keep_checkpoints=1", "run.progress=false",
        "sampling.prompts_per_round=8", "train.train_batch_size=16", "data.max_prompts=16", "train.epochs=2",
        f"ray.num_trainers={trainers}", f"ray.num_samplers={samplers}", "ray.num_scorers=1", "ray.max_policy_lag=1",
        "ray.zero_stage=2", "tracking.enabled=false", "ray.torch_threads_per_actor=1", "run.device=cpu",
    ])


def measure_scale(summary: dict[str, Any], rounds: int, trainers: int, samplers: int) -> dict[str, Any]:
    """One run's per-unit figures from its summary (telemetry snapshots and the store's stats)."""
    snapshots = summary["telemetry"]["snapshots"]
    ranks = snapshots.get("trainer", {})
    per_rank = {
        actor: {k: snap.get("counters", {}).get(k, 0.0) for k in (
            "bytes_in", "pairs_held", "publish_seconds", "report_seconds", "checkpoint_seconds", "rounds")}
        | {"peak_rss_mib": snap.get("peak_rss_bytes", 0) / 2**20}
        for actor, snap in ranks.items()
    }
    rank0 = per_rank.get("rank0", {})
    done = max(rank0.get("rounds", 0.0), 1.0)
    sampler_counters = [s.get("counters", {}) for s in snapshots.get("sampler", {}).values()]
    fetches = sum(c.get("policy_fetches", 0) for c in sampler_counters)
    gate = summary["gate"]
    return {
        "trainers": trainers, "samplers": samplers, "rounds": rounds,
        "pairs_per_round": summary["accounting"]["trained"] / max(rounds, 1),
        "bytes_received_per_rank_per_round": {a: r["bytes_in"] / done for a, r in sorted(per_rank.items())},
        "bytes_received_per_rank_per_round_max": max((r["bytes_in"] / done for r in per_rank.values()), default=0.0),
        "pairs_held_per_rank_per_round_max": max((r["pairs_held"] / done for r in per_rank.values()), default=0.0),
        "store_bytes_per_version": gate.get("bytes_in", 0) / max(gate.get("published", 0), 1),
        "policy_bytes_per_fetch": sum(c.get("policy_bytes_in", 0) for c in sampler_counters) / max(fetches, 1),
        "publish_to_usable_s": sum(c.get("publish_to_usable_s", 0.0) for c in sampler_counters) / max(fetches, 1),
        "rank0_serial_s_per_round": (rank0.get("publish_seconds", 0.0) + rank0.get("report_seconds", 0.0)
                                     + rank0.get("checkpoint_seconds", 0.0)) / done,
        "checkpoint_s": rank0.get("checkpoint_seconds", 0.0) / done,
        "peak_rss_mib_per_rank_max": max((r["peak_rss_mib"] for r in per_rank.values()), default=0.0),
        "wall_s": summary.get("seconds"),
    }


# The cluster issue's three cases: SD1.5 LoRA r4 on 8 GPUs, SDXL LoRA r64 on 32 (4 nodes), SDXL full
# fine-tuning (ZeRO-3) on 64 (8 nodes). Per case: trainable parameters, bytes published per version
# (LoRA as fp32, full fine-tuning as bf16), bytes of one kept pair in the stream (x_t and the winner's
# and loser's latents in fp32 + the text conditioning in bf16), kept pairs per round (the paper's round:
# prompts x branching segments x a kept fraction of ~0.5), and the trainer ranks the paper's global
# micro-batch can use (SD1.5: 40 rows, SDXL: 8 rows; more ranks would idle, see docs/ray-engine.md).
SDXL_PAIR = 9 * 4 * 128 * 128 * 4 + (77 * 2048 + 1280 + 6) * 2  # 1 + 2 x 4 latents, conditioning
CASES = {
    "A: SD1.5 LoRA r4, 8 GPUs": dict(params=0.8e6, publish_bytes=0.8e6 * 4, pair_bytes=3 * 4 * 64 * 64 * 4 + 77 * 768 * 2,
                                      pairs_per_round=40 * 16 * 0.5, ranks=4),
    "B: SDXL LoRA r64, 32 GPUs": dict(params=93e6, publish_bytes=93e6 * 4, pair_bytes=SDXL_PAIR,
                                       pairs_per_round=8 * 4 * 0.5, ranks=8),
    "C: SDXL full FT, 64 GPUs": dict(params=2.6e9, publish_bytes=2.6e9 * 2, pair_bytes=SDXL_PAIR,
                                      pairs_per_round=8 * 4 * 0.5, ranks=8),
}
FORMULAS = [
    "bytes received per rank per round = pairs per round x pair bytes x (measured fraction of the round a rank holds)",
    "bytes through the PolicyStore per version = measured (references only, independent of the model)",
    "publish-to-usable = D2H copy (publish bytes / 25 GB/s) + one fetch per sampler node (publish bytes / 12.5 GB/s)",
    "checkpoint bytes per rank = 12 B x parameters / ranks (fp32 master + two Adam moments, each rank its share)",
]


def extrapolate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cases' costs from the measured per-unit figures (the largest measured world's held fraction)."""
    largest = max(rows, key=lambda r: r["trainers"])
    held_fraction = largest["pairs_held_per_rank_per_round_max"] / max(largest["pairs_per_round"], 1e-9)
    store = max(r["store_bytes_per_version"] for r in rows)
    out = []
    for name, c in CASES.items():
        share = min(1.0, max(held_fraction * largest["trainers"] / c["ranks"], 1.0 / c["ranks"]))
        out.append({
            "case": name,
            "bytes_received_per_rank_per_round": c["pairs_per_round"] * c["pair_bytes"] * share,
            "gathered_instead": c["pairs_per_round"] * c["pair_bytes"],
            "store_bytes_per_version": store,
            "publish_to_usable_s": c["publish_bytes"] / 25e9 + c["publish_bytes"] / 12.5e9,
            "checkpoint_bytes_per_rank": 12 * c["params"] / c["ranks"],
        })
    return out


def render_scale(rows: list[dict[str, Any]], cases: list[dict[str, Any]]) -> str:
    def mib(x: float) -> str:
        return f"{x / 2**20:.3f}"

    lines = [
        "## Scale simulation (tiny model, logical resources on one machine)", "",
        "| trainer ranks / samplers | pairs per round | MiB received per rank per round (max) | pairs held per rank (max) "
        "| bytes through the store per version | policy MiB per fetch | publish-to-usable s | rank 0 serial s per round "
        "| checkpoint s | peak RSS MiB per rank |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trainers']} / {r['samplers']} | {r['pairs_per_round']:.1f} | {mib(r['bytes_received_per_rank_per_round_max'])} "
            f"| {r['pairs_held_per_rank_per_round_max']:.1f} | {r['store_bytes_per_version']:.0f} | {mib(r['policy_bytes_per_fetch'])} "
            f"| {r['publish_to_usable_s']:.3f} | {r['rank0_serial_s_per_round']:.3f} | {r['checkpoint_s']:.3f} "
            f"| {r['peak_rss_mib_per_rank_max']:.0f} |")
    lines += ["", "## Extrapolated to the cluster cases", "",
              "| case | received per rank per round | (gathered: every rank the whole round) | bytes through the store per version "
              "| publish-to-usable | checkpoint per rank |", "|---|---|---|---|---|---|"]
    for c in cases:
        lines.append(
            f"| {c['case']} | {c['bytes_received_per_rank_per_round'] / 1e6:.1f} MB | {c['gathered_instead'] / 1e6:.1f} MB "
            f"| {c['store_bytes_per_version']:.0f} B | {c['publish_to_usable_s']:.3f} s | {c['checkpoint_bytes_per_rank'] / 1e9:.3f} GB |")
    lines += ["", "Formulas:"] + [f"- {f}" for f in FORMULAS]
    return "\n".join(lines) + "\n"


def run_scale(opts: ScaleOptions) -> dict[str, Any]:
    from spo_ray.ray.driver import run_on_ray

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    cpus = max(t + s for t, s in opts.scales) + 4  # every role one logical CPU, plus a scorer and room
    start_local_ray(BenchOptions(ray_cpus=cpus))
    rows = []
    for trainers, samplers in opts.scales:
        cfg = scale_config(trainers, samplers, opts)
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        started = time.time()
        summary = run_on_ray(cfg)
        summary["seconds"] = time.time() - started
        rows.append(measure_scale(summary, opts.rounds, trainers, samplers))
    cases = extrapolate(rows)
    result = {"rows": rows, "cases": cases, "markdown": render_scale(rows, cases)}
    (out / "scale.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "scale.md").write_text(result["markdown"])
    return result
