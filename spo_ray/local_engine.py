"""The in-process engine: prompts -> candidate pools -> scores -> pairs -> optimizer steps, in one
process with no Ray. It is the reference the Ray engine is checked and measured against, and it
uses the very same components (sampling.py, scoring.py, training.py).

A round is one sampling batch of prompts under one policy version; the trainer trains on the
round's kept pairs, then the next round samples with the updated policy (max_policy_lag 0:
the reference's synchronous schedule).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from spo_ray import telemetry
from spo_ray.accounting import Accounting
from spo_ray.checkpointing import (
    latest_checkpoint,
    load_checkpoint,
    load_trainable_weights,
    save_checkpoint,
    trainable_state,
)
from spo_ray.components import (
    apply_fast_path,
    build_pool_scorer,
    fit_prompts_to_tokenizer,
    load_model,
    load_prompt_set,
    prompt_plan,
    resolve_device,
)
from spo_ray.config import SPOConfig
from spo_ray.export import export_policy
from spo_ray.sampling import CandidatePoolSampler
from spo_ray.scoring import ScoringStats
from spo_ray.tracking import RunTracker, render_pair_strip, render_validation_grid, validation_set
from spo_ray.training import LocalTrainer, NonFiniteError, StepMetrics

log = logging.getLogger("spo_ray")


class MetricsFile:
    """Per-step and per-round metrics as JSON lines in the run directory."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": kind, "time": time.time(), **record}) + "\n")


def round_metrics(stats: ScoringStats, steps: list, lag: int) -> dict[str, float]:
    """What a round reports: scores, kept fractions per timestep bucket, loss means."""
    out: dict[str, float] = {
        "mean_score": stats.mean_score,
        "kept_fraction": stats.kept / max(stats.events, 1),
        "policy_lag": lag,
    }
    for bucket, events in stats.events_by_bucket.items():
        out[f"kept_fraction/{bucket}"] = stats.kept_by_bucket.get(bucket, 0) / events
    if steps:
        out["loss"] = sum(s.loss for s in steps) / len(steps)
    return out


def tracking_metrics(step: StepMetrics) -> dict[str, float]:
    """What one optimizer step reports to MLflow."""
    return {
        "loss": step.loss, "ratio_win": step.ratio_win, "ratio_lose": step.ratio_lose, "clip_frac": step.clip_frac,
        "accuracy": step.accuracy, "score_win": step.score_win, "score_lose": step.score_lose,
        "score_margin": step.score_win - step.score_lose, "lr": step.lr, "grad_norm": step.grad_norm,
        "skipped": float(step.skipped), "num_transitions": step.num_transitions,
    }


