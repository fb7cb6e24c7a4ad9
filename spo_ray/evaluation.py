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

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spo_ray.config import (
    ConfigError,
    ConfigRoot,
    ModelConfig,
    RoleResources,
    SamplingConfig,
    TrackingConfig,
    _merge,
    layer_config,
)
from spo_ray.export import LORA_WEIGHT_NAME
from spo_ray.prompts import default_prompt_file, load_prompts

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
PREFIX = "[spo-ray eval]"


class EvalInputError(ValueError):
    """An input of the evaluation (tuned model dir, scorer file) is missing or unusable; all are listed."""


# ----------------------------------------------------------------------------- config


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
    if validate:
        validate_eval_config(cfg)
    return cfg


def eval_config_from_dict(data: dict[str, Any]) -> EvalConfig:
    """Rebuild a config from ``to_dict()`` output (shipped to the Ray actors)."""
    cfg = EvalConfig()
    _merge(cfg, data, "")
    return cfg


def validate_eval_config(cfg: EvalConfig) -> None:
    """Raise ConfigError listing every impossible value at once."""
    s, sc, r, run = cfg.sampling, cfg.scorers, cfg.ray, cfg.run
    checks: list[tuple[bool, str]] = [
        (cfg.model.kind in ("sd15", "sdxl"), f"model.kind must be 'sd15' or 'sdxl', got {cfg.model.kind!r}"),
        (cfg.model.dtype in ("auto", "fp32", "bf16", "fp16"), f"model.dtype must be auto/fp32/bf16/fp16, got {cfg.model.dtype!r}"),
        (cfg.model.resolution is None or (cfg.model.resolution > 0 and cfg.model.resolution % 8 == 0),
         f"model.resolution must be a positive multiple of 8, got {cfg.model.resolution}"),
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
        (bool(run.name) and "/" not in run.name, f"run.name must be a non-empty name without '/', got {run.name!r}"),
        (run.device in ("auto", "cpu", "cuda"), f"run.device must be auto/cpu/cuda, got {run.device!r}"),
        (run.grid_prompts >= 1 and run.grid_seeds >= 1, "run.grid_prompts and run.grid_seeds must be >= 1"),
    ]
    for name, path in cfg.tuned.items():
        checks.append((bool(_NAME.match(name)), f"tuned model name {name!r} must match {_NAME.pattern}"))
        checks.append((name != cfg.base_name, f"tuned model name {name!r} is the base model's name"))
        checks.append((bool(path), f"tuned.{name} needs a path (a LoRA export dir or a UNet dir)"))
    problems = [message for ok, message in checks if not ok]
    for role in ("generator", "scorer"):
        problems += getattr(r, role).problems(f"ray.{role}")
    if problems:
        raise ConfigError("invalid evaluation config:\n  - " + "\n  - ".join(problems))


