"""The SPM-training driver: inputs checked, the render stream per split, the TorchTrainer, the summary."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from spo_ray import rng
from spo_ray.checkpointing import (
    extra_shards,
    latest_checkpoint,
    mlflow_run_to_continue,
    read_progress,
    remove_stale_temporaries,
    resume_changes,
)
from spo_ray.preflight import InputError
from spo_ray.ray.common import make_split, torch_trainer
from spo_ray.run_log import cut_redone
from spo_ray.spm_training.config import FROZEN_ON_RESUME, PICKAPIC_COLUMNS, PLAIN_COLUMNS, SPMConfig
from spo_ray.spm_training.data import PreferenceSource, inspect_splits, tag_examples
from spo_ray.spm_training.render import X0Renderer
from spo_ray.spm_training.trainer import consumed_by_epoch, spm_train_loop

log = logging.getLogger(__name__)

def _read_ray_dataset(src: PreferenceSource):
    import ray.data

    if src.fmt == "parquet":
        cols = list(PICKAPIC_COLUMNS if src.layout == "pickapic" else PLAIN_COLUMNS)
        return ray.data.read_parquet(src.files, columns=cols)
    if src.fmt == "json":
        return ray.data.read_json(src.files, lines=True, file_extensions=None)
    return ray.data.read_csv(src.files)


def build_stream(cfg: SPMConfig, src: PreferenceSource, split: str, consumed: dict[int, np.ndarray] | None = None):
    """Tagged rows (all epochs for ``train``) -> the renderer actor pool -> SPM-ready rows. A resumed
    run's ``consumed`` rows (sorted example ids per epoch) are dropped before rendering; an epoch
    trained on in full is not read at all."""
    import ray.data

    consumed = consumed or {}

    kwargs = dict(
        layout=src.layout, split=split, seed=cfg.train.seed, prompt_counts=src.prompt_counts,
        eval_fraction=cfg.data.eval_fraction if cfg.data.eval is None else 0.0, image_root=src.image_root,
        bucket_edges=cfg.eval.bucket_edges, timesteps_per_bucket=cfg.eval.timesteps_per_bucket,
    )
    epochs = range(cfg.train.epochs) if split == "train" else [-1]
    parts = []
    for epoch in epochs:
        done = consumed.get(epoch)
        if done is not None and len(done) >= src.num_examples:
            continue
        ds = _read_ray_dataset(src)
        if split == "train":  # a different block order every epoch (a cheap, seeded shuffle)
            ds = ds.randomize_block_order(seed=rng.derive_seed("spm-blocks", cfg.train.seed, epoch) % 2**31)
        parts.append(ds.map_batches(tag_examples, batch_format="pandas", fn_kwargs={**kwargs, "epoch": epoch, "consumed": done}))
    if not parts:  # every epoch was trained on before the checkpoint: an empty stream, the trainer goes to eval
        parts = [_read_ray_dataset(src).limit(0).map_batches(tag_examples, batch_format="pandas", fn_kwargs={**kwargs, "epoch": 0})]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
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
