"""The Ray engine: SPO at cluster scale (DESIGN.md section 2).

    plan rows (one per sampling task: a slice of a round's prompts)
      -> map_batches(SamplerWorker, actor pool)  trajectory records (candidate pools)
      -> map_batches(ScorerWorker, actor pool)   kept win/lose pairs
      -> streaming_split(n) -> TorchTrainer workers (DeepSpeed ZeRO): SPO loss, optimizer
    trainer rank 0 -> PolicyStore actor (versioned weights) <- samplers pull before each task

Exactness rules: a round is one sampling batch of prompts under one policy version; a sampler
may not start round q before version q - max_policy_lag is published (the store's gate), so the
lag is bounded by construction; the trainer trains round r only once the RoundLedger says every
prompt of round r has been scored and all of its kept pairs have arrived at the trainer ranks
(the ledger is the round's end marker: no rank waits for rows that never come). Every rank then
sees the whole round (gathered, ordered by pair id) and takes its slice of the same shuffled
micro-batches, so one trainer rank reproduces the in-process engine exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch

from spo_ray import records, telemetry
from spo_ray.accounting import Accounting
from spo_ray.checkpointing import latest_checkpoint, load_trainable_weights, trainable_state
from spo_ray.components import (
    all_reduce_sum,
    apply_fast_path,
    build_pool_scorer,
    connect_ray,
    load_model,
    prompt_plan,
    resolve_device,
    set_role_threads,
)
from spo_ray.config import SPOConfig, config_from_dict
from spo_ray.export import export_policy
from spo_ray.preflight import preflight
from spo_ray.sampling import CandidatePoolSampler
from spo_ray.tracking import (
    RunTracker,
    png_bytes,
    render_pair_strip,
    render_validation_grid,
    validation_set,
)
from spo_ray.training import (
    NonFiniteError,
    add_lora,
    microbatch_loss,
    plan_microbatches,
    round_transitions,
    take_rows,
    trainable_parameters,
    warmup_lambda,
)

log = logging.getLogger("spo_ray")


# ----------------------------------------------------------------------------- coordination actors


@ray.remote(num_cpus=0)
class PolicyStore:
    """Owns the published policy weights (objects a trainer worker puts would die with it).

    Keeps at most ``keep`` versions; ``wait_newest`` is the staleness gate samplers pass before
    each task; ``rollback`` restores the checkpoint's version on restart.
    """

    def __init__(self, keep: int):
        self.keep = keep
        self.versions: dict[int, dict[str, np.ndarray]] = {}
        self.changed = asyncio.Condition()
        self.blocked_waits = 0
        self.wait_seconds = 0.0

    async def publish(self, version: int, weights: dict[str, np.ndarray]) -> None:
        async with self.changed:
            self.versions[version] = weights
            for old in sorted(self.versions)[: -self.keep]:
                del self.versions[old]
            self.changed.notify_all()

    async def reset(self) -> None:
        """Forget every version (a restarted stream): samplers wait until the trainer publishes the
        checkpoint's version, instead of sampling with weights the crash threw away."""
        async with self.changed:
            self.versions = {}

    async def rollback(self, version: int, weights: dict[str, np.ndarray]) -> None:
        async with self.changed:
            self.versions = {version: weights}
            self.changed.notify_all()

    def newest(self) -> int:
        return max(self.versions, default=-1)

    async def wait_newest(self, min_version: int, have: int) -> tuple[int, dict[str, np.ndarray] | None]:
        """Block until a version >= min_version exists; return the newest (weights None if ``have``)."""
        started = time.monotonic()
        async with self.changed:
            if self.newest() < min_version:
                self.blocked_waits += 1
                await self.changed.wait_for(lambda: self.newest() >= min_version)
            self.wait_seconds += time.monotonic() - started
            version = self.newest()
            return version, (None if version == have else self.versions[version])

    def stats(self) -> dict[str, float]:
        return {"newest": self.newest(), "blocked_waits": self.blocked_waits, "wait_seconds": self.wait_seconds}


