"""One Ray Train worker of the SPO engine: set up once, then a round loop of named stages.

    take the round (wait for the ledger's end marker, gather its pairs)
    -> train it (learner.train_round, the same as in process)
    -> publish the next policy version (rank 0 -> PolicyStore)
    -> report (rank 0: metrics.jsonl, MLflow, the console, images)
    -> checkpoint (every run.checkpoint_every_rounds; the gathers collective under ZeRO, the
       writes in the background: checkpointing.CheckpointWriter)

Every rank runs every stage (the collectives line up); rank 0 alone talks to the store, the
run log and MLflow.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
import torch

from spo_ray import records, telemetry
from spo_ray.checkpointing import (
    CheckpointError,
    CheckpointWriter,
    RunProgress,
    load_checkpoint,
    load_trainable_weights,
    mlflow_run_to_continue,
    resume_checkpoint,
    upload_due,
)
from spo_ray.components import apply_fast_path, last_round, load_model, prompt_plan
from spo_ray.config import SPOConfig, config_from_dict
from spo_ray.export import checkpoint_lora_exporter, export_policy
from spo_ray.learner import NonFiniteError, StepRecord, checkpoint_shard, train_round
from spo_ray.prompts import PromptPlan, Round
from spo_ray.ray.common import trainer_device, worker_setup
from spo_ray.ray.coordination import actor_names
from spo_ray.ray.deepspeed_learner import DeepSpeedLearner
from spo_ray.ray.metrics import export_round, report_meter
from spo_ray.ray.routing import RoutedRound, route_round
from spo_ray.ray.stream import ShardPump, wait_for_round
from spo_ray.rendering import validation_due
from spo_ray.run_log import RunLog, next_round_step, round_record
from spo_ray.scoring import nonfinite_problem
from spo_ray.tracking import RunTracker
from spo_ray.training import autocast_dtype, setup_policy, spo_loss_fn

log = logging.getLogger(__name__)


@dataclass
class TrainerContext:
    """What one trainer rank works with, set up once (``set_up``); the run's state is RunProgress."""

    cfg: SPOConfig
    rank: int
    world: int
    learner: DeepSpeedLearner
    loss_fn: Any
    pump: ShardPump
    store: Any
    ledger: Any
    plan: PromptPlan
    end: int  # the round index this attempt stops before
    tracker: RunTracker | None = None  # rank 0
    run_log: RunLog | None = None  # rank 0
    renderer: Any = None  # rank 0, with tracking and validation prompts
    publisher: Publisher | None = None  # rank 0
    pending_grids: list[tuple[int, Future]] = field(default_factory=list)  # (MLflow step, publish)
    last_grid_position: int = -1
    lags: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    meter: telemetry.RoleMeter = field(default_factory=lambda: telemetry.RoleMeter("trainer"))
    sink: Any = None  # the run's telemetry sink
    writer: CheckpointWriter | None = None
    stopped_by: str | None = None  # why the run stopped early (non-finite values, a stop request)
    interrupted: bool = False  # stopped on request (ray job stop / Ctrl-C)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = config_from_dict(config["cfg"])
    worker_setup(cfg.ray, "trainer")
    ctx, progress = set_up(cfg, len(config["prompts"]))
    try:
        run_rounds(ctx, progress)
        finish(ctx, progress)
    except BaseException:
        if ctx.tracker is not None:
            ctx.tracker.end("FAILED")
        raise
    finally:
        report_meter(ctx.sink, ctx.meter, wait=True)  # peak memory and the totals, at exit
    if ctx.tracker is not None:
        ctx.tracker.end("FINISHED")


