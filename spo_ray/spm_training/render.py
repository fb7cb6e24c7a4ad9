"""x0_hat of both images of a pair at t (the base model's one CFG UNet step), the SPM's inputs made as
the reference's SPM training makes them, and PickScore relabelling; the Ray Data renderer actor."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from spo_ray import rng
from spo_ray.components import resolve_device, resolve_dtype
from spo_ray.ray.common import worker_setup
from spo_ray.spm_training.config import NUM_TIMESTEPS, spm_config_from_dict

log = logging.getLogger(__name__)

def decode_image(data: bytes, size: int) -> torch.Tensor:
    """Encoded image bytes -> RGB ``[3, size, size]`` in [-1, 1], resized straight (no crop)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
    x = x.permute(2, 0, 1)[None].float() / 127.5 - 1.0
    return resize_straight(x, size)[0]


def resize_straight(images: torch.Tensor, size: int, *, antialias: bool = True) -> torch.Tensor:
    """``[N, 3, H, W]`` in [-1, 1] -> ``[N, 3, size, size]`` (aspect ratio not kept, as the SPM was trained).

    ``antialias=False`` is the reference's SPM-training resize of the decoded x0_hat (plain bicubic
    ``F.interpolate``, clamped before and after); the default stands in for the PIL resize its dataset
    applies to the clean images.
    """
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=antialias)
    return out.clamp(-1.0, 1.0)


def encode_latents(model, images: torch.Tensor) -> torch.Tensor:
    """VAE encode to the posterior mean, scaled as the UNet expects (the inverse of ``DiffusionModel.decode``).

    The mean, not a posterior sample: a trained VAE's posterior std is negligible, and a random test VAE's
    (std ~1) would drown the image in noise before the diffusion noise is even added.
    """
    from spo_ray.models import module_dtype

    vae = model.vae
    z = vae.encode(images.to(device=model.device, dtype=module_dtype(vae))).latent_dist.mean.float()
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z - shift
    return z * vae.config.scaling_factor