@ray.remote(num_cpus=0)
class RoundLedger:
    """Counts every scored prompt once, keyed by (round, prompt id): redone work is not counted
    twice, and a round is complete exactly when each of its prompts has been scored."""

    def __init__(self, round_sizes: dict[int, int], baseline: dict[str, int] | None = None):
        self.round_sizes = round_sizes
        self.baseline = baseline or {}  # counts of the rounds before a resumed run's checkpoint
        self.scored: dict[int, dict[int, ScoredPrompt]] = {}
        self.duplicates = 0
        self.strips: dict[int, tuple[int, bytes]] = {}  # round -> (smallest prompt id, PNG)
        # Each (re)built stream is a generation; after a trainer restart the rounds from the
        # checkpoint's position are redone, and what was scored for them before is set apart.
        self.generation = 0
        self.redone = {"prompts": 0, "scoring_events": 0, "kept": 0, "rejected": 0}
        self.stale_reports = 0
        self.changed = asyncio.Condition()  # notified on every report: the trainer long-polls

    def begin_stream(self, position: int) -> int:
        """A new stream from prompt-plan ``position`` (round index): returns its generation."""
        self.generation += 1
        for round_index in [r for r in self.scored if r >= position]:
            for row in self.scored.pop(round_index).values():
                for key, value in (("prompts", 1), ("scoring_events", row.events), ("kept", row.kept),
                                   ("rejected", row.rejected)):
                    self.redone[key] += value
            self.strips.pop(round_index, None)
        return self.generation

    async def report(self, round_index: int, rows: list[ScoredPrompt], generation: int = 0) -> None:
        if generation != self.generation:  # a dead stream's scorer finishing late: not counted
            self.stale_reports += len(rows)
            return
        seen = self.scored.setdefault(round_index, {})
        for row in rows:
            if row.prompt_id in seen:
                self.duplicates += 1
                continue
            seen[row.prompt_id] = row
        async with self.changed:
            self.changed.notify_all()

    async def wait_status(self, round_index: int, timeout_s: float) -> tuple[bool, int, int, int]:
        """``status`` once the round is complete or after ``timeout_s``, whichever comes first (a
        long poll: the trainer does not call every few milliseconds while a round is sampled)."""
        async with self.changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait_for(lambda: self.status(round_index)[0]), timeout_s)
        return self.status(round_index)

    def status(self, round_index: int) -> tuple[bool, int, int, int]:
        """(complete, events, kept, rejected) of a round."""
        seen = self.scored.get(round_index, {}).values()
        events, kept, rejected = (sum(r.events for r in seen), sum(r.kept for r in seen), sum(r.rejected for r in seen))
        return len(seen) == self.round_sizes[round_index], events, kept, rejected

    def round_summary(self, round_index: int) -> dict[str, float]:
        """Mean candidate score and kept fraction per timestep bucket of one round."""
        seen = list(self.scored.get(round_index, {}).values())
        out = {"mean_score": sum(r.score_sum for r in seen) / max(sum(r.images for r in seen), 1)}
        for bucket, (events, kept) in _bucket_totals(seen).items():
            out[f"kept_fraction/{bucket}"] = kept / max(events, 1)
        return out

    def offer_strip(self, round_index: int, first_prompt_id: int, png: bytes) -> None:
        """A scorer's win/lose strip; the one with the round's smallest prompt id is kept (whoever
        scored it, and however often it was redone), so the logged strip is deterministic."""
        held = self.strips.get(round_index)
        if held is None or first_prompt_id < held[0]:
            self.strips[round_index] = (first_prompt_id, png)

    def take_strip(self, round_index: int) -> bytes | None:
        held = self.strips.pop(round_index, None)
        return None if held is None else held[1]

    def totals(self) -> dict[str, Any]:
        rows = [r for seen in self.scored.values() for r in seen.values()]
        base = self.baseline
        return {
            "prompts": base.get("prompts", 0) + len(rows),
            "scoring_events": base.get("scoring_events", 0) + sum(r.events for r in rows),
            "kept": base.get("kept", 0) + sum(r.kept for r in rows),
            "rejected": base.get("rejected", 0) + sum(r.rejected for r in rows),
            "duplicate_reports": self.duplicates,
            "redone_after_restart": dict(self.redone),
            "stale_reports": self.stale_reports,
            "by_bucket": {b: list(v) for b, v in _bucket_totals(rows).items()},
        }


@dataclass(frozen=True)
class ScoredPrompt:
    """What a scorer reports to the ledger for one prompt of a round."""

    prompt_id: int
    events: int
    kept: int
    rejected: int
    buckets: dict[str, tuple[int, int]]  # timestep bucket -> (events, kept)
    score_sum: float
    images: int


def _bucket_totals(rows: list[ScoredPrompt]) -> dict[str, tuple[int, int]]:
    totals: dict[str, tuple[int, int]] = {}
    for row in rows:
        for bucket, (events, kept) in row.buckets.items():
            had = totals.get(bucket, (0, 0))
            totals[bucket] = (had[0] + events, had[1] + kept)
    return totals


def actor_names(cfg: SPOConfig) -> dict[str, str]:
    return {
        "store": f"spo-policy-store-{cfg.run.name}", "ledger": f"spo-round-ledger-{cfg.run.name}",
        "renderer": f"spo-renderer-{cfg.run.name}",
    }


# ----------------------------------------------------------------------------- roles


class SamplerWorker:
    """Ray Data actor: policy UNet + text encoders; one plan row (a slice of a round) -> records."""

    def __init__(self, cfg_dict: dict[str, Any]):
        self.cfg = config_from_dict(cfg_dict)
        set_role_threads(self.cfg.ray, "sampler")
        device = resolve_device(self.cfg)
        self.model = load_model(self.cfg, device, ("unet", "text"))
        if self.cfg.train.lora:
            add_lora(self.model.unet, self.cfg.train)
        self.model.unet.eval()
        apply_fast_path(self.model, self.cfg, device, inference_only=True)
        self.sampler = CandidatePoolSampler(self.model, self.cfg.sampling, self.cfg.train.seed)
        self.store = ray.get_actor(actor_names(self.cfg)["store"])
        self.version = -1
        self.meter, self.telemetry = telemetry.RoleMeter("sampler"), telemetry.connect(self.cfg.run.name)

    def _sync_policy(self, round_index: int) -> None:
        min_version = max(round_index - self.cfg.ray.max_policy_lag, 0)
        version, weights = ray.get(self.store.wait_newest.remote(min_version, self.version))
        if weights is not None:
            tensors = {k: torch.from_numpy(v) for k, v in weights.items()}
            if self.cfg.train.lora:
                load_trainable_weights(self.model.unet, tensors, source=f"policy version {version}")
            else:
                self.model.unet.load_state_dict(tensors)
        self.version = version

    def __call__(self, batch: dict[str, np.ndarray]):
        for i in range(len(batch["round"])):
            round_index = int(batch["round"][i])
            self._sync_policy(round_index)
            wall_started, forwards = time.time(), self.sampler.unet_forwards
            prompt_ids = [int(p) for p in batch["prompt_ids"][i]]
            prompts = [str(p) for p in batch["prompts"][i]]
            rec = self.sampler.sample(
                prompts, prompt_ids, epoch=int(batch["epoch"][i]), round_index=round_index, policy_version=self.version
            )
            out = records.to_numpy(rec)
            self.meter.record(  # sampler -> scorer hop: the yielded block against its tensor minimum
                wall_started, time.time(), unet_forwards=self.sampler.unet_forwards - forwards, prompts=len(prompts),
                bytes_out=telemetry.payload_bytes(out),
                min_bytes_out=telemetry.trajectory_min_bytes(out, self.model.dtype.itemsize),
            )
            telemetry.report(self.telemetry, self.meter)
            yield out