def run_rounds(ctx: TrainerContext, progress: RunProgress) -> None:
    publish(ctx, progress, rollback=True)  # the starting policy: the store rolls back to it on a restart
    for rnd in ctx.plan.rounds_from(progress.position):
        if rnd.index >= ctx.end:
            break
        started = time.time()
        scored = wait_for_round(ctx.pump, lambda r=rnd.index: ray.get(ctx.ledger.wait_status.remote(r, 1.0)),
                                rnd.index, ctx.rank, ctx.learner.device)
        ctx.stopped_by = nonfinite_problem(rnd.index, scored[0], scored[3], ctx.cfg.scorer.max_nonfinite_fraction)
        if ctx.stopped_by:  # every rank saw the same counts: all stop, after a checkpoint before this round
            checkpoint(ctx, progress)
            break
        t = ctx.cfg.train
        with timed(ctx, "route"):
            pairs = route_round(ctx.pump.pop(rnd.index), rank=ctx.rank, world=ctx.world, batch_size=t.train_batch_size,
                                seed=t.seed, epoch=rnd.epoch, round_index=rnd.index, exchange=ctx.ledger)
        ctx.meter.add(bytes_in=pairs.bytes_received, transitions_held=pairs.transitions_held)
        lag = policy_lag(ctx, progress, pairs, rnd)
        trained = time.time()
        try:
            steps = train_round(ctx.learner, ctx.loss_fn, pairs.rows, t, progress.train, epoch=rnd.epoch,
                                round_index=rnd.index)
            time.sleep(ctx.cfg.train.test_delay_s * len(steps))  # tests slow the trainer to exercise the gate
            train_seconds = time.time() - trained
            progress.policy_version += 1
            with timed(ctx, "publish"):
                publish(ctx, progress)
        except NonFiniteError as err:
            # Raised on every rank at the same point (the counts and the weight check are all-reduced).
            # No checkpoint: this round's weights are partly trained; the latest checkpoint stands.
            ctx.stopped_by = str(err)
            break
        account(progress, rnd, scored, pairs, steps)
        progress.position = rnd.index + 1
        if ctx.rank == 0:
            with timed(ctx, "report"):
                report(ctx, progress, rnd, lag, pairs, steps, seconds=time.time() - started,
                       wait_seconds=trained - started, train_seconds=train_seconds)
        if ctx.cfg.run.checkpoint_every_rounds and progress.position % ctx.cfg.run.checkpoint_every_rounds == 0:
            with timed(ctx, "checkpoint"):
                checkpoint(ctx, progress)
        ctx.meter.add(rounds=1, train_seconds=train_seconds, wait_seconds=trained - started)
        report_meter(ctx.sink, ctx.meter)  # fire and forget: running totals
        if stop_requested(ctx):  # every rank: rank 0 asked the ledger, the answer is all-reduced
            every = ctx.cfg.run.checkpoint_every_rounds
            if not (every and progress.position % every == 0):  # unless one was just written
                checkpoint(ctx, progress)
            ctx.stopped_by = f"stopped after round {rnd.index}, with a checkpoint at position {progress.position}"
            ctx.interrupted = True
            break


# ----------------------------------------------------------------------------- set-up


def set_up(cfg: SPOConfig, num_prompts: int) -> tuple[TrainerContext, RunProgress]:
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    device = trainer_device(cfg.ray.trainer)
    names = actor_names(cfg)
    store, ledger = ray.get_actor(names["store"]), ray.get_actor(names["ledger"])
    # Start the stream first: the sampler and scorer actors start and load their models while this
    # worker loads its own and initializes DeepSpeed (samplers then wait at the store for the
    # version rank 0 publishes), instead of after it.
    pump = ShardPump(ray.train.get_dataset_shard("pairs"))

    model = load_model(cfg, device, ("unet", "text"))
    apply_fast_path(model, cfg, device, inference_only=False)
    model.negative_conditioning(1)  # cached; the trainer needs no text encoder after this
    model.free_text_encoders()
    frozen_copy = setup_policy(model.unet, cfg.train)
    progress, moments = RunProgress(), None
    resumed = resume_checkpoint(cfg.run_dir, cfg.run.resume)
    if resumed is not None:
        progress, weights, moments = load_checkpoint(resumed)
        load_trainable_weights(model.unet, weights, source=str(resumed))
        if rank == 0:
            log.info("trainer resumed from %s (prompt-plan position %d, policy version %d, written by the %s engine)",
                     resumed, progress.position, progress.policy_version, progress.engine)
    learner = DeepSpeedLearner(model.unet, cfg, device)
    if moments is not None:
        learner.load_state(weights, moments, progress.applied_steps)
    loss_fn = spo_loss_fn(model, learner.module, frozen_copy, cfg.train, cfg.sampling,
                          autocast=autocast_dtype(cfg.train, device))
    plan = prompt_plan(cfg, num_prompts)
    ctx = TrainerContext(cfg, rank, world, learner, loss_fn, pump, store, ledger, plan, last_round(cfg, plan))
    ctx.meter.actor, ctx.meter.run, ctx.sink = f"rank{rank}", cfg.run.name, telemetry.connect(cfg.run.name)
    ctx.writer = CheckpointWriter(cfg.run_dir, rank=rank, world=world, keep=cfg.run.keep_checkpoints,
                                  barrier=lambda: learner.all_reduce_sum([0.0]))
    progress.engine = "ray"
    if rank == 0:
        # MLflow from trainer rank 0 (Ray Train V2 refuses Tune logger callbacks); a restart or a
        # re-submission continues the checkpoint's MLflow run.
        ctx.tracker = RunTracker(cfg, engine="ray", background=True)
        ctx.tracker.start(resume_run_id=mlflow_run_to_continue(cfg.run_dir, resumed))
        progress.mlflow_run_id = ctx.tracker.run_id
        ctx.run_log = RunLog(cfg.run_dir, ctx.tracker, resume_position=progress.position, total_rounds=ctx.end)
        if ctx.tracker.active:
            with contextlib.suppress(ValueError):  # absent when there are no validation prompts
                ctx.renderer = ray.get_actor(names["renderer"])
        ctx.publisher = Publisher(store, ctx.renderer)
    return ctx, progress


