"""The evaluation config (a dataclass tree like the training config), the metrics and the input error."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spo_ray.config import (
    ConfigError,
    ConfigRoot,
    ModelConfig,
    RoleResources,
    SamplingConfig,
    TrackingConfig,
    _merge,
    common_problems,
    layer_config,
)

log = logging.getLogger(__name__)

# Metric key -> column name, in the paper's column order (CLIP last: not in the paper's table).
METRICS: dict[str, str] = {
    "pickscore": "PickScore",
    "hpsv2": "HPSv2",
    "imagereward": "ImageReward",
    "aesthetic": "Aesthetic",
    "clip": "CLIP",
}
DECIMALS = {"pickscore": 2, "hpsv2": 2, "imagereward": 4, "aesthetic": 3, "clip": 2}  # as the paper prints them
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # model names go into file names and MLflow metric keys


class EvalInputError(ValueError):
    """An input of the evaluation (tuned model dir, scorer file) is missing or unusable; all are listed."""



@dataclass
class EvalSamplingConfig:
    num_steps: int = 20
    guidance_scale: float = 5.0
    # 0 = deterministic DDIM (diffusers' pipeline default); eta > 0 adds noise keyed by the seed, so
    # fixed seeds keep it repeatable (eta = 1 is the SPO sampler's).
    eta: float = 0.0
    seeds: list[int] = field(default_factory=lambda: [42])  # one image per prompt and seed
    batch_size: int = 8  # images per generation forward


@dataclass
class EvalDataConfig:
    prompt_file: str | None = None  # .txt/.json/.jsonl/.csv/.parquet, or "demo"
    max_prompts: int | None = 500


@dataclass
class EvalScorersConfig:
    """Local paths; "tiny" for a CLIP directory means the cached tiny random CLIP. null = metric skipped."""

    pickscore_dir: str | None = None  # PickScore_v1 (a transformers CLIPModel directory)
    pickscore_processor_dir: str | None = None  # its tokenizer/preprocessor (CLIP-ViT-H-14), if not beside it
    clip_dir: str | None = None  # plain CLIP for the CLIP score (e.g. clip-vit-large-patch14)
    aesthetic_clip_dir: str | None = None  # CLIP ViT-L/14 for the LAION aesthetic score
    aesthetic_head: str | None = None  # sac+logos+ava1-l14-linearMSE.pth (or .safetensors)
    hpsv2_checkpoint: str | None = None  # HPS_v2_compressed.pt / HPS_v2.1_compressed.pt (needs `hpsv2`)
    imagereward_checkpoint: str | None = None  # ImageReward.pt (needs `image-reward`)
    imagereward_med_config: str | None = None  # its med_config.json (else the package would download it)
    batch_size: int = 32  # images per scoring batch
    dtype: str = "fp32"


@dataclass
class EvalRayConfig:
    address: str | None = None  # None = the cluster this job runs in, else a local one
    num_generators: int = 1
    num_scorers: int = 1
    generator: RoleResources = field(default_factory=RoleResources)
    scorer: RoleResources = field(default_factory=RoleResources)
    torch_threads_per_actor: int | None = None


@dataclass
class EvalRunConfig:
    name: str = "eval"
    output_dir: str = "runs"  # made absolute at load time (a job's working dir is temporary)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    save_images: bool = True  # every image as images/<model>/<prompt id>_<seed>.png
    grid_prompts: int = 4  # columns of the base-vs-tuned grids (the first prompts)
    grid_seeds: int = 2  # seed rows of the grids (the first seeds)
    progress: bool = True


@dataclass
class EvalConfig(ConfigRoot):
    """Field names mirror SPOConfig where they mean the same (model, run.device, tracking, run_dir), so the
    shared helpers (components.load_model, tracking.RunTracker) take it as they take a training config."""

    preset: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)  # the base model
    base_name: str = "base"
    tuned: dict[str, str] = field(default_factory=dict)  # name -> LoRA export dir (final/) or UNet dir
    # A training run's directory: each of its checkpoints (round-NNNNNNN, LoRA in diffusers' format)
    # and its final/ join `tuned`, and the results are also written as a curve over training.
    checkpoints_of: str | None = None
    sampling: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    scorers: EvalScorersConfig = field(default_factory=EvalScorersConfig)
    ray: EvalRayConfig = field(default_factory=EvalRayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: EvalRunConfig = field(default_factory=EvalRunConfig)

    @property
    def model_names(self) -> list[str]:
        return [self.base_name, *self.tuned]

    def sampling_config(self) -> SamplingConfig:
        """What generate_latents reads (guidance, eta) as the shared SamplingConfig."""
        s = self.sampling
        return SamplingConfig(num_steps=s.num_steps, eta=s.eta, guidance_scale=s.guidance_scale)


def load_eval_config(
    preset: str | None = None,
    *,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    validate: bool = True,
) -> EvalConfig:
    """Preset, then YAML file, then dotted overrides (``tuned.NAME=PATH`` adds one tuned model); validated."""
    cfg = layer_config(EvalConfig(), "eval", preset, config_file, overrides, accumulate=("tuned",))
    if cfg.checkpoints_of:
        cfg.tuned = {**cfg.tuned, **checkpoints_as_models(Path(cfg.checkpoints_of))}
    if validate:
        validate_eval_config(cfg)
    return cfg


def checkpoints_as_models(run_dir: Path) -> dict[str, str]:
    """A training run's checkpoints that hold a diffusers LoRA (named by their folder, in training
    order) and its final export: the models ``checkpoints_of`` evaluates."""
    from spo_ray.checkpointing import list_checkpoints
    from spo_ray.export import LORA_WEIGHT_NAME

    if not run_dir.is_dir():
        raise ConfigError(f"checkpoints_of={run_dir}: no such run directory")
    models = {p.name: str(p) for p in list_checkpoints(run_dir) if (p / LORA_WEIGHT_NAME).is_file()}
    if (run_dir / "final").is_dir():
        models["final"] = str(run_dir / "final")
    if not models:
        raise ConfigError(f"checkpoints_of={run_dir}: no checkpoint with a LoRA ({LORA_WEIGHT_NAME}) and no final/ "
                          "(full fine-tuning checkpoints are evaluated through their final/unet export)")
    return models


def eval_config_from_dict(data: dict[str, Any]) -> EvalConfig:
    """Rebuild a config from ``to_dict()`` output (shipped to the Ray actors)."""
    cfg = EvalConfig()
    _merge(cfg, data, "")
    return cfg


def validate_eval_config(cfg: EvalConfig) -> None:
    """Raise ConfigError listing every impossible value at once."""
    s, sc, r, run = cfg.sampling, cfg.scorers, cfg.ray, cfg.run
    checks: list[tuple[bool, str]] = [
        (bool(_NAME.match(cfg.base_name)), f"base_name must match {_NAME.pattern}, got {cfg.base_name!r}"),
        (s.num_steps >= 1, f"sampling.num_steps must be >= 1, got {s.num_steps}"),
        (s.guidance_scale >= 1, f"sampling.guidance_scale must be >= 1, got {s.guidance_scale}"),
        (s.eta >= 0, f"sampling.eta must be >= 0, got {s.eta}"),
        (bool(s.seeds), "sampling.seeds must not be empty"),
        (all(x >= 0 for x in s.seeds) and len(set(s.seeds)) == len(s.seeds),
         f"sampling.seeds must be distinct and >= 0, got {s.seeds}"),
        (s.batch_size >= 1, f"sampling.batch_size must be >= 1, got {s.batch_size}"),
        (bool(cfg.data.prompt_file), "data.prompt_file must be set (a prompt file, or 'demo'; the paper: the 500 "
         "Pick-a-Pic validation_unique captions)"),
        (cfg.data.max_prompts is None or cfg.data.max_prompts >= 1, f"data.max_prompts must be >= 1 or null, got {cfg.data.max_prompts}"),
        (sc.batch_size >= 1, f"scorers.batch_size must be >= 1, got {sc.batch_size}"),
        (sc.dtype in ("fp32", "bf16", "fp16"), f"scorers.dtype must be fp32/bf16/fp16, got {sc.dtype!r}"),
        (r.num_generators >= 1 and r.num_scorers >= 1, "ray.num_generators and ray.num_scorers must be >= 1"),
        (r.torch_threads_per_actor is None or r.torch_threads_per_actor >= 1, "ray.torch_threads_per_actor must be >= 1 or null"),
        (run.grid_prompts >= 1 and run.grid_seeds >= 1, "run.grid_prompts and run.grid_seeds must be >= 1"),
    ]
    for name, path in cfg.tuned.items():
        checks.append((bool(_NAME.match(name)), f"tuned model name {name!r} must match {_NAME.pattern}"))
        checks.append((name != cfg.base_name, f"tuned model name {name!r} is the base model's name"))
        checks.append((bool(path), f"tuned.{name} needs a path (a LoRA export dir or a UNet dir)"))
    problems = common_problems(cfg) + [message for ok, message in checks if not ok]
    for role in ("generator", "scorer"):
        problems += getattr(r, role).problems(f"ray.{role}")
    if problems:
        raise ConfigError("invalid evaluation config:\n  - " + "\n  - ".join(problems))
