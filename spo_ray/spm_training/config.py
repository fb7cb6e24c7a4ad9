"""The SPM-training config: the frozen base model, the SPM, the data, training, evaluation, Ray roles."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spo_ray.config import (
    ConfigError,
    ConfigRoot,
    RoleResources,
    TrackingConfig,
    _merge,
    common_problems,
    layer_config,
)

log = logging.getLogger(__name__)

NUM_TIMESTEPS = 1000  # t ~ U{0..999}: the SD1.5 / SDXL training schedules
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
PLAIN_COLUMNS = ("prompt", "image_0", "image_1", "label")
LAYOUTS = ("auto", "pickapic", "plain")
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
CHECKPOINT_NAME = "step-aware_preference_model"
# What a resume may not change: the rows, their rendering (its chunk size too: the kernels' rounding
# depends on it), their order and the batches they form (data.eval, the held-out pairs, may change:
# it is read only after training).
FROZEN_ON_RESUME = ("model.", "spm.", "data.train", "data.eval_fraction", "data.layout", "data.image_root", "data.relabel.",
                    "train.seed", "train.batch_size", "train.grad_accum_steps", "train.shuffle_buffer", "ray.num_trainers",
                    "ray.render_batch_size")




@dataclass
class BaseModelConfig:
    """The frozen diffusion model whose one-step x0 predictions the SPM learns to judge."""

    kind: str = "sd15"
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # local dir, hub id, or tiny:<kind>
    vae: str | None = None
    resolution: int | None = None  # VAE input size (images are resized straight to it); None = native
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "fp32" | "bf16" | "fp16"
    guidance_scale: float = 5.0


@dataclass
class NetConfig:
    """The SPM being trained: a CLIP (PickScore) directory, optionally an SPM checkpoint to start from."""

    clip_dir: str = "tiny"
    processor_dir: str | None = None  # tokenizer / image normalisation, if clip_dir lacks them
    init_checkpoint: str | None = None
    image_size: int = 224


@dataclass
class RelabelConfig:
    """SDXL SPM: relabel pairs with a clean-image scorer (softmax gap > ``gap`` wins, else a tie)."""

    enabled: bool = False
    scorer: str = "clip"  # "clip" (PickScore) | "spm" (an SPM at t = 0)
    clip_dir: str | None = None
    checkpoint: str | None = None
    gap: float = 0.1


@dataclass
class SPMDataConfig:
    train: str = ""  # a file, a directory of files or a glob (.parquet, .jsonl/.json, .csv)
    eval: str | None = None  # held-out pairs; None = hold out ``eval_fraction`` of the prompts
    eval_fraction: float = 0.0
    layout: str = "auto"  # "auto" | "pickapic" | "plain"
    image_root: str | None = None  # plain layout: image paths are relative to this (default: the file's dir)
    relabel: RelabelConfig = field(default_factory=RelabelConfig)


@dataclass
class SPMTrainConfig:
    learning_rate: float = 3e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.3
    adam_epsilon: float = 1e-8
    lr_warmup_steps: int = 500
    batch_size: int = 16  # pairs per micro-batch per trainer worker
    grad_accum_steps: int = 1
    max_grad_norm: float | None = None
    mixed_precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "fp32" | "bf16"
    epochs: int = 1
    seed: int = 42
    shuffle_buffer: int = 256  # rows; a keyed shuffle on top of each epoch's seeded read order
    max_nonfinite_steps: int = 5  # this many skipped (non-finite) steps in a row stop the run


@dataclass
class SPMEvalConfig:
    bucket_edges: list[int] = field(default_factory=lambda: [0, 200, 400, 600, 800, 1000])
    timesteps_per_bucket: int = 1  # each held-out pair is judged at this many t in every bucket
    batch_size: int = 64
    include_initial: bool = False  # also score the held-out rows with the untrained SPM (a second copy)


@dataclass
class SPMRayConfig:
    address: str | None = None
    num_renderers: int = 1
    num_trainers: int = 1
    zero_stage: int = 2
    render_batch_size: int = 16
    renderer: RoleResources = field(default_factory=RoleResources)
    trainer: RoleResources = field(default_factory=RoleResources)
    torch_threads_per_actor: int | None = None


@dataclass
class SPMRunConfig:
    name: str = "spm"
    output_dir: str = "runs"
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    log_every: int = 10  # optimizer steps between progress lines
    checkpoint_every: int = 500  # optimizer steps between checkpoints (0: none); a restart resumes the latest
    keep_checkpoints: int = 2
    resume: str = "auto"  # "auto": continue the run's latest checkpoint | "never": a run directory with one is an error


@dataclass
class SPMConfig(ConfigRoot):
    preset: str = ""
    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    spm: NetConfig = field(default_factory=NetConfig)
    data: SPMDataConfig = field(default_factory=SPMDataConfig)
    train: SPMTrainConfig = field(default_factory=SPMTrainConfig)
    eval: SPMEvalConfig = field(default_factory=SPMEvalConfig)
    ray: SPMRayConfig = field(default_factory=SPMRayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow, as SPO runs log (one store per output dir)
    run: SPMRunConfig = field(default_factory=SPMRunConfig)


def _absolute(path: str | None) -> str | None:
    # A job's working directory is a temporary copy: paths must not depend on it.
    if not path or path == "tiny" or path.startswith("tiny:"):
        return path
    return str(Path(path).expanduser().resolve())


def _local(path: str | None) -> str | None:
    """Absolute if it exists here (a local model directory); else unchanged ("tiny", a hub id)."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def load_spm_config(
    preset: str | None = None, *, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> SPMConfig:
    """Preset (``spm-sd15`` / ``spm-sdxl`` / ``spm-tiny`` or a YAML path), then a YAML file, then dotted
    overrides; unknown keys and impossible values raise :class:`ConfigError` (all values at once)."""
    cfg = layer_config(SPMConfig(), "spm", preset, config_file, overrides)
    d = cfg.data
    d.train, d.eval, d.image_root = _absolute(d.train) or "", _absolute(d.eval), _absolute(d.image_root)
    n, rl = cfg.spm, d.relabel
    n.clip_dir, n.processor_dir, n.init_checkpoint = _local(n.clip_dir) or "", _local(n.processor_dir), _local(n.init_checkpoint)
    rl.clip_dir, rl.checkpoint = _local(rl.clip_dir), _local(rl.checkpoint)
    validate_spm_config(cfg)
    return cfg