class ScorerWorker:
    """Ray Data actor: VAE decoder + preference model; trajectory records -> kept pairs."""

    def __init__(self, cfg_dict: dict[str, Any], generation: int = 0, strip_prompt_ids: dict[int, int] | None = None):
        self.cfg = config_from_dict(cfg_dict)
        self.generation = generation
        self.strip_prompt_ids = strip_prompt_ids or {}  # round -> the prompt whose slice renders the strip
        set_role_threads(self.cfg.ray, "scorer")
        device = resolve_device(self.cfg)
        self.model = load_model(self.cfg, device, ("vae",))
        apply_fast_path(self.model, self.cfg, device, inference_only=True)
        self.pool_scorer = build_pool_scorer(self.cfg, self.model, device)
        self.ledger = ray.get_actor(actor_names(self.cfg)["ledger"])
        self.meter, self.telemetry = telemetry.RoleMeter("scorer"), telemetry.connect(self.cfg.run.name)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wall_started = time.time()
        rec = records.to_torch(batch)
        pairs, stats = self.pool_scorer(rec)
        if hasattr(self.pool_scorer.scorer, "reset_text_cache"):
            self.pool_scorer.scorer.reset_text_cache()
        self._offer_pair_strip(rec, pairs)  # before the report: the round is complete only after it
        # Report per prompt (idempotent in the ledger) so a redone batch is not counted twice.
        events_per_row = rec["x0_hat"].shape[1]
        images_per_row = events_per_row * rec["x0_hat"].shape[2]
        by_round: dict[int, list[ScoredPrompt]] = {}
        for b, (round_index, prompt_id) in enumerate(zip(rec["round"].tolist(), rec["prompt_id"].tolist(), strict=True)):
            kept = stats.kept_per_row[b]
            by_round.setdefault(round_index, []).append(ScoredPrompt(
                prompt_id, events_per_row, kept, events_per_row - kept, stats.buckets_per_row[b],
                stats.score_sum_per_row[b], images_per_row,
            ))
        ray.get([self.ledger.report.remote(r, rows, self.generation) for r, rows in by_round.items()])
        out = records.to_numpy(pairs)  # timings and scores go to the telemetry sink and the ledger
        self.meter.record(  # scorer -> trainer hop: the returned block against its tensor minimum
            wall_started, time.time(), images_scored=stats.images, scoring_events=stats.events, kept=stats.kept,
            bytes_out=telemetry.payload_bytes(out), min_bytes_out=telemetry.pair_min_bytes(out, self.model.dtype.itemsize),
        )
        telemetry.report(self.telemetry, self.meter)
        return out

    def _offer_pair_strip(self, rec: dict[str, Any], pairs: dict[str, Any]) -> None:
        """Every tracking.log_pair_images_every rounds: the kept pairs' x0_hat as scored, decoded
        here (the scorer holds the VAE and the candidates; the trainer holds neither). Only the
        slice holding the round's smallest prompt id renders one (none if it kept no pair)."""
        every = self.cfg.tracking.log_pair_images_every
        if not (self.cfg.tracking.enabled and every > 0 and records.num_rows(pairs)):
            return
        round_index = int(rec["round"][0])
        if (round_index + 1) % every or self.strip_prompt_ids.get(round_index) not in rec["prompt_id"].tolist():
            return
        strip = render_pair_strip(self.model, rec, pairs)
        ray.get(self.ledger.offer_strip.remote(round_index, int(rec["prompt_id"].min()), png_bytes(strip)))


@ray.remote
class ValidationRenderer:
    """Renders the per-epoch validation grid (base row above current policy row, fixed prompts
    and seeds): it holds the policy UNet, the text encoders and a VAE, which the trainer does not
    (under ZeRO-3 the trainer does not even hold whole weights)."""

    def __init__(self, cfg_dict: dict[str, Any], prompts: list[str], seeds: list[int]):
        self.cfg = config_from_dict(cfg_dict)
        set_role_threads(self.cfg.ray, "renderer")
        device = resolve_device(self.cfg)
        self.model = load_model(self.cfg, device, ("unet", "vae", "text"))
        from spo_ray.training import setup_policy

        self.frozen_copy = setup_policy(self.model.unet, self.cfg.train)  # LoRA: the adapter, off for the base row
        apply_fast_path(self.model, self.cfg, device, inference_only=False)  # LoRA toggling would recompile
        self.prompts, self.seeds = prompts, seeds
        self.base_images = None

    def render(self, weights: dict[str, np.ndarray]) -> bytes:
        tensors = {k: torch.from_numpy(v) for k, v in weights.items()}
        if self.cfg.train.lora:
            load_trainable_weights(self.model.unet, tensors, source="the published policy")
        else:
            self.model.unet.load_state_dict(tensors)
        grid, self.base_images = render_validation_grid(
            self.model, self.frozen_copy, self.prompts, self.seeds, self.cfg.sampling, base_images=self.base_images
        )
        return png_bytes(grid)


