"""``spo-ray compare``: several tracked runs side by side.

    spo-ray compare [--experiment NAME] [--runs ID ...] [--tracking-uri URI] [--out DIR]
                    [--metrics loss mean_score ...]

With neither --experiment nor --runs, the runs of experiment ``spo-ray`` (the default) are compared.

Prints one row per run (name, id prefix, preset, engine, and each metric's final and best value:
the minimum for losses, the maximum otherwise), the params that differ between the runs, writes
one PNG per metric (curves vs step, one line per run; ``eval/*`` metrics as bar charts of their
final values) and logs the table and the PNGs as artifacts of a new run ``compare-<timestamp>``
in the runs' experiment.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_METRICS = ("loss", "mean_score")
COMPARISON_TAG = "spo_ray.kind"
COMPARISON_KIND = "comparison"
FALLBACK_EXPERIMENT = "spo-ray-comparisons"
DEFAULT_EXPERIMENT = "spo-ray"  # tracking.experiment's default: compared when no runs are named


class CompareError(RuntimeError):
    """Nothing to compare (no tracking URI, unknown experiment, no matching runs)."""


@dataclass
class RunCurves:
    run_id: str
    name: str
    experiment_id: str
    tags: dict[str, str]
    params: dict[str, str]
    metric_keys: list[str] = field(default_factory=list)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]


@dataclass
class Comparison:
    runs: list[RunCurves]
    metrics: list[str]
    table: str
    plots: list[Path]
    out_dir: Path
    comparison_run_id: str | None


def lower_is_better(metric: str) -> bool:
    return "loss" in metric.lower()


def best_value(metric: str, values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan
    return min(finite) if lower_is_better(metric) else max(finite)


def fetch_runs(client: Any, *, experiment: str | None, run_ids: list[str] | None) -> list[RunCurves]:
    """Every training run of ``experiment`` (oldest first, comparison runs left out) plus the runs
    named by ``run_ids`` (each once)."""
    runs: list[Any] = []
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise CompareError(f"experiment '{experiment}' not found")
        for run in client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000):
            if run.data.tags.get(COMPARISON_TAG) != COMPARISON_KIND:
                runs.append(run)
    seen = {r.info.run_id for r in runs}
    for run_id in run_ids or []:
        if run_id in seen:
            continue
        try:
            runs.append(client.get_run(run_id))
        except Exception as err:  # noqa: BLE001 - name the id in a clear error
            raise CompareError(f"run {run_id} not found: {err}") from err
        seen.add(run_id)
    return [
        RunCurves(
            run_id=r.info.run_id,
            name=r.info.run_name or r.info.run_id[:8],
            experiment_id=r.info.experiment_id,
            tags=dict(r.data.tags),
            params=dict(r.data.params),
            metric_keys=sorted(r.data.metrics),
        )
        for r in runs
    ]


def load_curves(client: Any, runs: list[RunCurves], metrics: list[str]) -> None:
    for run in runs:
        for metric in metrics:
            history = client.get_metric_history(run.run_id, metric)
            run.curves[metric] = sorted((int(m.step), float(m.value)) for m in history)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.6g}"


def format_table(runs: list[RunCurves], metrics: list[str]) -> str:
    """Plain text: one row per run; for each metric its final and best value side by side."""
    header = ["run", "id", "preset", "engine"]
    for metric in metrics:
        best = "min" if lower_is_better(metric) else "max"
        header += [f"{metric} final", f"{metric} {best}"]
    rows = [header]
    for run in runs:
        row = [run.name, run.run_id[:8], run.tags.get("preset", "-"), run.tags.get("engine", "-")]
        for metric in metrics:
            values = [v for _, v in run.curves.get(metric, [])]
            row += [_fmt(values[-1] if values else None), _fmt(best_value(metric, values) if values else None)]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    differing = differing_params(runs)
    if differing:
        lines += ["", "params that differ:"]
        for key, values in differing.items():
            lines.append(f"  {key}: " + ", ".join(f"{run.name}={value}" for run, value in zip(runs, values, strict=True)))
    return "\n".join(lines) + "\n"


def differing_params(runs: list[RunCurves]) -> dict[str, list[str]]:
    """Config params whose values are not the same in every run (run names and paths left out)."""
    keys = sorted({k for r in runs for k in r.params})
    out = {}
    for key in keys:
        if key in ("run.name", "run.output_dir"):
            continue
        values = [r.params.get(key, "-") for r in runs]
        if len(set(values)) > 1:
            out[key] = values
    return out


def file_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", metric) + ".png"


def plot_metric(runs: list[RunCurves], metric: str, path: Path) -> Path:
    """Curves vs step (one line per run), or for ``eval/*`` a bar chart of each run's final value."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if metric.startswith("eval/"):
            names = [r.name for r in runs]
            finals = [r.curves[metric][-1][1] if r.curves.get(metric) else math.nan for r in runs]
            ax.bar(range(len(runs)), finals, color=[f"C{i % 10}" for i in range(len(runs))])
            ax.set_xticks(range(len(runs)), names, rotation=20, ha="right")
            ax.set_ylabel(metric)
        else:
            for run in runs:
                points = run.curves.get(metric, [])
                if points:
                    steps, values = zip(*points, strict=True)
                    ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=run.name)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(metric)
            if any(run.curves.get(metric) for run in runs):
                ax.legend(fontsize="small")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def compare_runs(
    *,
    experiment: str | None = None,
    run_ids: list[str] | None = None,
    tracking_uri: str | None = None,
    output_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    metrics: list[str] | None = None,
    log_to_mlflow: bool = True,
) -> Comparison:
    """Fetch the runs, build the table and plots, and log them to a new comparison run."""
    from mlflow import MlflowClient

    from spo_ray.tracking import STORE_NAME, check_reachable, default_store

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        found = Path(output_dir or "runs") / STORE_NAME
        if not found.is_file():
            raise CompareError(
                f"no tracking store: {found} does not exist (runs log to <run.output_dir>/{STORE_NAME} by default); "
                "pass --output-dir, --tracking-uri or set MLFLOW_TRACKING_URI"
            )
        uri = default_store(found.parent)
    if not experiment and not run_ids:
        experiment = DEFAULT_EXPERIMENT
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    runs = fetch_runs(client, experiment=experiment, run_ids=run_ids)
    if not runs:
        what = " and ".join(
            part for part in (f"experiment '{experiment}'" if experiment else "", f"ids {run_ids}" if run_ids else "") if part
        )
        raise CompareError(f"no runs match {what} at {uri}")

    names = list(metrics) if metrics else list(DEFAULT_METRICS)
    load_curves(client, runs, names)
    # eval/* metrics are always shown when any run has them.
    eval_metrics = sorted({m for r in runs for m in r.metric_keys if m.startswith("eval/")})
    extra = [m for m in eval_metrics if m not in names]
    load_curves(client, runs, extra)
    names += extra

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir) if out_dir else Path.cwd() / f"compare-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(runs, names)
    (out / "comparison.txt").write_text(table)
    plots = [plot_metric(runs, metric, out / file_name(metric)) for metric in names]

    comparison_run_id = None
    if log_to_mlflow:
        experiment_ids = {r.experiment_id for r in runs}
        if experiment:
            experiment_id = client.get_experiment_by_name(experiment).experiment_id
        elif len(experiment_ids) == 1:
            experiment_id = experiment_ids.pop()
        else:
            found = client.get_experiment_by_name(FALLBACK_EXPERIMENT)
            experiment_id = found.experiment_id if found else client.create_experiment(FALLBACK_EXPERIMENT)
        run = client.create_run(
            experiment_id,
            run_name=f"compare-{stamp}",
            tags={COMPARISON_TAG: COMPARISON_KIND, "compared_runs": ",".join(r.run_id for r in runs)},
        )
        comparison_run_id = run.info.run_id
        try:
            client.log_text(comparison_run_id, table, "comparison.txt")
            for plot in plots:
                client.log_artifact(comparison_run_id, str(plot), "plots")
        except BaseException:
            client.set_terminated(comparison_run_id, status="FAILED")
            raise
        client.set_terminated(comparison_run_id, status="FINISHED")
    return Comparison(runs, names, table, plots, out, comparison_run_id)