# ----------------------------------------------------------------------------- the stages


def stop_requested(ctx: TrainerContext) -> bool:
    """Whether the driver was asked to stop (one small all-reduce per round)."""
    asked = ctx.rank == 0 and ray.get(ctx.ledger.stop_requested.remote()) is not None
    return ctx.learner.all_reduce_sum([float(asked)])[0] > 0


def policy_lag(ctx: TrainerContext, progress: RunProgress, pairs: RoutedRound, rnd: Round) -> int:
    """How many versions behind the round's oldest pair was sampled (bounded by the store's gate)."""
    lag = 0 if pairs.min_policy_version is None else progress.policy_version - pairs.min_policy_version
    if lag > ctx.cfg.ray.max_policy_lag:
        raise RuntimeError(f"round {rnd.index} was sampled {lag} versions behind (max {ctx.cfg.ray.max_policy_lag})")
    ctx.lags.append(lag)
    return lag


class Publisher:
    """Rank 0's publishing, off the critical path: the caller snapshots the weights (a copy to host
    memory), then one background thread puts them into this node's object store and registers
    the reference with the PolicyStore, one version after the other. A version is visible to
    samplers only once its ``ray.put`` is complete, so the lag gate holds exactly as before.

    Cost per version: LoRA SD1.5 r4 3 MB (fp32), SDXL r64 93 MB x 4 B = 370 MB, full SDXL 5.1 GB
    (bf16, the samplers' dtype): one device-to-host copy on the main thread (~0.15 ms / 15 ms /
    0.2 s at ~25 GB/s), then the put and each node's one fetch in the background (network-bound:
    ~0.03 s / 0.3 s / 4 s at 12.5 GB/s)."""

    def __init__(self, store: Any, renderer: Any = None):
        self.store, self.renderer = store, renderer
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish")
        self.last: Future | None = None

    def submit(self, version: int, weights: dict[str, Any], *, rollback: bool = False, grid: bool = False) -> Future:
        packed = records.pack_tensors(weights)

        def put_and_register() -> Any:
            refs = [ray.put(packed)]
            ray.get((self.store.rollback if rollback else self.store.publish).remote(version, refs, time.time()))
            return self.renderer.render.remote(refs) if grid and self.renderer is not None else None

        if self.last is not None:
            self.last.result()  # surface a failure of the previous version here, in order
        self.last = self.pool.submit(put_and_register)
        return self.last

    def wait(self) -> None:
        if self.last is not None:
            self.last.result()


