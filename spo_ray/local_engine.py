"""The in-process engine: prompts -> candidate pools -> scores -> pairs -> optimizer steps, in one
process with no Ray. It is the reference the Ray engine is checked and measured against, and it
uses the very same components: sampling.py, scoring.py, the learner's ``train_round``, the one
checkpoint format (checkpointing.py) and the one run record (run_log.py).

A round is one sampling batch of prompts under one policy version; the learner trains on the
round's kept pairs, then the next round samples with the updated policy (max_policy_lag 0:
the reference's synchronous schedule).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from spo_ray import telemetry
from spo_ray.checkpointing import (
    RunProgress,
    latest_checkpoint,
    load_checkpoint,
    mlflow_run_to_continue,
    remove_stale_temporaries,
    resume_checkpoint,
    save_checkpoint,
    upload_due,
)
from spo_ray.components import (
    apply_fast_path,
    build_pool_scorer,
    last_round,
    load_model,
    prompt_plan,
    resolve_device,
)
from spo_ray.config import SPOConfig
from spo_ray.export import checkpoint_lora_exporter, export_policy
from spo_ray.learner import NonFiniteError, checkpoint_shard, weights_finite
from spo_ray.preflight import preflight
from spo_ray.rendering import render_pair_strip, render_validation_grid, validation_due, validation_set
from spo_ray.run_log import (
    RoundScores,
    RunLog,
    finished_run,
    next_round_step,
    report_finished,
    round_record,
    write_run_config,
)
from spo_ray.sampling import CandidatePoolSampler
from spo_ray.scoring import nonfinite_problem
from spo_ray.stopping import GracefulInterrupt
from spo_ray.tracking import RunTracker
from spo_ray.training import LocalTrainer

log = logging.getLogger(__name__)


def run_in_process(cfg: SPOConfig) -> dict[str, Any]:
    """Run SPO in this process; returns the run summary (also written to summary.json)."""
    started = time.time()
    prompt_set = preflight(cfg, ray=False)  # every bad input fails here, as on Ray, before any model loads
    finished = finished_run(cfg.run_dir, last_round(cfg, prompt_plan(cfg, len(prompt_set.prompts))))
    if finished is not None:
        return report_finished(cfg, finished)
    device = resolve_device(cfg)
    resumed = resume_checkpoint(cfg.run_dir, cfg.run.resume)
    # The tracking server is checked (and the MLflow run started or continued) before any model loads.
    tracker = RunTracker(cfg, engine="in-process", background=True)
    tracker.start(resume_run_id=mlflow_run_to_continue(cfg.run_dir, resumed))
    interrupt = GracefulInterrupt()  # Ctrl-C / SIGTERM: finish the round, checkpoint, stop
    try:
        result = _run(cfg, tracker, prompt_set, device, resumed, started, interrupt)
    except BaseException as err:
        tracker.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        interrupt.restore()
    tracker.end("KILLED" if interrupt.requested else "FINISHED")
    return result


def _run(cfg: SPOConfig, tracker: RunTracker, prompt_set, device, resumed: Path | None, started: float,
         interrupt: GracefulInterrupt) -> dict[str, Any]:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(run_dir):
        log.warning("removed %s, an incomplete checkpoint of an earlier, interrupted run", stale)
    write_run_config(run_dir, cfg)  # after every check passed

    # Components: one UNet samples and trains (so no torch.compile), the VAE and scorer score.
    model = load_model(cfg, device)
    apply_fast_path(model, cfg, device, inference_only=False)
    prompts = prompt_set.prompts  # cut to the text encoder's context by the preflight
    plan = prompt_plan(cfg, len(prompts))
    trainer = LocalTrainer(model, cfg.train, cfg.sampling, device=device)
    learner, frozen_copy = trainer.learner, trainer.frozen_copy
    sampler = CandidatePoolSampler(model, cfg.sampling, cfg.train.seed)
    pool_scorer = build_pool_scorer(cfg, model, device)
    meters = {role: telemetry.RoleMeter(role, actor="in-process") for role in telemetry.ROLES}  # as the Ray roles

    progress = RunProgress()
    if resumed is not None:
        progress, weights, moments = load_checkpoint(resumed)
        learner.load_state(weights, moments, progress.applied_steps)
        log.info("resumed from %s (written by the %s engine) at round %d, policy version %d",
                 resumed, progress.engine, progress.position, progress.policy_version)
    trainer.state = progress.train
    progress.engine, progress.mlflow_run_id = "in-process", tracker.run_id
    end = last_round(cfg, plan)
    run_log = RunLog(run_dir, tracker, resume_position=progress.position, total_rounds=end)

    def checkpoint() -> Path:
        progress.applied_steps = learner.applied_steps()
        weights, moments = checkpoint_shard(learner)
        path = save_checkpoint(run_dir, progress, weights=weights, optimizer=moments, keep=cfg.run.keep_checkpoints,
                               export=checkpoint_lora_exporter(model.unet, kind=cfg.model.kind, lora=cfg.train.lora))
        tracker.log_checkpoint(path, upload=upload_due(cfg, progress.position))
        return path

    # Validation images: fixed prompts and seeds, the base model's row computed once.
    validation_prompts, validation_seeds = validation_set(cfg, prompts)
    base_images = None
    last_grid_position = -1

    def log_grid() -> None:
        nonlocal base_images, last_grid_position
        if not tracker.active or not validation_prompts:
            return
        grid, base_images = render_validation_grid(
            model, frozen_copy, validation_prompts, validation_seeds, cfg.sampling, base_images=base_images
        )
        tracker.log_image(grid, key="validation", step=progress.mlflow_round_step)
        last_grid_position = progress.position

    bar = tqdm(total=end, initial=progress.position, desc="rounds", disable=not cfg.run.progress, dynamic_ncols=True)
    stopped_by: str | None = None
    for rnd in plan.rounds_from(progress.position):
        if rnd.index >= end:
            break
        # sample -> score -> train, one stage after the other
        t0 = time.time()
        model.unet.eval()
        records = sampler.sample([prompts[i] for i in rnd.prompt_ids], rnd.prompt_ids, epoch=rnd.epoch,
                                 round_index=rnd.index, policy_version=progress.policy_version)
        t_sampled = time.time()
        pairs, stats = pool_scorer(records)
        t_scored = time.time()
        stopped_by = nonfinite_problem(rnd.index, stats.events, stats.nonfinite, cfg.scorer.max_nonfinite_fraction,
                                       stats.nonfinite_latents)
        if stopped_by:  # a checkpoint before this round: a resume redoes it (after the cause is fixed)
            checkpoint()
            break
        try:
            steps = trainer.train_round(pairs, epoch=rnd.epoch, round_index=rnd.index)
            weights_finite(learner.trainables())
        except NonFiniteError as err:  # no checkpoint: the round's weights are partly trained
            stopped_by = str(err)
            break
        t_trained = time.time()

        # account, then publish (here: the next round samples with the same UNet) and record
        num_pairs = len(pairs["pair_id"])
        transitions = int(pairs["seg_len"].sum()) if num_pairs else 0
        forwards = sampler.unet_forwards - meters["sampler"].counters.get("unet_forwards", 0)
        meters["sampler"].record(t0, t_sampled, prompts=len(rnd.prompt_ids), unet_forwards=forwards)
        meters["scorer"].record(t_sampled, t_scored, images_scored=stats.images, scoring_events=stats.events, kept=stats.kept)
        meters["trainer"].record(t_scored, t_trained, optimizer_steps=len(steps), pairs_trained=num_pairs)
        progress.accounting.add(
            prompts=len(rnd.prompt_ids), scoring_events=stats.events, kept=stats.kept, rejected=stats.rejected,
            dropped_nonfinite=stats.nonfinite,
            trained=num_pairs, transitions_trained=transitions, optimizer_steps=len(steps),
            skipped_steps=sum(s.skipped for s in steps),
        )
        lag = 0 if num_pairs == 0 else progress.policy_version - int(pairs["policy_version"].min())
        progress.policy_version += 1
        progress.position = rnd.index + 1
        elapsed = time.time() - t0
        record = round_record(
            round_index=rnd.index, epoch=rnd.epoch, prompts=len(rnd.prompt_ids), policy_lag=lag,
            scores=RoundScores.from_stats(stats), steps=steps, pair_ids=pairs["pair_id"].tolist(), transitions=transitions,
            seconds=elapsed, wait_seconds=0.0, train_seconds=t_trained - t_scored,
            busy={"sampler": (t_sampled - t0) / max(elapsed, 1e-9), "scorer": (t_scored - t_sampled) / max(elapsed, 1e-9)},
            accounting=progress.accounting,
        )
        progress.mlflow_round_step = next_round_step(progress.train.global_step, progress.mlflow_round_step)
        run_log.steps(steps)
        run_log.round(record, mlflow_step=progress.mlflow_round_step)
        every = cfg.tracking.log_pair_images_every
        if tracker.active and every > 0 and (rnd.index + 1) % every == 0 and num_pairs:
            tracker.log_image(render_pair_strip(model, records, pairs), key="pairs", step=progress.mlflow_round_step)
        if validation_due(cfg.tracking.validation_every_rounds, progress.position, end):
            log_grid()
        bar.update(1)
        bar.set_postfix(
            prompts=progress.accounting.prompts, kept=progress.accounting.kept, steps=progress.train.global_step,
            loss="-" if record["round_loss"] is None else f"{record['round_loss']:.4f}",
            score=f"{record['mean_score']:.2f}", lag=lag, pairs_s=f"{record['pairs_per_s']:.2f}",
        )
        due = cfg.run.checkpoint_every_rounds and (rnd.index + 1) % cfg.run.checkpoint_every_rounds == 0
        if due or interrupt.requested:
            path = checkpoint()
        if interrupt.requested:
            stopped_by = f"interrupted ({interrupt.requested}) after round {rnd.index}; checkpoint {path}"
            log.warning("%s: resume with the same run.name", stopped_by)
            break
    bar.close()

    final_dir = run_dir / "final"
    export_policy(model.unet, kind=cfg.model.kind, lora=cfg.train.lora, directory=final_dir)
    if last_grid_position != progress.position:
        log_grid()
    tracker.register_lora(final_dir, "final")
    accounting = progress.accounting
    result = {
        "engine": "in-process",
        "run_dir": str(run_dir),
        "final_dir": str(final_dir),
        "position": progress.position,
        "policy_version": progress.policy_version,
        "global_step": progress.train.global_step,
        "accounting": accounting.to_dict(),
        "accounting_problems": accounting.problems(),
        "seconds": time.time() - started,
        "stopped_by": stopped_by,
        "interrupted": interrupt.requested,
        "telemetry": telemetry.summarize({role: {m.actor: m.snapshot()} for role, m in meters.items()}),
        "mlflow_run_id": tracker.run_id,
        "mlflow_tracking_uri": tracker.tracking_uri,
    }
    (run_dir / "summary.json").write_text(json.dumps(result, indent=2))
    tracker.log_artifact(run_dir / "summary.json")
    log.info("accounting: %s", accounting.summary())
    if stopped_by:
        log.error("%s; the checkpoint %s holds the state before it", stopped_by, latest_checkpoint(run_dir))
    return result
