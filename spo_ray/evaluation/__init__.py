"""Evaluation in the paper's format: base model vs tuned LoRAs / UNets, as a Ray Data batch-inference job.

    rows (model, prompt id, prompt, seed), model-major
      -> map_batches(GenerationWorker, actor pool)  DDIM + CFG (generate_latents), VAE decode -> uint8 images
      -> map_batches(ScoringWorker, actor pool)     every configured metric scorer -> score_<metric> columns
      -> driver: PNGs, per-image scores, the table (markdown, CSV, MLflow), base-vs-tuned grids

The protocol (``presets/eval-paper.yaml``): DDIM, CFG 5.0, 20 steps, fixed seeds. Noise is keyed by the
seed alone (``sampling.generate_latents``), so the base model and every tuned model see the same noise,
whatever actor or batch an image lands in. Metrics, as the paper's table (DESIGN.md, "Results the paper
reports"): PickScore (``logit_scale.exp() * cosine``), HPSv2 (100 x cosine, its package), ImageReward
(its package), LAION aesthetic (CLIP ViT-L/14 + the improved-aesthetic-predictor head) and CLIP score
(torchmetrics' convention, ``100 * max(cosine, 0)``). A metric that is not configured, or whose package
is not importable, is skipped with one ``skipped:`` line; a configured path that does not exist is an error.
Nothing downloads: every model loads from a local directory or file.

Config: a dataclass tree like the training config (presets, ``--config``, dotted overrides; unknown keys
and impossible values are errors before any cluster resource). ``tuned.NAME=PATH`` adds a tuned model.
"""

from spo_ray.evaluation.config import (
    METRICS,
    EvalConfig,
    EvalInputError,
    eval_config_from_dict,
    load_eval_config,
)
from spo_ray.evaluation.driver import run_evaluation
from spo_ray.evaluation.inputs import EvalPlan, ModelSpec, prepare_evaluation, resolve_model_spec
from spo_ray.evaluation.workers import GenerationWorker, ScoringWorker

__all__ = [
    "METRICS", "EvalConfig", "EvalInputError", "EvalPlan", "GenerationWorker", "ModelSpec", "ScoringWorker",
    "eval_config_from_dict", "load_eval_config", "prepare_evaluation", "resolve_model_spec", "run_evaluation",
]