def publish(ctx: TrainerContext, progress: RunProgress, *, rollback: bool = False) -> None:
    """The current weights as ``progress.policy_version``: a snapshot on every rank (collective
    under ZeRO-3), published by rank 0 in the background."""
    weights = ctx.learner.trainable_weights()
    bad = 0.0 if ctx.rank != 0 else float(sum(not bool(torch.isfinite(w).all()) for w in weights.values()))
    bad = ctx.learner.all_reduce_sum([bad])[0]
    if bad:
        raise NonFiniteError(f"{int(bad)} trainable tensor(s) are non-finite after an optimizer step; "
                             f"version {progress.policy_version} was not published")
    if ctx.rank != 0:
        return
    # publish() runs before progress.position moves on: this version ends round `position`
    ends_at = progress.position + 1
    grid = (ctx.renderer is not None and not rollback
            and validation_due(ctx.cfg.tracking.validation_every_rounds, ends_at, ctx.end))
    done = ctx.publisher.submit(progress.policy_version, weights, rollback=rollback, grid=grid)
    if grid:  # at the round's MLflow step, as report() will compute it
        ctx.pending_grids.append((next_round_step(progress.train.global_step, progress.mlflow_round_step), done))
        ctx.last_grid_position = ends_at


def account(progress: RunProgress, rnd: Round, scored: tuple[int, int, int, int], pairs: RoutedRound,
            steps: list[StepRecord]) -> None:
    events, kept, rejected, nonfinite = scored
    progress.accounting.add(
        prompts=len(rnd.prompt_ids), scoring_events=events, kept=kept, rejected=rejected, dropped_nonfinite=nonfinite,
        trained=len(pairs.pair_ids),
        transitions_trained=pairs.transitions, optimizer_steps=len(steps), skipped_steps=sum(s.skipped for s in steps),
    )


def report(ctx: TrainerContext, progress: RunProgress, rnd: Round, lag: int, pairs: RoutedRound,
           steps: list[StepRecord], *, seconds: float, wait_seconds: float, train_seconds: float) -> None:
    """Rank 0: the round's records to metrics.jsonl, MLflow and the console; images when ready."""
    record = round_record(
        round_index=rnd.index, epoch=rnd.epoch, prompts=len(rnd.prompt_ids), policy_lag=lag,
        scores=ray.get(ctx.ledger.round_scores.remote(rnd.index)), steps=steps, pair_ids=pairs.pair_ids,
        transitions=pairs.transitions, seconds=seconds, wait_seconds=wait_seconds,
        train_seconds=train_seconds, busy=actor_busy_fractions(ctx), accounting=progress.accounting,
    )
    progress.mlflow_round_step = next_round_step(progress.train.global_step, progress.mlflow_round_step)
    ctx.run_log.steps(steps)
    ctx.run_log.round(record, mlflow_step=progress.mlflow_round_step)
    export_round(ctx.cfg.run.name, record, progress.policy_version)  # Ray metrics (Prometheus, dashboard)
    if ctx.tracker.active:
        ctx.pending_grids = log_ready_grids(ctx.tracker, ctx.pending_grids)
        strip = ray.get(ctx.ledger.take_strip.remote(rnd.index))
        if strip is not None:
            ctx.tracker.log_image(_image(strip), key="pairs", step=progress.mlflow_round_step)


def checkpoint(ctx: TrainerContext, progress: RunProgress) -> None:
    """Every rank gathers the parameters it owns (learner.checkpoint_shard, collective) and hands
    them to its CheckpointWriter, which writes them while training goes on; rank 0's completes
    the checkpoint. The one before is settled first (at most one in flight)."""
    with timed(ctx, "checkpoint_wait"):  # > 0: the writes did not keep up with the interval
        settle_checkpoint(ctx)
    weights, moments = checkpoint_shard(ctx.learner)
    progress.applied_steps = ctx.learner.applied_steps()
    ctx.writer.submit(progress, weights=weights, optimizer=moments,
                      export=checkpoint_lora_exporter(ctx.learner.engine.module, kind=ctx.cfg.model.kind,
                                                      lora=ctx.cfg.train.lora))


def settle_checkpoint(ctx: TrainerContext) -> None:
    """Join the checkpoint in flight; every rank raises if any rank failed to write it (two
    all-reduces of one number: the ranks agree on their writes, then on the result); rank 0
    records a completed one in MLflow."""
    done = ctx.writer.settle(agree=lambda failed: ctx.learner.all_reduce_sum([float(failed)])[0] > 0)
    if done is None:  # every rank submits at the same points, so none has one in flight
        return
    if ctx.learner.all_reduce_sum([float(done.error is not None)])[0] > 0:
        raise CheckpointError(done.error or f"the checkpoint at position {done.position} failed on another rank "
                                            "(its log names the error)")
    if done.path is not None:
        ctx.tracker.log_checkpoint(done.path, upload=upload_due(ctx.cfg, done.position))