# ----------------------------------------------------------------------------- the pair stream


def plan_rows(cfg: SPOConfig, num_prompts: int, prompts: list[str], position: int) -> list[dict[str, Any]]:
    """One row per sampling task: a slice of one round's prompts (rounds never mix in a task)."""
    plan = prompt_plan(cfg, num_prompts)
    last = plan.num_rounds if cfg.run.max_rounds is None else min(plan.num_rounds, cfg.run.max_rounds)
    rows = []
    for rnd in plan.rounds_from(position):
        if rnd.index >= last:
            break
        size = -(-len(rnd.prompt_ids) // cfg.ray.num_samplers)
        for lo in range(0, len(rnd.prompt_ids), size):
            ids = rnd.prompt_ids[lo : lo + size]
            rows.append({
                "round": rnd.index, "epoch": rnd.epoch, "prompt_ids": list(ids), "prompts": [prompts[i] for i in ids],
            })
    return rows


def _role_kwargs(cfg: SPOConfig, role: str) -> dict[str, Any]:
    return getattr(cfg.ray, role).ray_options()


def build_pair_stream(cfg: SPOConfig, prompts: list[str], position: int, generation: int = 0) -> ray.data.Dataset:
    """The stream from the prompt plan's ``position`` on (rebuilt at every trainer restart; its
    scorers report to the ledger under ``generation``)."""
    rows = plan_rows(cfg, len(prompts), prompts, position)
    cfg_dict = cfg.to_dict()
    strip_prompt_ids: dict[int, int] = {}  # round -> its smallest prompt id: that slice renders the strip
    for row in rows:
        smallest = min(row["prompt_ids"])
        strip_prompt_ids[row["round"]] = min(smallest, strip_prompt_ids.get(row["round"], smallest))
    ds = ray.data.from_items(rows, override_num_blocks=max(len(rows), 1))
    ds = ds.map_batches(
        SamplerWorker,
        fn_constructor_kwargs={"cfg_dict": cfg_dict},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_samplers),
        **_role_kwargs(cfg, "sampler"),
    )
    ds = ds.map_batches(
        ScorerWorker,
        fn_constructor_kwargs={"cfg_dict": cfg_dict, "generation": generation, "strip_prompt_ids": strip_prompt_ids},
        batch_size=None,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_scorers),
        **_role_kwargs(cfg, "scorer"),
    )
    # Rounds, checkpoints and the lag gate pause the stream on purpose.
    ds.context.execution_no_progress_timeout_s = -1
    return ds


