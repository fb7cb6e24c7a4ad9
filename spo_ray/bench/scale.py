"""`spo-ray bench --scale`: the Ray engine's per-unit costs at 1, 2, 4 and 8 trainer ranks (gloo) and
samplers, as logical resources on one machine, with the tiny model; then the cluster cases
extrapolated from them.

Each run: the tiny SD1.5 preset with SDXL's segments of 4 transitions (``num_inner_steps=3``: the
case where a pair's transitions scatter over the ranks), 8 prompts per round, 16 transition pairs
per micro-batch, lag 1, ZeRO-2, a checkpoint every round, tracking off. Measured per run, from the
roles' telemetry:

- bytes received and transition rows held per trainer rank per round (``routing.route_round``):
  they must fall as ranks grow (O(round / ranks));
- bytes through any single coordination actor per policy version (the PolicyStore handles
  references only; the weights go from rank 0's object store to each sampler);
- a sampler's policy fetch (transfer and load) and the time from a version's registration to a
  sampler holding it (which includes the sampler finishing the task it was on);
- rank 0's serial time per round (publish, report and checkpoint stages: what every other rank
  waits for at the next collective), as wall clock and as the main thread's CPU time; the CPU
  time is the stages' own work, free of waits and of the other processes' share of the cores;
- checkpoint time (rank 0's wall clock, the largest CPU time of any rank) and peak host memory
  per trainer rank.

The extrapolation (``extrapolate``) evaluates the routing plan (``routing.transition_shares``, a
pure function) at each cluster case's round and world size and multiplies by the case's sizes;
its formulas are printed with it.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spo_ray.bench.runs import BenchOptions, start_local_ray

SCALES = ((1, 1), (2, 2), (4, 4), (8, 8))  # (trainer ranks, samplers)
# Rank 0's stages outside training that every other rank waits for at the next collective.
SERIAL_STAGES = ("publish", "report", "checkpoint")


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
        "sampling.prompts_per_round=8", "sampling.num_inner_steps=3", "train.train_batch_size=16",
        "data.max_prompts=16", "train.epochs=2",
        f"ray.num_trainers={trainers}", f"ray.num_samplers={samplers}", "ray.num_scorers=1", "ray.max_policy_lag=1",
        "ray.zero_stage=2", "tracking.enabled=false", "ray.torch_threads_per_actor=1", "run.device=cpu",
    ])


def measure_scale(summary: dict[str, Any], rounds: int, trainers: int, samplers: int) -> dict[str, Any]:
    """One run's per-unit figures from its summary (telemetry snapshots and the store's stats)."""
    snapshots = summary["telemetry"]["snapshots"]
    stage_keys = [f"{stage}_{kind}" for stage in (*SERIAL_STAGES, "route") for kind in ("seconds", "cpu_seconds")]
    per_rank = {
        actor: {k: snap.get("counters", {}).get(k, 0.0) for k in ("bytes_in", "transitions_held", "rounds", *stage_keys)}
        | {"peak_rss_mib": snap.get("peak_rss_bytes", 0) / 2**20}
        for actor, snap in snapshots.get("trainer", {}).items()
    }
    rank0 = per_rank.get("rank0", {})
    done = max(rank0.get("rounds", 0.0), 1.0)
    sampler_counters = [s.get("counters", {}) for s in snapshots.get("sampler", {}).values()]
    fetches = max(sum(c.get("policy_fetches", 0) for c in sampler_counters), 1)
    gate = summary["gate"]

    def largest(key: str) -> float:
        return max((r[key] / done for r in per_rank.values()), default=0.0)

    # What rank 0 does that the other ranks do not (its CPU time in the serial stages over the
    # median of the others'): the stages' collectives and shard writes are every rank's work.
    others = [r for actor, r in per_rank.items() if actor != "rank0"]
    rank0_extra = (sum(rank0.get(f"{stage}_cpu_seconds", 0.0) - statistics.median(o[f"{stage}_cpu_seconds"] for o in others)
                       for stage in SERIAL_STAGES) / done) if others else None

    return {
        "trainers": trainers, "samplers": samplers, "rounds": rounds,
        "transitions_per_round": summary["accounting"]["transitions_trained"] / max(rounds, 1),
        "bytes_received_per_rank_per_round": {a: r["bytes_in"] / done for a, r in sorted(per_rank.items())},
        "bytes_received_per_rank_per_round_max": largest("bytes_in"),
        "transitions_held_per_rank_per_round_max": largest("transitions_held"),
        "store_bytes_per_version": gate.get("bytes_in", 0) / max(gate.get("published", 0), 1),
        "policy_bytes_per_fetch": sum(c.get("policy_bytes_in", 0) for c in sampler_counters) / fetches,
        "policy_fetch_s": sum(c.get("policy_fetch_seconds", 0.0) for c in sampler_counters) / fetches,
        "publish_to_usable_s": sum(c.get("publish_to_usable_s", 0.0) for c in sampler_counters) / fetches,
        "rank0_serial_s_per_round": sum(rank0.get(f"{stage}_seconds", 0.0) for stage in SERIAL_STAGES) / done,
        "rank0_serial_cpu_s_per_round": sum(rank0.get(f"{stage}_cpu_seconds", 0.0) for stage in SERIAL_STAGES) / done,
        "rank0_extra_cpu_s_per_round": rank0_extra,
        "checkpoint_s": rank0.get("checkpoint_seconds", 0.0) / done,
        "checkpoint_cpu_s_max": largest("checkpoint_cpu_seconds"),
        "route_cpu_s_max": largest("route_cpu_seconds"),
        "peak_rss_mib_per_rank_max": max((r["peak_rss_mib"] for r in per_rank.values()), default=0.0),
        "wall_s": summary.get("seconds"),
    }


@dataclass(frozen=True)
class ClusterCase:
    """One of the cluster issue's cases, at the paper's round (see docs/ray-engine.md)."""

    name: str
    params: float  # trainable parameters
    publish_bytes: float  # one policy version: LoRA in fp32, full fine-tuning in bf16 (the samplers' dtype)
    latent_bytes: int  # one latent in fp32 (the precision the log-prob takes)
    cond_bytes: int  # the text conditioning of one prompt, bf16
    prompts_per_round: int
    pairs_per_round: int  # prompts x branching segments x a kept fraction of ~0.5
    segment: int  # transitions per pair
    batch_size: int  # the paper's global micro-batch, in transition rows
    ranks: int  # the trainer ranks that micro-batch can use

    @property
    def pair_bytes(self) -> int:  # x_t + winner's and loser's segment + the conditioning
        return (1 + 2 * self.segment) * self.latent_bytes + self.cond_bytes

    @property
    def stream_bytes(self) -> int:  # a round's prompt rows: the pairs' latents, the conditioning once per prompt
        return self.pairs_per_round * (self.pair_bytes - self.cond_bytes) + self.prompts_per_round * self.cond_bytes

    def transition_bytes(self, shared: bool) -> int:  # win in/out, lose in/out, packed (without the conditioning)
        return (3 if shared else 4) * self.latent_bytes


SD15_LATENT, SDXL_LATENT = 4 * 64 * 64 * 4, 4 * 128 * 128 * 4
SD15_COND, SDXL_COND = 77 * 768 * 2, (77 * 2048 + 1280 + 6) * 2
CASES = (
    ClusterCase("A: SD1.5 LoRA r4, 8 GPUs", 0.8e6, 0.8e6 * 4, SD15_LATENT, SD15_COND, 40, 40 * 16 // 2, 1, 40, 4),
    ClusterCase("B: SDXL LoRA r64, 32 GPUs", 93e6, 93e6 * 4, SDXL_LATENT, SDXL_COND, 8, 8 * 4 // 2, 4, 8, 8),
    ClusterCase("C: SDXL full FT, 64 GPUs", 2.6e9, 2.6e9 * 2, SDXL_LATENT, SDXL_COND, 8, 8 * 4 // 2, 4, 8, 8),
)
FORMULAS = [
    "transition rows per rank = the largest share routing.transition_shares gives a rank over 10 rounds of the case's "
    "size (a pure function of ids: the plan the trainers run)",
    "bytes received per rank per round <= those rows x 4 latents (3 for a segment's first transition, whose two "
    "inputs are the same x_t) + the conditioning once per prompt among them (a prompt's pairs are contiguous in the "
    "canonical order: pairs per prompt = pairs per round / prompts per round)",
    "scorer -> trainer per round = pairs x (1 + 2 x segment) latents + prompts x conditioning (prompt rows); "
    "(was) the conditioning in every pair",
    "(whole pairs routed) = the most pairs any rank needs a transition of x pair bytes (1 + 2 x segment latents + conditioning)",
    "(gathered) = every rank receives the whole round: pairs per round x pair bytes",
    "bytes through the PolicyStore per version = measured (references only, independent of the model)",
    "publish-to-usable = D2H copy (publish bytes / 25 GB/s) + one fetch per sampler node (publish bytes / 12.5 GB/s)",
    "checkpoint bytes per rank = 12 B x parameters / ranks (fp32 master + two Adam moments, each rank its share)",
]


def case_shares(case: ClusterCase, rounds: int = 10) -> tuple[int, int, int]:
    """(transition rows, bytes of them as routed, pairs touched) of the busiest rank over
    ``rounds`` rounds of ``case``: the plan the trainers run (routing.transition_shares)."""
    import torch

    from spo_ray.ray.routing import transition_shares

    total = case.pairs_per_round * case.segment
    pair_of, first = torch.arange(total) // case.segment, torch.arange(total) % case.segment == 0
    prompt_of = pair_of // (case.pairs_per_round // case.prompts_per_round)
    busiest = (0, 0, 0)
    for r in range(rounds):
        for share in transition_shares(total, world=case.ranks, batch_size=case.batch_size, seed=0, epoch=0, round_index=r):
            shared = int(first[share].sum())
            nbytes = (shared * case.transition_bytes(True) + (share.numel() - shared) * case.transition_bytes(False)
                      + len(set(prompt_of[share].tolist())) * case.cond_bytes)
            busiest = max(busiest, (share.numel(), nbytes, len(set(pair_of[share].tolist()))), key=lambda b: b[1])
    return busiest


def extrapolate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cases' costs: the routing plan at each case's size, the measured store bytes."""
    store = max(r["store_bytes_per_version"] for r in rows)
    out = []
    for case in CASES:
        transitions, nbytes, pairs = case_shares(case)
        out.append({
            "case": case.name, "transitions_per_round": case.pairs_per_round * case.segment,
            "transitions_per_rank": transitions,
            "bytes_received_per_rank_per_round": nbytes,
            "whole_pairs_instead": pairs * case.pair_bytes,
            "gathered_instead": case.pairs_per_round * case.pair_bytes,
            "stream_bytes_per_round": case.stream_bytes,  # (was: the conditioning in every pair, i.e. gathered_instead)
            "store_bytes_per_version": store,
            "publish_to_usable_s": case.publish_bytes / 25e9 + case.publish_bytes / 12.5e9,
            "checkpoint_bytes_per_rank": 12 * case.params / case.ranks,
        })
    return out