def run_in_process(cfg: SPOConfig) -> dict[str, Any]:
    """Run SPO in this process; returns the run summary (also written to summary.json)."""
    started = time.time()
    prompt_set = load_prompt_set(cfg)  # bad prompt files fail here, before any model loads
    device = resolve_device(cfg)
    run_dir = cfg.run_dir
    resumed = latest_checkpoint(run_dir)
    # The tracking server is checked (and the MLflow run started or continued) before any model loads.
    tracker = RunTracker(cfg, engine="in-process")
    tracker.start(resume_run_id=read_checkpoint_state(resumed).get("mlflow_run_id") if resumed else None)
    try:
        result = _run(cfg, tracker, prompt_set, device, resumed, started)
    except BaseException as err:
        tracker.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")
    return result


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json alone (cheap: no weights), {} when unreadable."""
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _run(cfg: SPOConfig, tracker: RunTracker, prompt_set, device, resumed: Path | None, started: float) -> dict[str, Any]:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    model = load_model(cfg, device)
    apply_fast_path(model, cfg, device, inference_only=False)  # one UNet samples and trains: no compile
    prompt_set = fit_prompts_to_tokenizer(prompt_set, model.tokenizers[0])
    prompts = prompt_set.prompts
    plan = prompt_plan(cfg, len(prompts))
    trainer = LocalTrainer(model, cfg.train, cfg.sampling, device=device)
    sampler = CandidatePoolSampler(model, cfg.sampling, cfg.train.seed)
    pool_scorer = build_pool_scorer(cfg, model, device)
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    meters = {role: telemetry.RoleMeter(role, actor="in-process") for role in telemetry.ROLES}  # as the Ray roles

    accounting, position, version = Accounting(), 0, 0
    last_round_step = -1  # the MLflow step of the last round's metrics
    if resumed is not None:
        state, weights, optimizer_state = load_checkpoint(resumed)
        load_trainable_weights(model.unet, weights, source=str(resumed))
        if optimizer_state is not None:
            trainer.optimizer.load_state_dict(optimizer_state["optimizer"])
            trainer.lr_schedule.load_state_dict(optimizer_state["lr_schedule"])
        position, version = state["position"], state["policy_version"]
        trainer.global_step, trainer.micro_step = state["global_step"], state["micro_step"]
        accounting = Accounting(**state["accounting"])
        last_round_step = state.get("mlflow_round_step", trainer.global_step)
        log.info("resumed from %s at round %d (policy version %d)", resumed, position, version)

    def checkpoint(next_position: int) -> Path:
        path = save_checkpoint(
            run_dir,
            position=next_position,
            state={
                "policy_version": version,
                "global_step": trainer.global_step,
                "micro_step": trainer.micro_step,
                "accounting": accounting.to_dict(),
                "engine": "in-process",
                "mlflow_run_id": tracker.run_id,
                "mlflow_round_step": last_round_step,
            },
            weights=trainable_state(model.unet),
            optimizer={"optimizer": trainer.optimizer.state_dict(), "lr_schedule": trainer.lr_schedule.state_dict()},
            keep=cfg.run.keep_checkpoints,
        )
        if cfg.tracking.log_checkpoints:
            tracker.log_artifact(path, f"checkpoints/{path.name}")
        return path

    # Validation images: fixed prompts and seeds, the base model's row computed once.
    validation_prompts, validation_seeds = validation_set(cfg, prompts)
    base_images = None
    last_grid_position = -1

    def log_grid(name: str) -> None:
        nonlocal base_images, last_grid_position
        if not tracker.active or not validation_prompts:
            return
        grid, base_images = render_validation_grid(
            model, trainer.frozen_copy, validation_prompts, validation_seeds, cfg.sampling, base_images=base_images
        )
        tracker.log_image(grid, f"images/{name}.png")
        last_grid_position = position

    last_round = plan.num_rounds if cfg.run.max_rounds is None else min(plan.num_rounds, cfg.run.max_rounds)
    bar = tqdm(total=last_round, initial=position, desc="rounds", disable=not cfg.run.progress, dynamic_ncols=True)
    stopped_by: str | None = None
    for rnd in plan.rounds_from(position):
        if rnd.index >= last_round:
            break
        t0 = time.time()
        batch_prompts = [prompts[i] for i in rnd.prompt_ids]
        model.unet.eval()
        records = sampler.sample(
            batch_prompts, rnd.prompt_ids, epoch=rnd.epoch, round_index=rnd.index, policy_version=version
        )
        t_sampled = time.time()
        pairs, stats = pool_scorer(records)
        t_scored = time.time()
        try:
            steps = trainer.train_round(pairs, epoch=rnd.epoch, round_index=rnd.index)
        except NonFiniteError as err:
            stopped_by = str(err)
            checkpoint(rnd.index)
            break
        t_trained = time.time()
        num_pairs = len(pairs["pair_id"])
        forwards = sampler.unet_forwards - meters["sampler"].counters.get("unet_forwards", 0)
        meters["sampler"].record(t0, t_sampled, prompts=len(rnd.prompt_ids), unet_forwards=forwards)
        meters["scorer"].record(t_sampled, t_scored, images_scored=stats.images, scoring_events=stats.events, kept=stats.kept)
        meters["trainer"].record(t_scored, t_trained, optimizer_steps=len(steps), pairs_trained=num_pairs)
        accounting.add(
            prompts=len(rnd.prompt_ids),
            scoring_events=stats.events,
            kept=stats.kept,
            rejected=stats.rejected,
            trained=num_pairs,
            transitions_trained=int(pairs["seg_len"].sum()),
            optimizer_steps=len(steps),
            skipped_steps=sum(s.skipped for s in steps),
        )
        lag = 0 if num_pairs == 0 else version - int(pairs["policy_version"].min())
        version += 1  # the trainer publishes the next version after each round
        for step in steps:
            metrics.write("step", {**asdict(step), "round": rnd.index, "epoch": rnd.epoch})
            tracker.log_metrics(tracking_metrics(step), step=step.step)
        elapsed = time.time() - t0
        summary = round_metrics(stats, steps, lag)
        summary.update(round=rnd.index, epoch=rnd.epoch, pairs_per_s=stats.kept / max(elapsed, 1e-9), seconds=elapsed)
        metrics.write("round", {**summary, "pair_ids": sorted(pairs["pair_id"].tolist())})
        position = rnd.index + 1
        # Per-round metrics share the optimizer-step axis (the round's last step); a round that
        # trained nothing moves one step on so that no metric has a step twice. (A round redone
        # after a resume gets its old step, which the tracker skips: it was logged already.)
        round_step = trainer.global_step if trainer.global_step > last_round_step else last_round_step + 1
        last_round_step = round_step
        busy = {
            "busy/sampler": (t_sampled - t0) / max(elapsed, 1e-9),
            "busy/scorer": (t_scored - t_sampled) / max(elapsed, 1e-9),
            "busy/trainer": (t_trained - t_scored) / max(elapsed, 1e-9),
        }
        tracked = {k: v for k, v in summary.items() if k not in ("loss", "seconds")}  # "loss": the step series
        tracked.update(
            busy, round_loss=summary.get("loss"), round_seconds=elapsed, **{
                "accounting/kept": accounting.kept, "accounting/rejected": accounting.rejected,
                "accounting/prompts": accounting.prompts,
            },
        )
        tracker.log_metrics(tracked, step=round_step)
        every = cfg.tracking.log_pair_images_every
        if tracker.active and every > 0 and (rnd.index + 1) % every == 0 and num_pairs:
            tracker.log_image(render_pair_strip(model, records, pairs), f"pairs/round_{rnd.index:07d}.png")
        if (rnd.index + 1) % plan.rounds_per_epoch == 0:
            log_grid(f"epoch_{rnd.epoch}")
        bar.update(1)
        bar.set_postfix(
            prompts=accounting.prompts, kept=accounting.kept, rejected=accounting.rejected,
            steps=trainer.global_step, loss=f"{summary.get('loss', float('nan')):.4f}",
            score=f"{stats.mean_score:.2f}", lag=lag, pairs_s=f"{summary['pairs_per_s']:.2f}",
        )
        if cfg.run.checkpoint_every_rounds and (rnd.index + 1) % cfg.run.checkpoint_every_rounds == 0:
            checkpoint(rnd.index + 1)
    bar.close()

    final_dir = run_dir / "final"
    export_policy(model.unet, kind=cfg.model.kind, lora=cfg.train.lora, directory=final_dir)
    if last_grid_position != position:
        log_grid("final")
    tracker.register_lora(final_dir, "final")
    result = {
        "engine": "in-process",
        "run_dir": str(run_dir),
        "final_dir": str(final_dir),
        "position": position,
        "policy_version": version,
        "accounting": accounting.to_dict(),
        "accounting_problems": accounting.problems(),
        "seconds": time.time() - started,
        "stopped_by": stopped_by,
        "telemetry": telemetry.summarize({role: {m.actor: m.snapshot()} for role, m in meters.items()}),
        "mlflow_run_id": tracker.run_id,
        "mlflow_tracking_uri": tracker.tracking_uri,
    }
    (run_dir / "summary.json").write_text(json.dumps(result, indent=2))
    tracker.log_artifact(run_dir / "summary.json")
    print("accounting: " + accounting.summary(), flush=True)
    if stopped_by:
        raise NonFiniteError(stopped_by)
    return result