class RoundSplit(ray.train.DataConfig):
    """streaming_split(n, equal=False): ``equal=True`` holds rows back to balance the ranks, which
    at max_policy_lag 0 withholds a round's last pairs until the next round, which waits for them.
    Ranks are balanced per round by the trainer instead (every rank sees the whole round)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i][name] = split
        return output


# ----------------------------------------------------------------------------- the trainer


def deepspeed_config(cfg: SPOConfig, device: torch.device) -> dict[str, Any]:
    t = cfg.train
    bf16 = device.type == "cuda" and t.mixed_precision != "fp32"
    zero: dict[str, Any] = {"stage": cfg.ray.zero_stage}
    if cfg.ray.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": t.train_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        # Under ZeRO-1/2 param.grad is freed after reduction: only DeepSpeed's own clipping clips.
        "gradient_clipping": t.max_grad_norm or 0.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class _ShardPump:
    """Pulls this rank's split in a background thread, so waiting for a round never blocks on the
    iterator (which at lag 0 would wait for rows of a round that cannot start yet)."""

    def __init__(self, shard):
        self.queue: queue.Queue = queue.Queue()
        self.by_round: dict[int, list[dict[str, Any]]] = {}
        self.error: BaseException | None = None
        threading.Thread(target=self._run, args=(shard,), daemon=True).start()

    def _run(self, shard) -> None:
        try:
            # prefetch_batches=0: with prefetching the iterator holds each block back until the next
            # one arrives, which at lag 0 is never (the next round waits for this one).
            for batch in shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                self.queue.put(batch)
        except BaseException as err:  # noqa: BLE001 - surfaced in the training loop
            self.queue.put(err)

    def drain(self) -> None:
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, BaseException):
                raise RuntimeError("the pair stream failed") from item
            batch = records.to_torch(item)
            for r in batch["round"].unique().tolist():
                rows = (batch["round"] == r).nonzero(as_tuple=True)[0]
                self.by_round.setdefault(int(r), []).append(take_rows(batch, rows))

    def count(self, round_index: int) -> int:
        return sum(records.num_rows(b) for b in self.by_round.get(round_index, []))

    def pop(self, round_index: int) -> list[dict[str, Any]]:
        return self.by_round.pop(round_index, [])


def _wait_for_round(pump: _ShardPump, ledger, round_index: int, rank: int, poll_s: float = 0.05,
                    long_poll_s: float = 1.0) -> tuple[int, int, int]:
    """Block until every prompt of the round is scored and all its kept pairs reached the ranks.
    Rank 0 long-polls the ledger until the round is scored; then the kept pairs, sent after the
    scorers reported, are counted locally every ``poll_s``."""
    import torch.distributed as dist

    last_note = time.monotonic()
    while True:
        pump.drain()
        status = torch.zeros(4, dtype=torch.float64)
        if rank == 0:
            complete, events, kept, rejected = ray.get(ledger.wait_status.remote(round_index, long_poll_s))
            status = torch.tensor([float(complete), events, kept, rejected], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(status, src=0)
        arrived = all_reduce_sum([pump.count(round_index)])[0]
        complete, events, kept, rejected = (int(v) for v in status.tolist())
        if complete and arrived == kept:
            return events, kept, rejected
        if complete and arrived > kept:
            raise RuntimeError(f"round {round_index}: {arrived} pairs arrived but the ledger kept {kept}")
        if rank == 0 and time.monotonic() - last_note > 30:
            last_note = time.monotonic()
            print(
                f"[spo-ray] waiting for round {round_index}: all prompts scored={bool(complete)}, "
                f"pairs arrived {int(arrived)} of {kept} kept so far",
                flush=True,
            )
        time.sleep(poll_s)


def _gather_round(local: list[dict[str, Any]]) -> dict[str, Any]:
    import torch.distributed as dist

    mine = records.concat(local)
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        mine = records.concat([p for p in parts if p])
    return mine


def _gathered(engine, cfg: SPOConfig):
    """Whole parameters on every rank for the duration (ZeRO-3 partitions them; collective)."""
    if cfg.ray.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    module = engine.module
    params = [p for p in module.parameters() if p.requires_grad or not cfg.train.lora]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _published_weights(engine, cfg: SPOConfig) -> dict[str, np.ndarray] | None:
    """Trainable weights as numpy on rank 0 (every rank must call: the gather is collective)."""
    import torch.distributed as dist

    with _gathered(engine, cfg):
        if dist.get_rank() != 0:
            return None
        module = engine.module
        state = trainable_state(module) if cfg.train.lora else module.state_dict()
        return {k: v.detach().float().cpu().numpy() for k, v in state.items()}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed UNet, SPO loss on each round's pairs, publish, repeat."""
    import deepspeed

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_role_threads(cfg.ray, "trainer")
    device = ray.train.torch.get_device() if cfg.ray.trainer.num_gpus else torch.device("cpu")
    names = actor_names(cfg)
    store, ledger = ray.get_actor(names["store"]), ray.get_actor(names["ledger"])
    run_dir = cfg.run_dir
    # Start the stream first: the sampler and scorer actors start and load their models while this
    # worker loads its own and initializes DeepSpeed (samplers then wait at the store for the
    # version rank 0 publishes), instead of after it.
    pump = _ShardPump(ray.train.get_dataset_shard("pairs"))

    model = load_model(cfg, device, ("unet", "text"))
    apply_fast_path(model, cfg, device, inference_only=False)
    model.negative_conditioning(1)  # cached; the trainer needs no text encoder after this
    model.free_text_encoders()
    from spo_ray.training import setup_policy

    frozen_copy = setup_policy(model.unet, cfg.train)
    position, version, accounting, state = 0, 0, Accounting(), {}
    resumed = latest_checkpoint(run_dir)
    if resumed is not None:
        from spo_ray.checkpointing import load_checkpoint

        state, weights, optimizer_state = load_checkpoint(resumed)
        load_trainable_weights(model.unet, weights, source=str(resumed))
        position, version = state["position"], state["policy_version"]
        accounting = Accounting(**state["accounting"])
        if rank == 0:
            print(f"[spo-ray] trainer resumed from {resumed} (prompt-plan position {position}, "
                  f"policy version {version})", flush=True)
    params = trainable_parameters(model.unet)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.train.learning_rate, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        weight_decay=cfg.train.adam_weight_decay, eps=cfg.train.adam_epsilon,
    )
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(cfg.train.lr_warmup_steps))
    engine, optimizer, _, lr_schedule = deepspeed.initialize(
        model=model.unet, optimizer=optimizer, lr_scheduler=lr_schedule, config=deepspeed_config(cfg, device)
    )
    autocast = torch.bfloat16 if device.type == "cuda" and cfg.train.mixed_precision != "fp32" else None
    global_step = 0
    if resumed is not None:
        global_step = state["global_step"]
        if optimizer_state is not None and "adam" in optimizer_state:
            _restore_optimizer_state(engine, optimizer_state["adam"], global_step)
            lr_schedule.load_state_dict(optimizer_state["lr_schedule"])

    # MLflow from trainer rank 0 (Ray Train V2 refuses Tune logger callbacks); a restart or a
    # re-submission continues the checkpoint's MLflow run.
    tracker = RunTracker(cfg, engine="ray") if rank == 0 else None
    if tracker is not None:
        tracker.start(resume_run_id=state.get("mlflow_run_id"))
    try:
        _train(cfg, config, rank, world, model, engine, frozen_copy, lr_schedule, store, ledger, tracker, pump,
               position=position, version=version, accounting=accounting, global_step=global_step, autocast=autocast)
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    if tracker is not None:
        tracker.end("FINISHED")


