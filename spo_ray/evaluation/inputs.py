"""Inputs checked up front: the tuned models (LoRA exports, UNet dirs), the scorers that can run, the plan."""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo_ray.evaluation.config import EvalConfig, EvalInputError
from spo_ray.export import LORA_WEIGHT_NAME
from spo_ray.prompts import default_prompt_file, load_prompts

log = logging.getLogger(__name__)

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
    """A CLIP folder setting: a local directory, "tiny", or a hub id the HF cache or the hub has."""
    from spo_ray.spm import resolve_clip_dir

    try:
        resolve_clip_dir(value)
    except FileNotFoundError as err:
        return f"scorers.{key}: {err}"
    return None


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
