"""The Ray engine's driver: check every input, start the coordination actors, build the pair
stream (a factory Ray Train calls at every worker-group start), run the trainer, and account.

    run_on_ray(cfg)     # connected to the cluster this process runs in (a job), or a local one
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import ray
import ray.data

from spo_ray import telemetry
from spo_ray.accounting import Accounting
from spo_ray.checkpointing import read_progress, remove_stale_temporaries, resume_checkpoint
from spo_ray.components import connect_ray, last_round, prompt_plan
from spo_ray.config import SPOConfig
from spo_ray.preflight import preflight
from spo_ray.ray.common import make_split, torch_trainer
from spo_ray.ray.coordination import PolicyStore, RoundLedger, actor_names
from spo_ray.ray.stream import build_pair_stream
from spo_ray.ray.trainer import train_loop_per_worker
from spo_ray.ray.workers import ValidationRenderer
from spo_ray.rendering import validation_set
from spo_ray.run_log import finished_run, report_finished, write_run_config
from spo_ray.stopping import GracefulInterrupt

log = logging.getLogger(__name__)


def run_on_ray(cfg: SPOConfig) -> dict[str, Any]:
    """Run SPO on the Ray cluster this process is connected to (or a local one)."""
    prompts = preflight(cfg).prompts  # bad input fails here, before any cluster resource
    plan = prompt_plan(cfg, len(prompts))
    finished = finished_run(cfg.run_dir, last_round(cfg, plan))
    if finished is not None:
        return report_finished(cfg, finished)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(run_dir):
        log.warning("removed %s, an incomplete checkpoint of an earlier, interrupted run", stale)
    write_run_config(run_dir, cfg)  # after every check passed
    connect_ray(cfg.ray.address)
    names = actor_names(cfg)
    for name in names.values():  # a previous attempt's coordinators (same run name) start over
        try:
            ray.kill(ray.get_actor(name))
        except ValueError:
            pass
    round_sizes = {r.index: len(r.prompt_ids) for r in plan.rounds()}
    resumed = resume_checkpoint(run_dir, cfg.run.resume)
    baseline = read_progress(resumed).accounting.to_dict() if resumed else None
    if resumed:
        log.info("resuming %s from %s", cfg.run.name, resumed)
    store = PolicyStore.options(name=names["store"]).remote(keep=cfg.ray.max_policy_lag + 1, run=cfg.run.name)
    ledger = RoundLedger.options(name=names["ledger"]).remote(round_sizes, baseline)
    coordinators = [store, ledger, telemetry.start_sink(cfg.run.name)]  # the sink: per-role metering
    validation_prompts, validation_seeds = validation_set(cfg, prompts)
    if cfg.tracking.enabled and validation_prompts:
        coordinators.append(ValidationRenderer.options(name=names["renderer"], **cfg.ray.renderer.ray_options()).remote(
            cfg.to_dict(), validation_prompts, validation_seeds
        ))

    def dataset_factory() -> ray.data.Dataset:
        # Called by Ray Train before each worker-group start, before the train loop runs: the
        # store forgets the lost versions (rank 0 republishes the checkpoint's) and the ledger sets
        # the redone rounds' earlier counts apart.
        found = resume_checkpoint(run_dir, cfg.run.resume)
        position = read_progress(found).position if found else 0
        ray.get(store.reset.remote())
        generation = ray.get(ledger.begin_stream.remote(position))
        return build_pair_stream(cfg, prompts, position, generation)

    trainer = torch_trainer(
        train_loop_per_worker,
        {"cfg": cfg.to_dict(), "prompts": prompts},
        resources=cfg.ray.trainer, num_workers=cfg.ray.num_trainers, run_name=cfg.run.name, run_dir=run_dir,
        datasets={"pairs": dataset_factory}, dataset_config=make_split(),
        # A dead trainer worker: the group restarts, resumes from the latest checkpoint, and the
        # stream is rebuilt from that checkpoint's prompt position (dataset_factory).
        max_failures=cfg.ray.max_failures,
    )
    started = time.time()
    # SIGTERM (`ray job stop`) or Ctrl-C: the trainer finishes its round, checkpoints and stops.
    interrupt = GracefulInterrupt(on_request=lambda reason: ledger.request_stop.remote(reason))
    try:
        trainer.fit()
    finally:
        interrupt.restore()
    totals = ray.get(ledger.totals.remote())
    gate = ray.get(store.stats.remote())
    trainer_summary = json.loads((run_dir / "trainer_summary.json").read_text())
    t = trainer_summary["trainer_accounting"]
    accounting = Accounting(
        prompts=totals["prompts"], scoring_events=totals["scoring_events"], kept=totals["kept"],
        rejected=totals["rejected"], dropped_nonfinite=totals["nonfinite"], trained=t["trained"], dropped_rank_balance=t["dropped_rank_balance"],
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
    log.info("accounting: %s", accounting.summary())
    for actor in coordinators:
        ray.kill(actor)
    return result