def _train(cfg, config, rank, world, model, engine, frozen_copy, lr_schedule, store, ledger, tracker, pump, *,
           position: int, version: int, accounting: Accounting, global_step: int, autocast) -> None:
    """The round loop of one trainer worker (split out so rank 0 can close its MLflow run)."""
    prompts: list[str] = config["prompts"]
    run_dir = cfg.run_dir
    params = trainable_parameters(engine.module)
    # Publish the starting policy (the store rolls back to it on a restart).
    weights = _published_weights(engine, cfg)
    if rank == 0:
        ray.get(store.rollback.remote(version, weights))

    plan = prompt_plan(cfg, len(prompts))
    last = plan.num_rounds if cfg.run.max_rounds is None else min(plan.num_rounds, cfg.run.max_rounds)
    metrics_path = run_dir / "metrics.jsonl"
    nonfinite_in_a_row, max_lag, lags = 0, 0, []
    # Validation grids: rendered by the renderer actor from the published weights; logged when ready.
    renderer = None
    if tracker is not None and tracker.active:
        with contextlib.suppress(ValueError):  # absent when there are no validation prompts
            renderer = ray.get_actor(actor_names(cfg)["renderer"])
    pending_grids: list[tuple[str, Any]] = []
    grid_position = -1
    started = time.time()
    for rnd in plan.rounds_from(position):
        if rnd.index >= last:
            break
        t0 = time.time()
        events, kept, rejected = _wait_for_round(pump, ledger, rnd.index, rank)
        waited = time.time() - t0
        pairs = _gather_round(pump.pop(rnd.index))
        num_pairs = records.num_rows(pairs) if pairs else 0
        round_lag = version - int(pairs["policy_version"].min()) if num_pairs else 0
        if round_lag > cfg.ray.max_policy_lag:
            raise RuntimeError(f"round {rnd.index} was sampled {round_lag} versions behind (max {cfg.ray.max_policy_lag})")
        max_lag = max(max_lag, round_lag)
        lags.append(round_lag)
        step_logs = []
        transitions = 0
        t_train = time.time()
        if num_pairs:
            trans = round_transitions(pairs)
            transitions = int(pairs["seg_len"].sum())
            micro = plan_microbatches(
                transitions, cfg.train.train_batch_size, seed=cfg.train.seed, epoch=rnd.epoch,
                round_index=rnd.index, world_size=world, rank=rank,
            )
            engine.train()
            partial: list[dict[str, float]] = []
            for i, idx in enumerate(micro):
                boundary = (len(partial) + 1 == cfg.train.grad_accum_steps) or i == len(micro) - 1
                engine.set_gradient_accumulation_boundary(boundary)
                weight = 1.0
                if len(idx) == 0:  # this rank's share of the last micro-batch is empty
                    idx, weight = torch.zeros(1, dtype=torch.long), 0.0
                batch = take_rows(trans, idx)
                loss, stats = microbatch_loss(
                    model, engine, frozen_copy, batch, cfg.train, cfg.sampling, autocast_dtype=autocast
                )
                nonfinite = all_reduce_sum([0.0 if torch.isfinite(loss) else 1.0])[0] > 0
                if nonfinite:
                    # Skipped by all ranks together: a zero loss keeps the hooks and counters aligned.
                    loss = sum((p * 0.0).sum() for p in params)
                    nonfinite_in_a_row += 1
                else:
                    nonfinite_in_a_row = 0
                    loss = loss * weight
                engine.backward(loss)
                engine.step()
                stats["loss"] = float(loss.detach()) if not nonfinite else float("nan")
                stats["weight"] = weight
                partial.append(stats)
                if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"{nonfinite_in_a_row} micro-steps in a row had a non-finite loss "
                        f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); stopping"
                    )
                if boundary:
                    global_step += 1
                    keys = ("loss", "ratio_win", "ratio_lose", "clip_frac", "accuracy", "score_win", "score_lose")
                    w = sum(s["weight"] for s in partial)
                    local = [sum(s[k] * s["weight"] for s in partial) for k in keys] + [w]
                    total = all_reduce_sum(local)
                    step_log = {k: total[j] / max(total[-1], 1e-12) for j, k in enumerate(keys)}
                    grad_norm = engine.get_global_grad_norm()
                    step_log.update(
                        step=global_step, lr=lr_schedule.get_last_lr()[0] if lr_schedule else cfg.train.learning_rate,
                        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                        skipped=any(np.isnan(s["loss"]) for s in partial), round=rnd.index, epoch=rnd.epoch,
                    )
                    step_logs.append(step_log)
                    partial = []
                    if cfg.train.test_delay_s:
                        time.sleep(cfg.train.test_delay_s)
            engine.eval()
        train_seconds = time.time() - t_train
        version += 1
        weights = _published_weights(engine, cfg)
        if rank == 0:
            ray.get(store.publish.remote(version, weights))
            if renderer is not None and (rnd.index + 1) % plan.rounds_per_epoch == 0:
                pending_grids.append((f"epoch_{rnd.epoch}", renderer.render.remote(weights)))
                grid_position = rnd.index + 1
        accounting.add(
            prompts=len(rnd.prompt_ids), scoring_events=events, kept=kept, rejected=rejected, trained=num_pairs,
            transitions_trained=transitions, optimizer_steps=len(step_logs),
            skipped_steps=sum(bool(s["skipped"]) for s in step_logs),
        )
        if rank == 0:
            elapsed = time.time() - t0
            with metrics_path.open("a") as f:
                for s in step_logs:
                    f.write(json.dumps({"kind": "step", "time": time.time(), **s}) + "\n")
                round_record = {
                    "kind": "round", "time": time.time(), "round": rnd.index, "epoch": rnd.epoch, "policy_lag": round_lag,
                    "kept_fraction": kept / max(events, 1), "pairs": num_pairs, "wait_seconds": waited,
                    "pair_ids": sorted(pairs["pair_id"].tolist()) if num_pairs else [],
                    "pairs_per_s": num_pairs / max(elapsed, 1e-9),
                    "loss": float(np.mean([s["loss"] for s in step_logs])) if step_logs else None,
                }
                f.write(json.dumps(round_record) + "\n")
            if tracker is not None:
                pending_grids = _log_ready_grids(tracker, pending_grids)
                strip = ray.get(ledger.take_strip.remote(rnd.index))
                if strip is not None:
                    tracker.log_image(_image(strip), f"pairs/round_{rnd.index:07d}.png")
                for s in step_logs:
                    tracker.log_metrics(
                        {**{k: s[k] for k in STEP_METRICS}, "score_margin": s["score_win"] - s["score_lose"],
                         "skipped": float(s["skipped"])},
                        step=s["step"],
                    )
                tracker.log_metrics(
                    {"round": rnd.index, "epoch": rnd.epoch, "policy_lag": round_lag, "kept_fraction": kept / max(events, 1),
                     "pairs_per_s": round_record["pairs_per_s"], "wait_seconds": waited, "round_loss": round_record["loss"],
                     "busy/trainer": train_seconds / max(elapsed, 1e-9), "busy/trainer_waiting": waited / max(elapsed, 1e-9),
                     **_actor_busy_fractions(cfg), **ray.get(ledger.round_summary.remote(rnd.index)),
                     **{f"accounting/{k}": v for k, v in accounting.to_dict().items()}},
                    step=max(global_step, tracker.last_step("round") + 1),
                )
            loss_text = f"{np.mean([s['loss'] for s in step_logs]):.4f}" if step_logs else "-"
            print(
                f"[spo-ray] round {rnd.index + 1}/{last} | prompts {accounting.prompts} | pairs kept {accounting.kept} "
                f"rejected {accounting.rejected} | optimizer steps {global_step} | loss {loss_text} | lag {round_lag} | "
                f"pairs/s {accounting.trained / max(time.time() - started, 1e-9):.2f}",
                flush=True,
            )
        if cfg.run.checkpoint_every_rounds and (rnd.index + 1) % cfg.run.checkpoint_every_rounds == 0:
            saved = _save_checkpoint(
                engine, lr_schedule, cfg, rank, position=rnd.index + 1, version=version, step=global_step,
                accounting=accounting, mlflow_run_id=tracker.run_id if tracker is not None else None,
            )
            if tracker is not None and saved is not None and cfg.tracking.log_checkpoints:
                tracker.log_artifact(saved, f"checkpoints/{saved.name}")

    if renderer is not None and grid_position != last:
        pending_grids.append(("final", renderer.render.remote(weights)))
    if tracker is not None:
        _log_ready_grids(tracker, pending_grids, wait=True)
    # Everything published; export the final policy from rank 0 (inside the collective gather).
    final_dir = run_dir / "final"
    with _gathered(engine, cfg):
        if rank == 0:
            export_policy(engine.module, kind=cfg.model.kind, lora=cfg.train.lora, directory=final_dir)
    if rank == 0:
        summary = {
            "engine": "ray", "run_dir": str(run_dir), "final_dir": str(final_dir), "policy_version": version,
            "trainer_accounting": accounting.to_dict(), "max_policy_lag_seen": max_lag, "lags": lags,
            "world_size": world, "global_step": global_step, "seconds": time.time() - started,
        }
        if tracker is not None:
            summary["mlflow_run_id"] = tracker.run_id
            tracker.log_artifact(final_dir, "final")
            tracker.register_lora(final_dir, "final")
        (run_dir / "trainer_summary.json").write_text(json.dumps(summary, indent=2))
    ray.train.report({"policy_version": version, "global_step": global_step})


