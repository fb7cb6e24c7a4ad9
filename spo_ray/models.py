"""One adapter over SD1.5- and SDXL-shaped diffusers checkpoints (DESIGN.md sections 1 and 3).

Samplers, scorers and trainers all need the same few things from a text-to-image model: text
conditioning that matches what diffusers' pipelines compute, the unconditional (negative)
conditioning SPO uses, one classifier-free-guided noise prediction, and a VAE decode. Putting
them behind :class:`DiffusionModel` keeps the SD1.5/SDXL differences in one place:

- SD1.5: last hidden state of one CLIP text encoder; the negative is the encoded empty string.
- SDXL: penultimate hidden states of both text encoders concatenated, the pooled projection of
  ``text_encoder_2``, and ``time_ids`` (original size, crop, target size); the negative is all
  zeros (``force_zeros_for_empty_prompt=True``, as the reference ran it).

:func:`load_diffusion_model` loads each component with its class' ``from_pretrained`` from a
local diffusers directory or a hub id; ``"tiny:sd15"`` / ``"tiny:sdxl"`` build a tiny random
pipeline once (:mod:`spo_ray.tiny`) and load it through the very same path.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from spo_ray.diffusion import make_ddim_scheduler

KINDS = ("sd15", "sdxl")
COMPONENTS = ("unet", "vae", "text")
TINY_PREFIX = "tiny:"



# --------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """Text conditioning for a batch: what the UNet needs besides latents and timesteps.

    ``pooled_embeds`` and ``time_ids`` are SDXL's added conditioning (None for SD1.5).
    """

    prompt_embeds: torch.Tensor  # [B, L, D]
    pooled_embeds: torch.Tensor | None = None  # [B, P]
    time_ids: torch.Tensor | None = None  # [B, 6]

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def _map(self, fn) -> Conditioning:
        return Conditioning(**{name: fn(value) for name, value in self._tensors().items()})

    @property
    def batch_size(self) -> int:
        return int(self.prompt_embeds.shape[0])

    def __len__(self) -> int:
        return self.batch_size

    @property
    def is_sdxl(self) -> bool:
        return self.pooled_embeds is not None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move every tensor (time ids included, as diffusers casts them to the embeds' dtype)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def index(self, idx: int | slice | Sequence[int] | torch.Tensor) -> Conditioning:
        """Select rows (int, slice, index list/tensor or boolean mask); an int keeps the batch dimension."""
        if isinstance(idx, int):
            idx = [idx]
        if not isinstance(idx, slice):
            idx = torch.as_tensor(idx)
            if idx.dtype != torch.bool:
                idx = idx.long()
        return self._map(lambda t: t[idx.to(t.device) if isinstance(idx, torch.Tensor) else idx])

    def repeat_interleave(self, n: int) -> Conditioning:
        """Each row n times in a row (diffusers' ``num_images_per_prompt`` layout)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def expand_to(self, batch: int) -> Conditioning:
        """A 1-row conditioning repeated to ``batch`` rows (identity if already that size)."""
        if self.batch_size == batch:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot expand a conditioning of batch {self.batch_size} to {batch}")
        return self._map(lambda t: t.expand(batch, *t.shape[1:]).contiguous())

    @classmethod
    def cat(cls, items: Iterable[Conditioning]) -> Conditioning:
        """Concatenate along the batch dimension; all items must have the same fields set."""
        items = list(items)
        if not items:
            raise ValueError("Conditioning.cat needs at least one item")
        names = set(items[0]._tensors())
        if any(set(c._tensors()) != names for c in items[1:]):
            raise ValueError("cannot concatenate SD1.5-style and SDXL-style conditionings")
        return cls(**{name: torch.cat([getattr(c, name) for c in items], dim=0) for name in names})

    def as_dict(self) -> dict[str, np.ndarray]:
        """Numpy arrays for transport (bf16 goes to float32: numpy has no bfloat16)."""
        out = {}
        for name, value in self._tensors().items():
            value = value.detach().cpu()
            if value.dtype == torch.bfloat16:
                value = value.float()
            out[name] = value.numpy()
        return out

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Conditioning:
        """Inverse of :meth:`as_dict` (accepts numpy arrays or tensors; missing keys are None)."""

        def conv(value: Any) -> torch.Tensor | None:
            if value is None:
                return None
            tensor = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
            return tensor.to(device=device, dtype=dtype)

        if "prompt_embeds" not in data:
            raise KeyError("conditioning dict has no 'prompt_embeds'")
        return cls(
            prompt_embeds=conv(data["prompt_embeds"]),
            pooled_embeds=conv(data.get("pooled_embeds")),
            time_ids=conv(data.get("time_ids")),
        )


# --------------------------------------------------------------------------------------------
# The model adapter
# --------------------------------------------------------------------------------------------


def module_dtype(module: Any) -> torch.dtype:
    """The parameter dtype of a (possibly wrapped: peft, DeepSpeed) module."""
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


class DiffusionModel:
    """SD1.5 or SDXL components behind one interface (see the module docstring).

    Attributes: ``kind``, ``unet``, ``vae``, ``scheduler`` (validated DDIM with ``num_steps``
    timesteps set), ``scheduler_config``, ``text_encoders``, ``tokenizers``, ``resolution`` (pixels),
    ``vae_scale_factor``, ``device``, ``dtype``. Components not loaded are None / empty.
    """

    def __init__(
        self,
        kind: str,
        *,
        unet: Any = None,
        vae: Any = None,
        scheduler: Any,
        scheduler_config: dict[str, Any],
        text_encoders: Sequence[Any] = (),
        tokenizers: Sequence[Any] = (),
        resolution: int,
        vae_scale_factor: int,
        latent_channels: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        pretrained: str | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
        if resolution % vae_scale_factor:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE scale factor {vae_scale_factor}")
        self.kind = kind
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.scheduler_config = dict(scheduler_config)
        self.text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers)
        self.resolution = int(resolution)
        self.vae_scale_factor = int(vae_scale_factor)
        self.latent_channels = int(latent_channels)
        self.device = torch.device(device)
        self.dtype = dtype
        self.pretrained = pretrained
        self._negative: Conditioning | None = None  # one row, without time ids

    def __repr__(self) -> str:
        return (
            f"DiffusionModel(kind={self.kind!r}, pretrained={self.pretrained!r}, resolution={self.resolution}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    @property
    def is_sdxl(self) -> bool:
        return self.kind == "sdxl"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the latents at the model's resolution."""
        return self.latent_shape_for(self.resolution)

    def latent_shape_for(self, resolution: int) -> tuple[int, int, int]:
        """(C, H, W) of the latents for square images of ``resolution`` pixels."""
        if resolution % self.vae_scale_factor:
            raise ValueError(f"resolution {resolution} is not a multiple of {self.vae_scale_factor}")
        side = resolution // self.vae_scale_factor
        return (self.latent_channels, side, side)

    def make_scheduler(self, num_steps: int) -> Any:
        """A fresh validated DDIM scheduler from the model's own config, with ``num_steps`` set."""
        return make_ddim_scheduler(self.scheduler_config, num_steps)

    # -- text ----------------------------------------------------------------------------------

    def _require_text(self) -> None:
        if not self.text_encoders:
            raise RuntimeError(
                "text encoders are not loaded (freed, or load_diffusion_model(components=...) without 'text')"
            )

    def _time_ids(self, batch: int, resolution: int | None, dtype: torch.dtype) -> torch.Tensor:
        """SDXL's add_time_ids: original_size + crops_coords_top_left + target_size, in pixels."""
        side = self.resolution if resolution is None else int(resolution)
        original_size, crops, target_size = (side, side), (0, 0), (side, side)
        row = torch.tensor([list(original_size + crops + target_size)], dtype=dtype, device=self.device)
        return row.repeat(batch, 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str] | str, *, resolution: int | None = None) -> Conditioning:
        """Text conditioning exactly as diffusers' ``encode_prompt`` computes it (no clip skip)."""
        self._require_text()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self.kind == "sd15":
            tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
            inputs = tokenizer(
                prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            )
            mask = None
            if getattr(encoder.config, "use_attention_mask", False):
                mask = inputs.attention_mask.to(self.device)
            embeds = encoder(inputs.input_ids.to(self.device), attention_mask=mask)[0]
            return Conditioning(prompt_embeds=embeds.to(encoder.dtype))

        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            inputs = tokenizer(
                prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            )
            out = encoder(inputs.input_ids.to(self.device), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (diffusers keeps the last one)
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise RuntimeError("SDXL needs a text encoder with projection (text_encoder_2) for the pooled embeds")
        dtype = self.text_encoders[-1].dtype
        embeds = torch.cat(hidden, dim=-1).to(dtype)
        return Conditioning(
            prompt_embeds=embeds,
            pooled_embeds=pooled.to(dtype),
            time_ids=self._time_ids(len(prompts), resolution, embeds.dtype),
        )

    def negative_conditioning(self, batch: int, *, resolution: int | None = None) -> Conditioning:
        """The unconditional branch of CFG, ``batch`` rows.

        SD1.5: the encoded empty string. SDXL: zeros for prompt and pooled embeds (diffusers'
        ``force_zeros_for_empty_prompt`` with no negative prompt, as the reference ran it).
        Computed once and cached, so it survives :meth:`free_text_encoders`.
        """
        if self._negative is None:
            empty = self.encode_prompts([""])
            if self.kind == "sd15":
                self._negative = empty
            else:
                self._negative = Conditioning(
                    prompt_embeds=torch.zeros_like(empty.prompt_embeds),
                    pooled_embeds=torch.zeros_like(empty.pooled_embeds),
                )
        neg = self._negative.expand_to(batch)
        if self.kind == "sdxl":
            neg = Conditioning(
                prompt_embeds=neg.prompt_embeds,
                pooled_embeds=neg.pooled_embeds,
                time_ids=self._time_ids(batch, resolution, neg.prompt_embeds.dtype),
            )
        return neg

    def free_text_encoders(self) -> None:
        """Drop text encoders and tokenizers (trainers only need the UNet), keeping the negative."""
        if self.text_encoders:
            self.negative_conditioning(1)
        self.text_encoders = []
        self.tokenizers = []
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- UNet ----------------------------------------------------------------------------------

    def guided_noise_pred(
        self,
        unet: Any,
        latents: torch.Tensor,
        timesteps: int | torch.Tensor,
        cond: Conditioning,
        neg: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        """Classifier-free guided noise prediction e_u + g (e_c - e_u), in ONE UNet batch.

        ``unet`` is explicit because training wraps it (peft, DeepSpeed). Inputs are cast to the
        UNet's parameter dtype; the result is in the UNet's output dtype. ``timesteps`` is an int
        or a per-sample tensor of shape [B]; ``neg`` may have 1 row or B rows.
        """
        batch = latents.shape[0]
        if cond.batch_size != batch:
            raise ValueError(f"conditioning has {cond.batch_size} rows for {batch} latents")
        neg = neg.expand_to(batch)
        dtype = module_dtype(unet)
        device = latents.device
        both = Conditioning.cat([neg, cond]).to(device=device, dtype=dtype)

        t = torch.as_tensor(timesteps, device=device)
        if not t.is_floating_point():
            t = t.long()
        t = t.reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"timesteps has {t.numel()} entries for a batch of {batch}")

        added = None
        if both.pooled_embeds is not None:
            if both.time_ids is None:
                raise ValueError("SDXL conditioning needs time_ids")
            added = {"text_embeds": both.pooled_embeds, "time_ids": both.time_ids}
        elif self.kind == "sdxl":
            raise ValueError("SDXL needs pooled embeds and time ids in the conditioning")

        model_input = torch.cat([latents, latents], dim=0).to(dtype)
        out = unet(
            model_input,
            torch.cat([t, t], dim=0),
            encoder_hidden_states=both.prompt_embeds,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        uncond, text = out.chunk(2, dim=0)
        return uncond + guidance_scale * (text - uncond)

    # -- VAE -----------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """Latents -> RGB images, float32, [B, 3, H, W] (no gradient: the VAE is frozen).

        ``clamp=True`` (images that are saved or shown) clamps to [-1, 1]. The preference model
        gets the raw decode (``clamp=False``), as the reference's ``get_preference_score`` does: it
        resizes first and clamps after, and the released SPMs were trained on inputs made that way.
        """
        if self.vae is None:
            raise RuntimeError("the VAE is not loaded (load_diffusion_model(components=...) without 'vae')")
        config = self.vae.config
        vae_dtype = module_dtype(self.vae)
        z = latents.to(device=next(self.vae.parameters()).device, dtype=torch.float32) / config.scaling_factor
        shift = getattr(config, "shift_factor", None)
        if shift is not None:
            z = z + shift
        images = self.vae.decode(z.to(vae_dtype), return_dict=False)[0].float()
        return images.clamp(-1.0, 1.0) if clamp else images