def render_scale(rows: list[dict[str, Any]], cases: list[dict[str, Any]]) -> str:
    def mib(x: float) -> str:
        return f"{x / 2**20:.3f}"

    lines = [
        "## Scale simulation (tiny model, logical resources on one machine)", "",
        "Bytes and memory, per round:", "",
        "| trainer ranks / samplers | transitions per round | MiB received per rank (max) | transitions held per rank (max) "
        "| bytes through the store per version | policy MiB per fetch | peak RSS MiB per rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trainers']} / {r['samplers']} | {r['transitions_per_round']:.1f} | {mib(r['bytes_received_per_rank_per_round_max'])} "
            f"| {r['transitions_held_per_rank_per_round_max']:.1f} | {r['store_bytes_per_version']:.0f} "
            f"| {mib(r['policy_bytes_per_fetch'])} | {r['peak_rss_mib_per_rank_max']:.0f} |")
    lines += [
        "", "Seconds, per round (wall clock, and the main thread's CPU time: the work without waits or core sharing):", "",
        "| trainer ranks / samplers | rank 0 serial s | rank 0 serial CPU s | rank 0 CPU s beyond the other ranks' "
        "| checkpoint s (rank 0) | checkpoint CPU s (max rank) | routing CPU s (max rank) | policy fetch s "
        "| publish to a sampler holding it s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        extra = "-" if r["rank0_extra_cpu_s_per_round"] is None else f"{r['rank0_extra_cpu_s_per_round']:.3f}"
        lines.append(
            f"| {r['trainers']} / {r['samplers']} | {r['rank0_serial_s_per_round']:.3f} | {r['rank0_serial_cpu_s_per_round']:.3f} "
            f"| {extra} "
            f"| {r['checkpoint_s']:.3f} | {r['checkpoint_cpu_s_max']:.3f} | {r['route_cpu_s_max']:.3f} "
            f"| {r['policy_fetch_s']:.3f} | {r['publish_to_usable_s']:.3f} |")
    lines += ["", "## Extrapolated to the cluster cases", "",
              "| case | transitions per round | transitions per rank (max) | received per rank per round "
              "| (whole pairs routed) | (gathered) | scorer -> trainer per round (was) "
              "| bytes through the store per version | publish-to-usable "
              "| checkpoint per rank |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        lines.append(
            f"| {c['case']} | {c['transitions_per_round']} | {c['transitions_per_rank']} "
            f"| {c['bytes_received_per_rank_per_round'] / 1e6:.1f} MB | {c['whole_pairs_instead'] / 1e6:.1f} MB "
            f"| {c['gathered_instead'] / 1e6:.1f} MB "
            f"| {c['stream_bytes_per_round'] / 1e6:.1f} MB ({c['gathered_instead'] / 1e6:.1f} MB) "
            f"| {c['store_bytes_per_version']:.0f} B | {c['publish_to_usable_s']:.3f} s "
            f"| {c['checkpoint_bytes_per_rank'] / 1e9:.3f} GB |")
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