def _actor_busy_fractions(cfg: SPOConfig) -> dict[str, float]:
    """busy/sampler and busy/scorer so far (per actor, over the run's metered window)."""
    roles = telemetry.collect(cfg.run.name).get("roles", {})
    return {
        f"busy/{role}": stats["busy_fraction"] for role, stats in roles.items()
        if role in ("sampler", "scorer") and stats.get("busy_fraction") is not None
    }


def _image(png: bytes) -> Any:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png))


def _log_ready_grids(tracker: RunTracker, pending: list[tuple[str, Any]], wait: bool = False) -> list[tuple[str, Any]]:
    """Log the validation grids that are rendered (all of them with ``wait``); return the rest."""
    still = []
    for name, ref in pending:
        ready, _ = ray.wait([ref], timeout=None if wait else 0)
        if ready:
            tracker.log_image(_image(ray.get(ref)), f"images/{name}.png")
        else:
            still.append((name, ref))
    return still


ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")
STEP_METRICS = ("loss", "ratio_win", "ratio_lose", "clip_frac", "accuracy", "score_win", "score_lose", "lr", "grad_norm")


def _named_trainables(engine) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in engine.module.named_parameters() if p.requires_grad}


def _optimizer_state(engine) -> dict[str, torch.Tensor]:
    """Adam moments per trainable parameter name, whole (not partitioned): a checkpoint that
    resumes with any number of trainer workers. Collective under ZeRO: every rank calls it."""
    from deepspeed.utils import safe_get_full_optimizer_state

    out = {}
    for name, param in _named_trainables(engine).items():
        for key in ADAM_STATE_KEYS:
            value = safe_get_full_optimizer_state(param, key)
            if value is None:  # ZeRO stage 0: the torch optimizer holds per-parameter state
                value = engine.optimizer.state.get(param, {}).get(key)
            if value is not None:
                out[f"{name}.{key}"] = value.detach().float().cpu().reshape(param.shape)
    return out


def _restore_optimizer_state(engine, tensors: dict[str, torch.Tensor], step: int) -> None:
    """Inverse of :func:`_optimizer_state` (every rank calls it), and Adam's step counters."""
    from deepspeed.utils import safe_set_full_optimizer_state

    # torch's Adam creates its state at the first step, and ZeRO links each parameter to its
    # fragment of that state only then: create it now (zeros) and link, so it can be filled.
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in inner.param_groups:
        for flat in group["params"]:
            if not inner.state[flat]:
                inner.state[flat].update(
                    step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat)
                )
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    for name, param in _named_trainables(engine).items():
        for key in ADAM_STATE_KEYS:
            value = tensors.get(f"{name}.{key}")
            if value is None:
                continue
            if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
                safe_set_full_optimizer_state(param, value.to(param.device), key)
            else:
                engine.optimizer.state.setdefault(param, {})[key] = value.to(param.device).clone()
    for state in inner.state.values():
        state["step"] = torch.tensor(float(step))