@torch.no_grad()
def render_x0_pairs(
    model,
    images_0: torch.Tensor,
    images_1: torch.Tensor,
    prompts: list[str],
    timesteps: torch.Tensor,
    keys: list[tuple[int, ...]],
    guidance_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base model's one-step view of both images of each pair at t: decoded x0_hat in [-1, 1].

    Both images of a pair share t and one noise (keyed by ``keys[i]``), so the SPM compares them under the
    same corruption; x0_hat comes from one CFG UNet forward (:func:`predict_x0`).
    """
    from spo_ray.diffusion import predict_x0
    from spo_ray.models import Conditioning

    n = len(prompts)
    shape = model.latent_shape
    noise = torch.stack([rng.randn(shape, "spm-noise", *k) for k in keys]).to(model.device)
    latents = torch.cat([encode_latents(model, images_0), encode_latents(model, images_1)])
    t = torch.as_tensor(timesteps, dtype=torch.long).reshape(-1).repeat(2).to(model.device)
    x_t = model.scheduler.add_noise(latents, noise.repeat(2, 1, 1, 1), t)
    cond = model.encode_prompts(prompts)
    cond = Conditioning.cat([cond, cond])
    eps = model.guided_noise_pred(model.unet, x_t, t, cond, model.negative_conditioning(2 * n), guidance_scale)
    decoded = model.decode(predict_x0(model.scheduler, eps, t.cpu(), x_t))
    return decoded[:n].cpu(), decoded[n:].cpu()


def relabel_from_scores(s0: torch.Tensor, s1: torch.Tensor, gap: float) -> torch.Tensor:
    """label_0 from clean-image scores: the softmax gap above ``gap`` wins (1 / 0), otherwise a tie (0.5)."""
    p0, p1 = torch.softmax(torch.stack([s0.float(), s1.float()], dim=-1), dim=-1).unbind(-1)
    decided = (p0 - p1).abs() > gap
    return torch.where(decided, (s0 > s1).float(), torch.full_like(p0, 0.5))


class X0Renderer:
    """Ray Data actor: the frozen base model (text encoders, VAE, UNet) and the optional relabel scorer;
    tagged rows -> (pixels_0, pixels_1, t, prompt, label_0, weight) ready for the SPM."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        from spo_ray.model_loading import load_diffusion_model
        from spo_ray.spm import load_image_normalization

        self.cfg = spm_config_from_dict(cfg_dict)
        worker_setup(self.cfg.ray, "renderer")
        device = resolve_device(self.cfg)
        m = self.cfg.model
        self.model = load_diffusion_model(
            m.pretrained, m.kind, vae=m.vae, dtype=resolve_dtype(self.cfg, device), device=device,
            resolution=m.resolution,
        )
        self.model.unet.requires_grad_(False)
        steps = int(self.model.scheduler.config.num_train_timesteps)
        if steps != NUM_TIMESTEPS:
            raise ValueError(f"{m.pretrained}: the scheduler has {steps} training timesteps, expected {NUM_TIMESTEPS}")
        self.mean, self.std = load_image_normalization(self.cfg.spm.processor_dir or self.cfg.spm.clip_dir)
        self.relabel = None
        rl = self.cfg.data.relabel
        if rl.enabled:
            from spo_ray.scorers import build_scorer

            self.relabel = build_scorer(rl.scorer, clip_dir=rl.clip_dir, checkpoint=rl.checkpoint, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rendered in chunks of exactly ``ray.render_batch_size`` rows (a short one padded with copies
        of its first row, whose outputs are dropped): a row's pixels depend on the batch's size (the
        kernels block by shape) but not on the other rows, so a row renders bit-identically in any
        batch, as an exact resume needs when the rows around it differ. Cost: at most one padded
        chunk per Ray Data block (< 2 % of the renders at 16-row chunks and ~1,000-row blocks)."""
        size = self.cfg.ray.render_batch_size
        n = len(batch["t"])
        chunks = []
        for lo in range(0, n, size):
            part = {k: v[lo : lo + size] for k, v in batch.items()}
            short = size - len(part["t"])
            if short:
                part = {k: np.concatenate([v, np.repeat(v[:1], short, axis=0)]) for k, v in part.items()}
            out = self._render(part)
            chunks.append({k: v[: size - short] for k, v in out.items()})
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def _render(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from spo_ray.spm import preprocess_images

        res, size, seed = self.model.resolution, self.cfg.spm.image_size, self.cfg.train.seed
        prompts = [str(p) for p in batch["prompt"]]
        clean = [torch.stack([decode_image(b, res) for b in batch[c]]) for c in ("image_0", "image_1")]
        keys = [(seed, int(e), int(x), int(s)) for e, x, s in zip(batch["epoch"], batch["example_id"], batch["slot"], strict=True)]
        t = torch.as_tensor(batch["t"].astype(np.int64))
        dec0, dec1 = render_x0_pairs(self.model, clean[0], clean[1], prompts, t, keys, self.cfg.model.guidance_scale)
        label_0 = torch.from_numpy(batch["label_0"].astype(np.float32))
        if self.relabel is not None:
            s0, s1 = (self.relabel.score(resize_straight(c, size), prompts, torch.zeros(len(prompts))) for c in clean)
            label_0 = relabel_from_scores(s0, s1, self.cfg.data.relabel.gap)
        # The reference's SPM training: clamped decode -> bicubic to size x size, no antialias -> clamp -> normalise.
        pix = [preprocess_images(resize_straight(d, size, antialias=False), size, self.mean, self.std) for d in (dec0, dec1)]
        return {
            "pixels_0": pix[0].numpy(), "pixels_1": pix[1].numpy(), "t": t.numpy(), "prompt": np.array(prompts, dtype=object),
            "label_0": label_0.numpy(), "weight": batch["weight"].astype(np.float32), "epoch": batch["epoch"].astype(np.int64),
            "example_id": batch["example_id"].astype(np.int64),
        }
