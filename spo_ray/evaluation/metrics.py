"""The paper's metric scorers: PickScore, CLIP score and LAION aesthetic (spo_ray/scorers.py), HPSv2 and
ImageReward through their packages when installed."""

from __future__ import annotations

import logging
from typing import Any

import torch

from spo_ray.evaluation.config import METRICS, EvalConfig

log = logging.getLogger(__name__)

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