def finish(ctx: TrainerContext, progress: RunProgress) -> None:
    """The last grid, the exported policy (inside the collective gather) and rank 0's summary."""
    cfg = ctx.cfg
    settle_checkpoint(ctx)  # the summary names the checkpoint that stands: it is complete
    weights = ctx.learner.trainable_weights()  # collective under ZeRO-3: every rank calls it
    if ctx.rank == 0:
        if ctx.renderer is not None and ctx.last_grid_position != progress.position:
            ctx.pending_grids.append((progress.mlflow_round_step,
                                      ctx.publisher.submit(progress.policy_version, weights, grid=True)))
        ctx.publisher.wait()
        if ctx.renderer is not None:
            log_ready_grids(ctx.tracker, ctx.pending_grids, wait=True)
    final_dir = cfg.run_dir / "final"
    with ctx.learner.gathered(everything=not cfg.train.lora):
        if ctx.rank == 0:  # LoRA: its fp32 masters; full fine-tuning: the gathered UNet
            export_policy(ctx.learner.engine.module, kind=cfg.model.kind, lora=cfg.train.lora, directory=final_dir,
                          weights=weights if cfg.train.lora else None)
    if ctx.rank == 0:
        summary = {
            "engine": "ray", "run_dir": str(cfg.run_dir), "final_dir": str(final_dir),
            "position": progress.position, "policy_version": progress.policy_version,
            "trainer_accounting": progress.accounting.to_dict(), "max_policy_lag_seen": max(ctx.lags, default=0),
            "lags": ctx.lags, "world_size": ctx.world, "global_step": progress.train.global_step,
            "seconds": time.time() - ctx.started, "mlflow_run_id": ctx.tracker.run_id, "mlflow_tracking_uri": ctx.tracker.tracking_uri,
            "stopped_by": ctx.stopped_by, "interrupted": ctx.interrupted,
        }
        if ctx.tracker.active:
            ctx.tracker.log_artifact(final_dir, "final")
            ctx.tracker.register_lora(final_dir, "final")
        (cfg.run_dir / "trainer_summary.json").write_text(json.dumps(summary, indent=2))
    ray.train.report({"policy_version": progress.policy_version, "global_step": progress.train.global_step})


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def timed(ctx: TrainerContext, stage: str):
    """Seconds this rank spends in a stage outside training, as telemetry counters (rank 0's are
    the serial time every other rank waits for at the next collective): ``<stage>_seconds`` wall
    clock, and ``<stage>_cpu_seconds`` this thread's CPU time, i.e. the stage's own work without its
    waits (collectives, actor replies) and without other processes' share of the cores; on a
    machine with fewer cores than processes only the latter measures the design."""
    started, cpu_started = time.time(), time.thread_time()
    try:
        yield
    finally:
        ctx.meter.add(**{f"{stage}_seconds": time.time() - started,
                         f"{stage}_cpu_seconds": time.thread_time() - cpu_started})


def actor_busy_fractions(ctx: TrainerContext) -> dict[str, float]:
    """busy/sampler and busy/scorer so far (per actor, over the run's metered span)."""
    if ctx.sink is None:
        return {}
    fractions = ray.get(ctx.sink.busy_fractions.remote())
    return {role: fractions[role] for role in ("sampler", "scorer") if role in fractions}


def _image(png: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(png))


def log_ready_grids(tracker: RunTracker, pending: list[tuple[int, Future]], wait: bool = False) -> list[tuple[int, Future]]:
    """Log the validation grids that are rendered (all of them with ``wait``); return the rest.
    Each entry's future is its version's publish, which returns the renderer's task."""
    still = []
    for step, published in pending:
        if not (wait or published.done()):
            still.append((step, published))
            continue
        rendered = published.result()
        ready, _ = ray.wait([rendered], timeout=None if wait else 0)
        if ready:
            tracker.log_image(_image(ray.get(rendered)), key="validation", step=step)
        else:
            still.append((step, published))
    return still