def _save_checkpoint(
    engine, lr_schedule, cfg: SPOConfig, rank: int, *, position: int, version: int, step: int, accounting: Accounting,
    mlflow_run_id: str | None = None,
) -> Path | None:
    from spo_ray.checkpointing import save_checkpoint

    weights = _published_weights(engine, cfg)
    adam = _optimizer_state(engine)
    if rank == 0:
        return save_checkpoint(
            cfg.run_dir, position=position,
            state={"policy_version": version, "global_step": step, "micro_step": 0, "accounting": accounting.to_dict(),
                   "engine": "ray", "mlflow_run_id": mlflow_run_id},
            weights={k: torch.from_numpy(v) for k, v in weights.items()},
            optimizer={"adam": adam, "lr_schedule": lr_schedule.state_dict()},
            keep=cfg.run.keep_checkpoints,
        )
    return None


# ----------------------------------------------------------------------------- the driver


def run_on_ray(cfg: SPOConfig) -> dict[str, Any]:
    """Run SPO on the Ray cluster this process is connected to (or a local one)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    prompts = preflight(cfg).prompts  # bad input fails here, before any cluster resource
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    connect_ray(cfg.ray.address)
    names = actor_names(cfg)
    for name in names.values():  # a previous attempt's coordinators (same run name) start over
        try:
            ray.kill(ray.get_actor(name))
        except ValueError:
            pass
    plan = prompt_plan(cfg, len(prompts))
    round_sizes = {r.index: len(r.prompt_ids) for r in plan.rounds()}
    resumed = latest_checkpoint(run_dir)
    baseline = json.loads((resumed / "state.json").read_text())["accounting"] if resumed else None
    if resumed:
        print(f"[spo-ray] resuming {cfg.run.name} from {resumed}", flush=True)
    store = PolicyStore.options(name=names["store"]).remote(keep=cfg.ray.max_policy_lag + 1)
    ledger = RoundLedger.options(name=names["ledger"]).remote(round_sizes, baseline)
    coordinators = [store, ledger, telemetry.start_sink(cfg.run.name)]  # the sink: per-role metering
    validation_prompts, validation_seeds = validation_set(cfg, prompts)
    if cfg.tracking.enabled and validation_prompts:
        coordinators.append(ValidationRenderer.options(name=names["renderer"], **_role_kwargs(cfg, "renderer")).remote(
            cfg.to_dict(), validation_prompts, validation_seeds
        ))

    def dataset_factory() -> ray.data.Dataset:
        # Called by Ray Train before each worker-group start, before the train loop runs: the
        # store forgets the lost versions (rank 0 republishes the checkpoint's) and the ledger sets
        # the redone rounds' earlier counts apart.
        found = latest_checkpoint(run_dir)
        position = json.loads((found / "state.json").read_text())["position"] if found else 0
        ray.get(store.reset.remote())
        generation = ray.get(ledger.begin_stream.remote(position))
        return build_pair_stream(cfg, prompts, position, generation)

    trainer_res = cfg.ray.trainer
    resources = {"CPU": trainer_res.num_cpus, **trainer_res.resources}
    if trainer_res.num_gpus:
        resources["GPU"] = trainer_res.num_gpus
    trainer = TorchTrainer(
        telemetry.metered_train_loop(train_loop_per_worker, cfg.run.name),
        train_loop_config={"cfg": cfg.to_dict(), "prompts": prompts},
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_trainers, use_gpu=bool(trainer_res.num_gpus), resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(run_dir / "ray_train"),
            # A dead trainer worker: the group restarts, resumes from the latest checkpoint, and
            # the stream is rebuilt from that checkpoint's prompt position (dataset_factory).
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        ),
        datasets={"pairs": dataset_factory},
        dataset_config=RoundSplit(),
    )
    started = time.time()
    trainer.fit()
    totals = ray.get(ledger.totals.remote())
    gate = ray.get(store.stats.remote())
    trainer_summary = json.loads((run_dir / "trainer_summary.json").read_text())
    t = trainer_summary["trainer_accounting"]
    accounting = Accounting(
        prompts=totals["prompts"], scoring_events=totals["scoring_events"], kept=totals["kept"],
        rejected=totals["rejected"], trained=t["trained"], dropped_rank_balance=t["dropped_rank_balance"],
        transitions_trained=t["transitions_trained"], optimizer_steps=t["optimizer_steps"], skipped_steps=t["skipped_steps"],
    )
    result = {
        **trainer_summary,
        "accounting": accounting.to_dict(),
        "accounting_problems": accounting.problems() + (
            [f"trainer trained {t['trained']} pairs but the ledger kept {totals['kept']}"]
            if t["kept"] != totals["kept"] else []
        ),
        "redone_reports": totals["duplicate_reports"],
        "redone_after_restart": totals["redone_after_restart"],
        "stale_reports": totals["stale_reports"],
        "kept_by_bucket": totals["by_bucket"],
        "gate": gate,
        "seconds": time.time() - started,
        "telemetry": telemetry.collect(cfg.run.name),
    }
    (run_dir / "summary.json").write_text(json.dumps(result, indent=2))
    print("accounting: " + accounting.summary(), flush=True)
    for actor in coordinators:
        ray.kill(actor)
    return result
