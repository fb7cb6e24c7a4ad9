"""The batch-inference pipeline: generation actors (every model on one base pipeline), then scoring actors."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import torch

from spo_ray.evaluation.config import EvalConfig, eval_config_from_dict
from spo_ray.evaluation.inputs import EvalPlan, ModelSpec
from spo_ray.evaluation.metrics import build_metric_scorer

log = logging.getLogger(__name__)

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