# ----------------------------------------------------------------------------- inputs, checked up front


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: the base, a LoRA (diffusers format) on the base UNet, or a full UNet."""

    name: str
    kind: str  # "base" | "lora" | "unet"
    path: str | None = None  # LoRA: its directory; UNet: the UNet directory
    weight_name: str | None = None  # LoRA: the safetensors file in ``path``


def _is_unet_dir(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("_class_name") == "UNet2DConditionModel"
    except (OSError, ValueError):
        return False


def resolve_model_spec(name: str, path: str) -> ModelSpec:
    """A tuned model's files: a run's ``final/`` (LoRA: pytorch_lora_weights.safetensors; full fine-tuning:
    ``unet/``), the run directory holding it, a LoRA ``.safetensors`` file, or a diffusers UNet directory."""
    p = Path(path).expanduser().resolve()
    if p.is_file() and p.suffix == ".safetensors":
        return ModelSpec(name, "lora", str(p.parent), p.name)
    if not p.is_dir():
        raise EvalInputError(f"tuned model '{name}': {p} does not exist")
    for candidate in (p, p / "final"):
        if (candidate / LORA_WEIGHT_NAME).is_file():
            return ModelSpec(name, "lora", str(candidate), LORA_WEIGHT_NAME)
        if _is_unet_dir(candidate / "unet"):
            return ModelSpec(name, "unet", str(candidate / "unet"))
        if _is_unet_dir(candidate):
            return ModelSpec(name, "unet", str(candidate))
    raise EvalInputError(
        f"tuned model '{name}': {p} holds neither a LoRA export ({LORA_WEIGHT_NAME}) nor a diffusers UNet "
        "(unet/config.json), directly or under final/"
    )


def _local_dir_problem(value: str, key: str) -> str | None:
    if value == "tiny" or Path(value).expanduser().is_dir():
        return None
    return f"scorers.{key}: directory {value} does not exist (scorers load from local directories only)"


def _local_file_problem(value: str, key: str) -> str | None:
    return None if Path(value).expanduser().is_file() else f"scorers.{key}: file {value} does not exist"


def _import_problem(module: str, package: str) -> str | None:
    """None when ``module`` imports; else why not (open_clip, under hpsv2, needs torchvision, for one)."""
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any import failure means "not available here"
        return f"package {package!r} is not importable here ({type(err).__name__}: {err})"
    return None


def plan_scorers(cfg: EvalConfig) -> tuple[list[str], dict[str, str]]:
    """(metrics to score, {metric: why skipped}); raises EvalInputError for configured paths that do not exist."""
    sc = cfg.scorers
    problems: list[str] = []
    active: list[str] = []
    skipped: dict[str, str] = {}
    needs: dict[str, list[tuple[str, str]]] = {  # metric -> [(config key, "dir" | "file")] it needs
        "pickscore": [("pickscore_dir", "dir")],
        "hpsv2": [("hpsv2_checkpoint", "file")],
        "imagereward": [("imagereward_checkpoint", "file"), ("imagereward_med_config", "file")],
        "aesthetic": [("aesthetic_clip_dir", "dir"), ("aesthetic_head", "file")],
        "clip": [("clip_dir", "dir")],
    }
    packages = {"hpsv2": ("hpsv2.src.open_clip", "hpsv2"), "imagereward": ("ImageReward", "image-reward")}
    if sc.pickscore_processor_dir:
        found = _local_dir_problem(sc.pickscore_processor_dir, "pickscore_processor_dir")
        problems += [found] if found else []
    for metric, keys in needs.items():
        unset = [f"scorers.{key}" for key, _ in keys if not getattr(sc, key)]
        for key, kind in keys:
            value = getattr(sc, key)
            if value:
                found = (_local_dir_problem if kind == "dir" else _local_file_problem)(value, key)
                problems += [found] if found else []
        if unset:
            skipped[metric] = f"{' and '.join(unset)} not set"
            continue
        why = _import_problem(*packages[metric]) if metric in packages else None
        if why:
            skipped[metric] = why
        else:
            active.append(metric)
    if problems:
        raise EvalInputError("evaluation inputs are missing:\n  - " + "\n  - ".join(problems))
    return active, skipped


@dataclass
class EvalPlan:
    prompts: list[str]
    specs: list[ModelSpec]
    metrics: list[str]
    skipped: dict[str, str]

    def rows(self, seeds: list[int]) -> list[dict[str, Any]]:
        """One row per image, model-major (so generation batches rarely mix models)."""
        return [
            {"model": spec.name, "prompt_id": pid, "prompt": prompt, "seed": seed}
            for spec in self.specs
            for pid, prompt in enumerate(self.prompts)
            for seed in seeds
        ]


def prepare_evaluation(cfg: EvalConfig) -> EvalPlan:
    """Everything that can fail on bad input, before any cluster resource: prompts, tuned models, scorers."""
    file = default_prompt_file() if cfg.data.prompt_file == "demo" else Path(str(cfg.data.prompt_file)).expanduser()
    prompts = load_prompts(file, max_prompts=cfg.data.max_prompts).prompts  # PromptFileError names the file
    problems: list[str] = []
    specs = [ModelSpec(cfg.base_name, "base")]
    for name, path in cfg.tuned.items():
        try:
            specs.append(resolve_model_spec(name, path))
        except EvalInputError as err:
            problems.append(str(err))
    try:
        metrics, skipped = plan_scorers(cfg)
    except EvalInputError as err:
        problems.append(str(err))
    if problems:
        raise EvalInputError("\n".join(problems))
    return EvalPlan(prompts=prompts, specs=specs, metrics=metrics, skipped=skipped)


# ----------------------------------------------------------------------------- optional package scorers


class HPSv2Scorer:
    """HPSv2 through the ``hpsv2`` package: its open_clip ViT-H-14 built *without* pretrained weights (its
    own ``score()`` would download laion2B weights first), then the HPS checkpoint, loaded with
    ``weights_only=True``. Score = 100 x cosine (the paper's scale). Needs torchvision (open_clip does)."""

    def __init__(self, checkpoint: str, device: torch.device, max_batch: int = 32) -> None:
        from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer

        model, _, self.preprocess = create_model_and_transforms(
            "ViT-H-14", None, precision="fp32", device=device, jit=False, force_quick_gelu=False,
            force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
            image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
            with_score_predictor=False, with_region_predictor=False,
        )
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = get_tokenizer("ViT-H-14")
        self.device, self.max_batch = device, max_batch

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], timesteps: Any = 0) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), self.max_batch):
            pil = _to_pil(images[i : i + self.max_batch])
            pixels = torch.stack([self.preprocess(im) for im in pil]).to(self.device)
            text = self.tokenizer(prompts[i : i + self.max_batch]).to(self.device)
            feats = self.model(pixels, text)
            out.append(100.0 * (feats["image_features"] * feats["text_features"]).sum(-1).float().cpu())
        return torch.cat(out)


