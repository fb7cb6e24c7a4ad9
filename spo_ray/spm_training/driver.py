"""The SPM-training driver: inputs checked, the render stream per split, the TorchTrainer, the summary."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from spo_ray.checkpointing import (
    extra_shards,
    latest_checkpoint,
    mlflow_run_to_continue,
    read_progress,
    remove_stale_temporaries,
)
from spo_ray.preflight import InputError
from spo_ray.ray.common import make_split, torch_trainer
from spo_ray.run_log import cut_redone, resume_changes
from spo_ray.spm_training.config import FROZEN_ON_RESUME, SPMConfig
from spo_ray.spm_training.data import PreferenceSource, inspect_splits, read_and_tag, read_plan
from spo_ray.spm_training.render import X0Renderer
from spo_ray.spm_training.trainer import consumed_by_epoch, spm_train_loop

log = logging.getLogger(__name__)

def build_stream(cfg: SPMConfig, src: PreferenceSource, split: str, consumed: dict[int, np.ndarray] | None = None):
    """Read-and-tag tasks (every epoch of ``train`` in order, each epoch's files and row groups in a
    seeded order) -> the renderer actor pool -> SPM-ready rows. A resumed run's ``consumed`` rows
    (sorted example ids per epoch) are dropped before rendering; an epoch trained on in full is not
    read at all.

    Reading is plain pyarrow in Ray Data tasks (one task per parquet row group or file, in chunks of
    256 rows), not ``ray.data.read_parquet``: a union of per-epoch reads interleaves the epochs block
    by block, and Ray 2.60's parquet reader starts 32 footer-reader actors per read (measured:
    docs/spm-training.md, "Reading")."""
    import ray.data

    consumed = consumed or {}
    items = read_plan(src.units, split=split, epochs=cfg.train.epochs, consumed=consumed,
                      num_examples=src.num_examples, seed=cfg.train.seed)
    # Every read task receives its kwargs: only the consumed ids of the epochs it reads (8 B a row;
    # mid-epoch 3 of Pick-a-Pic v2 ~4 MB of the run's ~20 MB, the epochs trained in full left out).
    read_epochs = {item["epoch"] for item in items}
    consumed = {epoch: ids for epoch, ids in consumed.items() if epoch in read_epochs}
    tag_kwargs = dict(
        fmt=src.fmt, layout=src.layout, split=split, seed=cfg.train.seed, prompt_counts=src.prompt_counts,
        eval_fraction=cfg.data.eval_fraction if cfg.data.eval is None else 0.0, image_root=src.image_root,
        bucket_edges=cfg.eval.bucket_edges, timesteps_per_bucket=cfg.eval.timesteps_per_bucket, consumed=consumed,
    )
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(read_and_tag, batch_size=1, batch_format="pandas", fn_kwargs=tag_kwargs)
    return ds.map_batches(
        X0Renderer,
        fn_constructor_kwargs={"cfg_dict": cfg.to_dict()},
        batch_size=cfg.ray.render_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_renderers),
        **cfg.ray.renderer.ray_options(),
    )


def _resume_point(cfg: SPMConfig) -> tuple[Path | None, dict[int, np.ndarray]]:
    """The checkpoint this start continues (``run.resume=auto``: the run's latest) and the rows it
    trained on; errors (``run.resume=never`` over a run with checkpoints, a setting a resume cannot
    change) before any cluster resource."""
    stale = remove_stale_temporaries(cfg.run_dir)
    if stale:
        log.info("removed %d incomplete checkpoint folder(s) a crash left: %s", len(stale), ", ".join(map(str, stale)))
    resumed = latest_checkpoint(cfg.run_dir)
    if resumed is None:
        return None, {}
    if cfg.run.resume == "never":
        raise InputError(f"run.resume=never but {cfg.run_dir} already holds checkpoints (latest {resumed.name}): "
                         "choose another run.name or run.output_dir, or run.resume=auto to continue it")
    try:
        resume_changes(cfg, FROZEN_ON_RESUME)
    except ValueError as err:  # a user's to fix: the entry point prints it, no traceback
        raise InputError(str(err)) from err
    consumed = consumed_by_epoch(extra_shards(resumed))
    log.info("%s: resuming from %s (step %d; %d rows already trained on are skipped, not rendered)",
             cfg.run.name, resumed, read_progress(resumed).position, sum(len(v) for v in consumed.values()))
    return resumed, consumed


def run_spm_training(cfg: SPMConfig) -> dict[str, Any]:
    """Train an SPM on the Ray cluster this process is connected to (or a local one); returns the summary."""
    import yaml

    train_src, eval_src = inspect_splits(cfg)  # bad data fails here, before any cluster resource
    if cfg.tracking.enabled:
        from spo_ray.tracking import check_reachable, resolve_tracking_uri

        check_reachable(resolve_tracking_uri(cfg))  # an unreachable MLflow server fails here too
    resumed, consumed = _resume_point(cfg)  # and a resume that cannot be exact
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if resumed is None:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    else:
        cut_redone(run_dir / "metrics.jsonl", "step", read_progress(resumed).position + 1)
    log.info("%s: %d training pairs (%d ties, %d prompts, %s layout) x %d epoch(s); held-out pairs: %d",
             cfg.run.name, train_src.num_examples, train_src.num_ties, len(train_src.prompt_counts), train_src.layout,
             cfg.train.epochs, eval_src.num_examples if eval_src else 0)
    from spo_ray.components import connect_ray

    connect_ray(cfg.ray.address)
    datasets = {"train": build_stream(cfg, train_src, "train", consumed)}
    if eval_src is not None:
        datasets["eval"] = build_stream(cfg, eval_src, "eval")
    for ds in datasets.values():
        ds.context.execution_no_progress_timeout_s = -1  # the trainer consumes eval only at the end
        ds.context.enable_progress_bars = False  # a line per update in `ray job logs`; the trainer logs progress
    # Training rows split equally (every rank takes the same number of DeepSpeed steps) and in order (the
    # epochs one after another; with one worker a run is a pure function of data and seeds); held-out
    # rows split without dropping any (eval sums are reduced over ranks).
    trainer = torch_trainer(
        spm_train_loop, {"cfg": cfg.to_dict(), "has_eval": eval_src is not None,
                         "resume_from": str(resumed) if resumed else None,
                         "mlflow_run_id": mlflow_run_to_continue(run_dir, resumed)},
        resources=cfg.ray.trainer, num_workers=cfg.ray.num_trainers, run_name=cfg.run.name, run_dir=run_dir,
        datasets=datasets, dataset_config=make_split(equal=lambda name: name == "train", in_order=lambda name: name == "train"),
    )
    started = time.time()
    trainer.fit()
    summary = {
        "run_dir": str(run_dir),
        **json.loads((run_dir / "trainer_summary.json").read_text()),
        "data": {
            "layout": train_src.layout, "train_pairs": train_src.num_examples, "train_ties": train_src.num_ties,
            "train_prompts": len(train_src.prompt_counts), "eval_pairs": eval_src.num_examples if eval_src else 0,
            "relabelled": cfg.data.relabel.enabled,
        },
        "seconds": time.time() - started,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
