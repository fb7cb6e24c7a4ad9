"""The paper's table (markdown, CSV), per-image scores and base-vs-tuned grids."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from spo_ray.evaluation.config import DECIMALS, METRICS, EvalConfig

log = logging.getLogger(__name__)

def summarize(records: list[dict[str, Any]], models: list[str], metrics: list[str]) -> dict[str, dict[str, Any]]:
    """{model: {"n": images, metric: {"mean", "std" (sample), "n"}}}."""
    out: dict[str, dict[str, Any]] = {}
    for model in models:
        mine = [r for r in records if r["model"] == model]
        stats: dict[str, Any] = {"n": len(mine)}
        for metric in metrics:
            values = np.array([r[metric] for r in mine], dtype=np.float64)
            stats[metric] = {
                "mean": float(values.mean()) if len(values) else math.nan,
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "n": len(values),
            }
        out[model] = stats
    return out


def format_markdown(cfg: EvalConfig, stats: dict[str, dict[str, Any]], skipped: dict[str, str], num_prompts: int) -> str:
    """The paper's table: rows = models, columns = PickScore, HPSv2, ImageReward, Aesthetic, CLIP (mean ± std)."""
    s = cfg.sampling
    lines = [
        f"# Evaluation: {cfg.run.name}",
        "",
        f"Base `{cfg.model.pretrained}` ({cfg.model.kind}); {num_prompts} prompts from `{cfg.data.prompt_file}` x "
        f"seeds {s.seeds}; DDIM {s.num_steps} steps, eta {s.eta}, CFG {s.guidance_scale}. Cells: mean ± std over n images.",
        "",
        "| model | n | " + " | ".join(METRICS.values()) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for model, row in stats.items():
        cells = []
        for metric in METRICS:
            if metric in row:
                d = DECIMALS[metric]
                cells.append(f"{row[metric]['mean']:.{d}f} ± {row[metric]['std']:.{d}f}")
            else:
                cells.append("-")
        lines.append(f"| {model} | {row['n']} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Skipped scorers:"] + [f"- skipped: {METRICS[m]} - {why}" for m, why in skipped.items()]
    return "\n".join(lines) + "\n"


def write_results_csv(path: Path, stats: dict[str, dict[str, Any]]) -> Path:
    """One row per model: n, then <metric>_mean / <metric>_std for every column (empty when skipped)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "n"] + [f"{m}_{k}" for m in METRICS for k in ("mean", "std")])
        for model, row in stats.items():
            values = [(row[m]["mean"], row[m]["std"]) if m in row else ("", "") for m in METRICS]
            writer.writerow([model, row["n"], *[v for pair in values for v in pair]])
    return path


def write_scores_csv(path: Path, records: list[dict[str, Any]], metrics: list[str]) -> Path:
    """Per image: model, prompt id, seed, every metric, prompt (for paired comparisons)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "prompt_id", "seed", *metrics, "prompt"])
        for r in records:
            writer.writerow([r["model"], r["prompt_id"], r["seed"], *[r[m] for m in metrics], r["prompt"]])
    return path


def comparison_grid(
    images: dict[tuple[str, int, int], np.ndarray], base: str, tuned: str, prompt_ids: list[int], seeds: list[int]
) -> Any:
    """A PIL grid: one column per prompt; per seed a row of the base model above a row of the tuned one.

    Size (rendering.image_grid): ``(len(prompt_ids) * (W + 2) + 2, 2 * len(seeds) * (H + 2) + 2)``.
    """
    from spo_ray.rendering import image_grid

    tiles = [images[(model, pid, seed)] for seed in seeds for model in (base, tuned) for pid in prompt_ids]
    array = np.stack(tiles).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0  # back to [-1, 1], exactly
    return image_grid(array, nrow=len(prompt_ids))


def write_over_training(out: Path, stats: dict[str, dict[str, Any]], metrics: list[str], base: str,
                        final_round: int | None) -> tuple[Path, Path]:
    """``checkpoints_of``: each metric's mean (error bars: std) against the training round of the
    base model (0), each checkpoint (``round-NNNNNNN``) and ``final`` (at ``final_round``), as
    ``over_training.csv`` and ``over_training.png``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    points = [(0, base)] + sorted((int(name.removeprefix("round-")), name) for name in stats if name.startswith("round-"))
    if "final" in stats and final_round is not None:
        points.append((final_round, "final"))
    csv_path, png_path = out / "over_training.csv", out / "over_training.png"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["round", "model", *[f"{m}_mean" for m in metrics], *[f"{m}_std" for m in metrics]])
        for position, name in points:
            writer.writerow([position, name, *[stats[name][m]["mean"] for m in metrics],
                             *[stats[name][m]["std"] for m in metrics]])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.errorbar([p for p, _ in points], [stats[n][metric]["mean"] for _, n in points],
                    yerr=[stats[n][metric]["std"] for _, n in points], marker="o", capsize=3)
        ax.set_title(METRICS.get(metric, metric))
        ax.set_xlabel("training round (base model: 0)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return csv_path, png_path