class ImageRewardScorer:
    """ImageReward through the ``image-reward`` package, built from a local checkpoint and med_config (its
    ``load()`` would download both); the BLIP tokenizer (bert-base-uncased) must be in the local HF cache.
    The reward is computed as the package's ``ImageReward.score`` does, on in-memory images."""

    def __init__(self, checkpoint: str, med_config: str, device: torch.device) -> None:
        from ImageReward.ImageReward import ImageReward

        model = ImageReward(med_config=med_config, device=device)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=False)  # as the package's own load()
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], timesteps: Any = 0) -> torch.Tensor:
        m, out = self.model, []
        for prompt, image in zip(prompts, _to_pil(images), strict=True):
            text = m.blip.tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            embeds = m.blip.visual_encoder(m.preprocess(image).unsqueeze(0).to(self.device))
            hidden = m.blip.text_encoder(
                text.input_ids.to(self.device), attention_mask=text.attention_mask.to(self.device),
                encoder_hidden_states=embeds, encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long, device=self.device),
                return_dict=True,
            ).last_hidden_state[:, 0, :].float()
            out.append(((m.mlp(hidden) - m.mean) / m.std).reshape(()).cpu())
        return torch.stack(out)


def _to_pil(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    from spo_ray.rendering import to_uint8

    return [Image.fromarray(a) for a in to_uint8(images)]


def build_metric_scorer(metric: str, cfg: EvalConfig, device: torch.device) -> Any:
    """The scorer of one metric: ``score(images [N,3,H,W] in [-1, 1], prompts, timesteps) -> [N]``."""
    from spo_ray.scorers import AestheticScorer, ClipScoreMetric, ClipScorer

    sc = cfg.scorers
    common = {"device": device, "dtype": sc.dtype, "max_batch": sc.batch_size}
    # The metrics are the CLIP processor's (a PIL resize, which antialiases), not the SPM's own preprocessing.
    if metric == "pickscore":
        return ClipScorer(sc.pickscore_dir, None, processor_dir=sc.pickscore_processor_dir, antialias=True, **common)
    if metric == "clip":
        return ClipScoreMetric(sc.clip_dir, None, antialias=True, **common)
    if metric == "aesthetic":
        return AestheticScorer(sc.aesthetic_clip_dir, sc.aesthetic_head, **common)
    if metric == "hpsv2":
        return HPSv2Scorer(str(sc.hpsv2_checkpoint), device, sc.batch_size)
    if metric == "imagereward":
        return ImageRewardScorer(str(sc.imagereward_checkpoint), str(sc.imagereward_med_config), device)
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


# ----------------------------------------------------------------------------- Ray Data actors


class GenerationWorker:
    """Ray Data actor (also usable in-process): the base pipeline with every tuned model attached; rows
    (model, prompt id, prompt, seed) -> the same rows plus ``image`` (uint8 [H, W, 3])."""

    def __init__(self, cfg_dict: dict[str, Any], specs: list[dict[str, Any]]) -> None:
        from spo_ray.components import (
            apply_fast_path,
            load_model,
            resolve_device,
            resolve_dtype,
            switch_on,
        )
        from spo_ray.ray.common import worker_setup

        self.cfg = eval_config_from_dict(cfg_dict)
        worker_setup(self.cfg.ray, "generator")
        device = resolve_device(self.cfg)
        self.model = load_model(self.cfg, device)  # base UNet + VAE + text encoders, num_steps DDIM steps
        self.specs = {s["name"]: ModelSpec(**s) for s in specs}
        self.sampling = self.cfg.sampling_config()
        self.full_unets: dict[str, torch.nn.Module] = {}
        self.has_lora = False
        for spec in self.specs.values():
            if spec.kind == "lora":
                # Each LoRA is a named adapter on the one base UNet (no UNet copy per model).
                self.model.unet.load_lora_adapter(
                    spec.path, weight_name=spec.weight_name, prefix="unet", adapter_name=spec.name
                )
                self.has_lora = True
            elif spec.kind == "unet":
                from diffusers import UNet2DConditionModel

                unet = UNet2DConditionModel.from_pretrained(spec.path, torch_dtype=resolve_dtype(self.cfg, device))
                if switch_on(self.cfg.model.channels_last, device):
                    unet.to(memory_format=torch.channels_last)
                self.full_unets[spec.name] = unet.to(device).eval().requires_grad_(False)
        # The GPU fast path (TF32, channels-last) but no torch.compile: adapters are switched per batch.
        apply_fast_path(self.model, self.cfg, device, inference_only=False)
        self.model.unet.eval()

    def _unet(self, name: str) -> torch.nn.Module:
        spec = self.specs[name]
        if spec.kind == "unet":
            return self.full_unets[name]
        unet = self.model.unet
        if spec.kind == "base":
            if self.has_lora:
                unet.disable_adapters()
        else:
            unet.enable_adapters()
            unet.set_adapters([name])
        return unet

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from spo_ray.rendering import to_uint8
        from spo_ray.sampling import generate_latents

        names = [str(m) for m in batch["model"]]
        prompts = [str(p) for p in batch["prompt"]]
        seeds = [int(s) for s in batch["seed"]]
        side = self.model.resolution
        images = np.zeros((len(names), side, side, 3), dtype=np.uint8)
        for name in dict.fromkeys(names):
            idx = [i for i, m in enumerate(names) if m == name]
            latents = generate_latents(
                self.model, [prompts[i] for i in idx], [seeds[i] for i in idx], cfg=self.sampling, unet=self._unet(name)
            )
            images[idx] = to_uint8(self.model.decode(latents))
        return {**batch, "image": images}


class ScoringWorker:
    """Ray Data actor: every active metric's scorer; adds a ``score_<metric>`` column per metric."""

    def __init__(self, cfg_dict: dict[str, Any], metrics: list[str]) -> None:
        from spo_ray.components import resolve_device
        from spo_ray.ray.common import worker_setup

        self.cfg = eval_config_from_dict(cfg_dict)
        worker_setup(self.cfg.ray, "scorer")
        device = resolve_device(self.cfg)
        self.scorers = {metric: build_metric_scorer(metric, self.cfg, device) for metric in metrics}

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Scored as saved: the uint8 image, back in [-1, 1].
        images = torch.from_numpy(np.ascontiguousarray(batch["image"])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        prompts = [str(p) for p in batch["prompt"]]
        out = dict(batch)
        for metric, scorer in self.scorers.items():
            out[f"score_{metric}"] = scorer.score(images, prompts, 0).float().cpu().numpy()
            if hasattr(scorer, "reset_text_cache"):
                scorer.reset_text_cache()
        return out


def build_eval_dataset(cfg: EvalConfig, plan: EvalPlan) -> Any:
    """The batch-inference pipeline: generation actors, then scoring actors (none without metrics)."""
    import ray.data

    rows = plan.rows(cfg.sampling.seeds)
    cfg_dict = cfg.to_dict()
    blocks = max(1, math.ceil(len(rows) / cfg.sampling.batch_size))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(
        GenerationWorker,
        fn_constructor_kwargs={"cfg_dict": cfg_dict, "specs": [dataclasses.asdict(s) for s in plan.specs]},
        batch_size=cfg.sampling.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_generators),
        **cfg.ray.generator.ray_options(),
    )
    if plan.metrics:
        ds = ds.map_batches(
            ScoringWorker,
            fn_constructor_kwargs={"cfg_dict": cfg_dict, "metrics": plan.metrics},
            batch_size=cfg.scorers.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_scorers),
            **cfg.ray.scorer.ray_options(),
        )
    return ds


# ----------------------------------------------------------------------------- the table and the grids


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


# ----------------------------------------------------------------------------- the driver


def _log(cfg: EvalConfig, message: str) -> None:
    if cfg.run.progress:
        print(f"{PREFIX} {message}", flush=True)


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
        print(f"{PREFIX} skipped: {METRICS[metric]} - {why}", flush=True)
    if not plan.metrics:
        print(f"{PREFIX} no scorer is available: images and grids only", flush=True)
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