def spm_config_from_dict(data: dict[str, Any]) -> SPMConfig:
    """Rebuild a config from ``to_dict()`` output (shipped to Ray actors and trainer workers)."""
    cfg = SPMConfig()
    _merge(cfg, data, "")
    validate_spm_config(cfg)
    return cfg


def validate_spm_config(cfg: SPMConfig) -> None:
    """Raise ConfigError listing every impossible value, before any data, model or cluster is touched."""
    m, d, t, e, r = cfg.model, cfg.data, cfg.train, cfg.eval, cfg.ray
    edges = e.bucket_edges
    checks: list[tuple[bool, str]] = [
        (m.guidance_scale >= 1, f"model.guidance_scale must be >= 1, got {m.guidance_scale}"),
        (bool(cfg.spm.clip_dir), "spm.clip_dir must be set (a local CLIP/PickScore directory, or 'tiny')"),
        (cfg.spm.image_size > 0, f"spm.image_size must be > 0, got {cfg.spm.image_size}"),
        (bool(d.train), "data.train must be set (a preference file, directory or glob)"),
        (0 <= d.eval_fraction < 1, f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}"),
        (d.eval is None or d.eval_fraction == 0, "set data.eval or data.eval_fraction, not both"),
        (d.layout in LAYOUTS, f"data.layout must be one of {', '.join(LAYOUTS)}, got {d.layout!r}"),
        (d.relabel.scorer in ("clip", "spm"), f"data.relabel.scorer must be clip or spm, got {d.relabel.scorer!r}"),
        (not d.relabel.enabled or bool(d.relabel.clip_dir), "data.relabel.clip_dir is required when relabelling"),
        (0 <= d.relabel.gap < 1, f"data.relabel.gap must be in [0, 1), got {d.relabel.gap}"),
        (t.learning_rate > 0, f"train.learning_rate must be > 0, got {t.learning_rate}"),
        (0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1, "train.adam_beta1/adam_beta2 must be in [0, 1)"),
        (t.adam_weight_decay >= 0, f"train.adam_weight_decay must be >= 0, got {t.adam_weight_decay}"),
        (t.adam_epsilon > 0, f"train.adam_epsilon must be > 0, got {t.adam_epsilon}"),
        (t.lr_warmup_steps >= 0, f"train.lr_warmup_steps must be >= 0, got {t.lr_warmup_steps}"),
        (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
        (t.grad_accum_steps >= 1, f"train.grad_accum_steps must be >= 1, got {t.grad_accum_steps}"),
        (t.max_grad_norm is None or t.max_grad_norm > 0, f"train.max_grad_norm must be > 0 or null, got {t.max_grad_norm}"),
        (t.mixed_precision in ("auto", "fp32", "bf16"), f"train.mixed_precision must be auto/fp32/bf16, got {t.mixed_precision!r}"),
        (t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}"),
        (t.seed >= 0, f"train.seed must be >= 0, got {t.seed}"),
        (t.shuffle_buffer >= 0, f"train.shuffle_buffer must be >= 0, got {t.shuffle_buffer}"),
        (t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}"),
        (len(edges) >= 2 and edges[0] == 0 and edges[-1] == NUM_TIMESTEPS and all(a < b for a, b in zip(edges, edges[1:], strict=False)),
         f"eval.bucket_edges must increase strictly from 0 to {NUM_TIMESTEPS}, got {edges}"),
        (e.timesteps_per_bucket >= 1, f"eval.timesteps_per_bucket must be >= 1, got {e.timesteps_per_bucket}"),
        (e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}"),
        (r.num_renderers >= 1 and r.num_trainers >= 1, "ray.num_renderers and ray.num_trainers must be >= 1"),
        # ZeRO-3 would partition logit_scale, which the score reads outside a submodule forward; the SPM fits.
        (r.zero_stage in (0, 1, 2), f"ray.zero_stage must be 0, 1 or 2 for the SPM, got {r.zero_stage}"),
        (r.render_batch_size >= 1, f"ray.render_batch_size must be >= 1, got {r.render_batch_size}"),
        (cfg.run.log_every >= 1, f"run.log_every must be >= 1, got {cfg.run.log_every}"),
        (cfg.run.checkpoint_every >= 0, f"run.checkpoint_every must be >= 0, got {cfg.run.checkpoint_every}"),
        (cfg.run.keep_checkpoints >= 1, f"run.keep_checkpoints must be >= 1, got {cfg.run.keep_checkpoints}"),
        (cfg.run.resume in ("auto", "never"), f"run.resume must be auto or never, got {cfg.run.resume!r}"),
    ]
    problems = common_problems(cfg) + [message for ok, message in checks if not ok]
    for role in ("renderer", "trainer"):
        problems += getattr(r, role).problems(f"ray.{role}")
    if problems:
        raise ConfigError("invalid SPM config:\n  - " + "\n  - ".join(problems))
