"""The evaluation driver: inputs checked, the Ray Data job, the outputs, MLflow."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from spo_ray.evaluation.config import METRICS, EvalConfig
from spo_ray.evaluation.inputs import prepare_evaluation
from spo_ray.evaluation.report import (
    comparison_grid,
    format_markdown,
    summarize,
    write_over_training,
    write_results_csv,
    write_scores_csv,
)
from spo_ray.evaluation.workers import build_eval_dataset

log = logging.getLogger(__name__)

def _log(cfg: EvalConfig, message: str) -> None:
    if cfg.run.progress:
        log.info("%s", message)


def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    """Generate, score and report on the Ray cluster this process is connected to (or a local one)."""
    import ray
    import yaml
    from PIL import Image

    from spo_ray.tracking import check_reachable, resolve_tracking_uri

    started = time.time()
    plan = prepare_evaluation(cfg)  # bad input fails here, before any cluster resource
    if cfg.tracking.enabled:
        check_reachable(resolve_tracking_uri(cfg))  # an unreachable MLflow server fails fast
    for metric, why in plan.skipped.items():
        log.warning("skipped: %s - %s", METRICS[metric], why)
    if not plan.metrics:
        log.warning("no scorer is available: images and grids only")
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    models = [s.name for s in plan.specs]
    seeds = list(cfg.sampling.seeds)
    grid_pids = list(range(min(cfg.run.grid_prompts, len(plan.prompts))))
    grid_seeds = seeds[: cfg.run.grid_seeds]
    total = len(models) * len(plan.prompts) * len(seeds)
    _log(cfg, f"{len(models)} models ({', '.join(models)}) x {len(plan.prompts)} prompts x {len(seeds)} seeds = "
              f"{total} images; metrics: {', '.join(METRICS[m] for m in plan.metrics) or 'none'}")

    from spo_ray.components import connect_ray

    connect_ray(cfg.ray.address)
    ray.data.DataContext.get_current().enable_progress_bars = False  # one progress line of our own instead
    ds = build_eval_dataset(cfg, plan)

    records: list[dict[str, Any]] = []
    grid_images: dict[tuple[str, int, int], np.ndarray] = {}
    last_report = 0.0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["model"])):
            key = (str(batch["model"][i]), int(batch["prompt_id"][i]), int(batch["seed"][i]))
            record = {"model": key[0], "prompt_id": key[1], "seed": key[2], "prompt": str(batch["prompt"][i])}
            record.update({m: float(batch[f"score_{m}"][i]) for m in plan.metrics})
            records.append(record)
            if cfg.run.save_images:
                folder = run_dir / "images" / key[0]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(batch["image"][i]).save(folder / f"{key[1]:05d}_{key[2]}.png")
            if key[1] in grid_pids and key[2] in grid_seeds:
                grid_images[key] = np.array(batch["image"][i])
        now = time.time()
        if now - last_report > 10 or len(records) == total:
            last_report = now
            rate = len(records) / max(now - started, 1e-9)
            _log(cfg, f"{len(records)}/{total} images generated and scored ({100 * len(records) / total:.0f}%), "
                      f"{rate:.2f} images/s")
    order = {name: i for i, name in enumerate(models)}
    records.sort(key=lambda r: (order[r["model"]], r["prompt_id"], r["seed"]))

    stats = summarize(records, models, plan.metrics)
    table = format_markdown(cfg, stats, plan.skipped, len(plan.prompts))
    (run_dir / "results.md").write_text(table)
    write_results_csv(run_dir / "results.csv", stats)
    write_scores_csv(run_dir / "scores.csv", records, plan.metrics)
    if cfg.checkpoints_of:
        finished = Path(cfg.checkpoints_of) / "summary.json"
        final_round = json.loads(finished.read_text())["position"] if finished.is_file() else None
        curve = write_over_training(run_dir, stats, plan.metrics, cfg.base_name, final_round)
        _log(cfg, f"over training: {curve[0]}, {curve[1]}")
    grids = []
    (run_dir / "grids").mkdir(exist_ok=True)
    for name in models[1:]:
        path = run_dir / "grids" / f"{cfg.base_name}_vs_{name}.png"
        comparison_grid(grid_images, cfg.base_name, name, grid_pids, grid_seeds).save(path)
        grids.append(str(path))
    summary = {
        "models": {s.name: dataclasses.asdict(s) for s in plan.specs},
        "metrics": plan.metrics,
        "skipped": plan.skipped,
        "prompts": len(plan.prompts),
        "seeds": seeds,
        "images": len(records),
        "results": stats,
        "grids": grids,
        "seconds": time.time() - started,
        "mlflow_run_id": None,
    }
    if cfg.tracking.enabled:
        summary["mlflow_run_id"] = _track(cfg, stats, run_dir, models)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table, flush=True)
    _log(cfg, f"done in {summary['seconds']:.0f}s: {run_dir / 'results.md'}, {run_dir / 'results.csv'}, grids in {run_dir / 'grids'}")
    return summary


def _track(cfg: EvalConfig, stats: dict[str, dict[str, Any]], run_dir: Path, models: list[str]) -> str | None:
    """One MLflow run: the config as params, ``eval/<model>/<metric>`` means (and ``eval/<model>/n``),
    the table, the per-image scores and the grids as artifacts."""
    from spo_ray.tracking import RunTracker

    tracker = RunTracker(cfg, engine="ray-eval")  # duck-typed: EvalConfig has the fields it reads
    run_id = tracker.start()
    status = "FAILED"
    try:
        tracker.set_tags({"spo_ray.kind": "evaluation", "eval.models": ",".join(models)})
        metrics: dict[str, float] = {}
        for model, row in stats.items():
            metrics[f"eval/{model}/n"] = row["n"]
            metrics.update({f"eval/{model}/{m}": row[m]["mean"] for m in METRICS if m in row})
        tracker.log_metrics(metrics, step=0)
        for name in ("results.md", "results.csv", "scores.csv", "summary.json"):
            if (run_dir / name).is_file():
                tracker.log_artifact(run_dir / name)
        tracker.log_artifact(run_dir / "grids", "grids")
        status = "FINISHED"
    finally:
        tracker.end(status)
    return run_id
