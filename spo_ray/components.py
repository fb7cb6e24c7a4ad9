"""Building each role's components from a config: the one place both engines get them from.

Sampler: policy UNet + text encoders. Scorer: VAE decoder + preference model. Trainer: UNet
(+ the negative conditioning, computed once). The in-process engine holds all three in one
process and shares the UNet between sampling and training.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from spo_ray import devices
from spo_ray.config import SPOConfig
from spo_ray.model_loading import load_diffusion_model
from spo_ray.models import DiffusionModel
from spo_ray.prompts import PromptPlan, PromptSet, default_prompt_file, load_prompts, truncate_prompts
from spo_ray.scorers import build_scorer
from spo_ray.scoring import PoolScorer

log = logging.getLogger("spo_ray")


def resolve_device(cfg: Any) -> torch.device:
    """The device of this process's role, from ``run.device`` (every config kind has it)."""
    return devices.resolve_device(cfg.run.device)


def resolve_dtype(cfg: Any, device: torch.device) -> torch.dtype:
    """The diffusion model's dtype (UNet, VAE, text encoders) from ``model.dtype``. Not the
    scorer's: see :func:`scorer_dtype`."""
    return devices.model_dtype(cfg.model.dtype, device)


def scorer_dtype(cfg: SPOConfig) -> torch.dtype:
    """The preference model's dtype, on every device: fp32 by default, as the reference ran its SPM."""
    return devices.torch_dtype(cfg.scorer.dtype)


def load_model(cfg: SPOConfig, device: torch.device, components: tuple[str, ...] = ("unet", "vae", "text")) -> DiffusionModel:
    return load_diffusion_model(
        cfg.model.pretrained,
        cfg.model.kind,
        vae=cfg.model.vae,
        dtype=resolve_dtype(cfg, device),
        device=device,
        num_steps=cfg.sampling.num_steps,
        resolution=cfg.model.resolution,
        components=components,
        vae_dtype=resolve_vae_dtype(cfg, device),
    )


def resolve_vae_dtype(cfg: SPOConfig, device: torch.device) -> torch.dtype | None:
    """A separate VAE on a GPU (SDXL's fp16-fix VAE, made to run in fp16) runs in fp16; else the
    model's dtype (None). A VAE whose config asks for upcasting is still upcast by the loader."""
    if cfg.model.vae is not None and device.type == "cuda" and resolve_dtype(cfg, device) != torch.float32:
        return torch.float16
    return None


def connect_ray(address: str | None) -> None:
    """Connect to ``address``; with none, to the cluster this process runs in (a job's
    ``RAY_ADDRESS``, or a local ``ray start``); with none of those, start a local cluster without
    a dashboard (Ray itself maps 127.0.0.1 to the node's address for its GCS, so nothing more can
    be pinned to loopback from here; `scripts/local_cluster.sh` binds the dashboard to 127.0.0.1)."""
    import os

    import ray

    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(address="auto", log_to_driver=True)
        except ConnectionError:
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
        return
    ray.init(address=address, log_to_driver=True)


def switch_on(setting: bool | None, device: torch.device) -> bool:
    """A fast-path switch: True, False, or None (on where the role runs on a GPU)."""
    return device.type == "cuda" if setting is None else setting


def apply_fast_path(model: DiffusionModel, cfg: SPOConfig, device: torch.device, *, inference_only: bool) -> None:
    """The GPU fast path for a role's model (SDPA attention and one-batch CFG are always on).

    channels-last pays for the UNet's and the VAE's convolutions on tensor cores; torch.compile
    pays over a long run of same-shaped forwards and is only used where the UNet runs inference
    (``Module.compile`` compiles in place, so parameter names, which weight sync uses, do not change).
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if switch_on(cfg.model.channels_last, device):
        for module in (model.unet, model.vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if inference_only and model.unet is not None and switch_on(cfg.model.compile_unet, device):
        model.unet.compile()


def prompt_file_path(cfg: SPOConfig) -> Path:
    return default_prompt_file() if cfg.data.prompt_file == "demo" else Path(cfg.data.prompt_file).expanduser()


def load_prompt_set(cfg: SPOConfig) -> PromptSet:
    """The run's prompts; raises PromptFileError naming the file and the problem."""
    return load_prompts(prompt_file_path(cfg), max_prompts=cfg.data.max_prompts)


def fit_prompts_to_tokenizer(prompt_set: PromptSet, tokenizer: Any) -> PromptSet:
    """Cut prompts longer than the text encoder's context; counted, and the count logged."""
    prompts, truncated = truncate_prompts(prompt_set.prompts, tokenizer, max_length=tokenizer.model_max_length)
    prompt_set.prompts = prompts
    prompt_set.truncated += truncated
    if prompt_set.truncated:
        log.warning(
            "%d prompt(s) were longer than the text encoder's %d tokens and were truncated",
            prompt_set.truncated, tokenizer.model_max_length,
        )
    return prompt_set


def prompt_plan(cfg: SPOConfig, num_prompts: int) -> PromptPlan:
    return PromptPlan(
        num_prompts=num_prompts, epochs=cfg.train.epochs, seed=cfg.train.seed, batch_size=cfg.sampling.prompts_per_round
    )


def last_round(cfg: SPOConfig, plan: PromptPlan) -> int:
    """The round index a run stops before: the plan's end, or ``run.max_rounds``."""
    return plan.num_rounds if cfg.run.max_rounds is None else min(plan.num_rounds, cfg.run.max_rounds)


def build_pool_scorer(cfg: SPOConfig, model: DiffusionModel, device: torch.device) -> PoolScorer:
    processor = {"processor_dir": cfg.scorer.processor_dir} if cfg.scorer.processor_dir else {}
    scorer = build_scorer(
        cfg.scorer.type,
        clip_dir=cfg.scorer.clip_dir,
        checkpoint=cfg.scorer.checkpoint,
        device=device,
        dtype=scorer_dtype(cfg),
        **processor,
        **cfg.scorer.kwargs,
    )
    return PoolScorer(model.decode, scorer, threshold=cfg.scorer.threshold, max_batch=cfg.scorer.max_batch)
