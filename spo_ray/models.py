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
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spo_ray.diffusion import make_ddim_scheduler

KINDS = ("sd15", "sdxl")
COMPONENTS = ("unet", "vae", "text")
TINY_PREFIX = "tiny:"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _text_from_pretrained_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """transformers >= 4.56 takes ``dtype``; older releases only ``torch_dtype``."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def _resolve_source(name: str, what: str) -> tuple[str, bool]:
    """(source, is_local). A hub-id-shaped name that is not a local path goes to the hub."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{what} {name!r} is not a directory (expected a diffusers layout)")
        return str(path), True
    if _HUB_ID.match(name) and not name.startswith((".", "~")):
        return name, False
    raise FileNotFoundError(f"{what} directory not found: {name!r}")


def resolve_pretrained(pretrained: str | os.PathLike[str], kind: str) -> tuple[str, bool]:
    """(source, is_local) of a base model: a local directory, a hub id, or ``tiny:<kind>`` (built
    and cached on first use)."""
    name = os.fspath(pretrained)
    if name.startswith(TINY_PREFIX):
        from spo_ray.tiny import ensure_tiny_pipeline

        tiny_kind = name[len(TINY_PREFIX) :]
        if tiny_kind != kind:
            raise ValueError(f"{name!r} is a {tiny_kind!r} pipeline but kind={kind!r} was asked for")
        name = str(ensure_tiny_pipeline(tiny_kind))
    return _resolve_source(name, "pretrained model")


def _expected_subfolders(
    kind: str, components: Sequence[str], separate_vae: bool, need_unet_config: bool
) -> list[str]:
    subs = ["scheduler"]
    if "unet" in components or need_unet_config:
        subs.append("unet")
    if not separate_vae:
        subs.append("vae")  # its config gives the scale factor even when the weights are not loaded
    if "text" in components:
        subs += ["text_encoder", "tokenizer"]
        if kind == "sdxl":
            subs += ["text_encoder_2", "tokenizer_2"]
    return subs


def check_local_layout(
    root: Path, kind: str, components: Sequence[str], separate_vae: bool, need_unet_config: bool
) -> None:
    """Clear errors for a wrong kind or missing component subfolders, before any from_pretrained."""
    class_name = None
    index = root / "model_index.json"
    if index.is_file():
        try:
            class_name = json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError):
            class_name = None
    has_te2 = (root / "text_encoder_2").is_dir()
    looks_xl = has_te2 or (class_name is not None and "XL" in class_name)
    if kind == "sdxl" and not looks_xl:
        raise ValueError(
            f"{root} does not look like an SDXL pipeline (no text_encoder_2/ subfolder"
            f"{', model_index class ' + repr(class_name) if class_name else ''}); is it SD1.5 (kind='sd15')?"
        )
    if kind == "sd15" and looks_xl:
        raise ValueError(
            f"{root} looks like an SDXL pipeline (text_encoder_2/ or class {class_name!r}); load it with kind='sdxl'"
        )
    expected = _expected_subfolders(kind, components, separate_vae, need_unet_config)
    missing = [sub for sub in expected if not (root / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{root} is missing component subfolder(s) {', '.join(s + '/' for s in missing)} "
            f"(a diffusers {kind} pipeline loaded for components {tuple(components)} needs "
            f"{', '.join(s + '/' for s in expected)})"
        )
    missing_files = []
    for sub in expected:
        needs = _REQUIRED_FILES[sub.removesuffix("_2")]
        if sub in ("unet", "vae") and sub not in components:
            needs = needs[:1]  # only the config is read for a component that is not loaded
        for alternatives in needs:
            if not any((root / sub / name).is_file() for name in alternatives):
                missing_files.append(f"{sub}/{' or '.join(alternatives)}")
    if missing_files:
        raise FileNotFoundError(f"{root} is missing file(s): {'; '.join(missing_files)}")


# What each component subfolder must hold (one of each tuple): a config and weights.
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.fp16.safetensors")
_REQUIRED_FILES: dict[str, list[tuple[str, ...]]] = {
    "scheduler": [("scheduler_config.json",)],
    "unet": [("config.json",), _WEIGHTS],
    "vae": [("config.json",), _WEIGHTS],
    "text_encoder": [("config.json",), ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                                        "model.fp16.safetensors")],
    "tokenizer": [("vocab.json", "tokenizer.json"), ("merges.txt", "tokenizer.json")],
}


def load_diffusion_model(
    pretrained: str | os.PathLike[str],
    kind: str,
    *,
    vae: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    num_steps: int = 20,
    resolution: int | None = None,
    components: Sequence[str] = COMPONENTS,
    vae_dtype: torch.dtype | None = None,
) -> DiffusionModel:
    """Load an SD1.5/SDXL checkpoint component by component with each class' ``from_pretrained``.

    ``pretrained`` is a local diffusers directory, a hub id, or ``"tiny:sd15"`` / ``"tiny:sdxl"``
    (a cached tiny random pipeline, loaded through this same path). ``vae`` is an optional
    separate VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix``, no subfolder). ``components`` picks what
    a role needs among "unet", "vae", "text"; the scheduler is always built (validated DDIM with
    ``num_steps`` set). Safetensors are preferred where present (the libraries' default); remote
    code is never trusted. ``resolution`` defaults to ``unet sample_size * vae_scale_factor``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    components = tuple(components)
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; expected a subset of {COMPONENTS}")

    name = os.fspath(pretrained)
    source, is_local = resolve_pretrained(name, kind)
    if name.startswith(TINY_PREFIX):
        name = source  # the cached pipeline's directory names the model from here on
    vae_source = None
    if vae is not None:
        vae_source, vae_local = _resolve_source(os.fspath(vae), "VAE")
        if vae_local and not (Path(vae_source) / "config.json").is_file():
            raise FileNotFoundError(f"VAE directory {vae_source} has no config.json (expected an AutoencoderKL)")
    if is_local:
        check_local_layout(Path(source), kind, components, vae_source is not None, resolution is None)

    common: dict[str, Any] = {"local_files_only": is_local}
    device = torch.device(device)

    try:
        scheduler_config = dict(DDIMScheduler.load_config(source, subfolder="scheduler", **common))
    except OSError as err:
        if is_local:
            raise
        raise OSError(f"{name!r} is not a local directory and could not be loaded as a hub id: {err}") from err
    scheduler = make_ddim_scheduler(scheduler_config, num_steps)

    unet = None
    unet_config: Any = None
    if "unet" in components:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **common)
        unet_config = unet.config
    elif resolution is None or (is_local and (Path(source) / "unet").is_dir()):
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", **common)
    if unet_config is not None:
        is_xl_unet = unet_config.get("addition_embed_type") == "text_time"
        if is_xl_unet != (kind == "sdxl"):
            raise ValueError(
                f"{name}: the UNet has addition_embed_type={unet_config.get('addition_embed_type')!r}, "
                f"which is {'SDXL' if is_xl_unet else 'SD1.5'}-shaped, but kind={kind!r}"
            )

    vae_model = None
    if "vae" in components:
        vae_kwargs: dict[str, Any] = {"torch_dtype": vae_dtype or dtype}
        if vae_source is None:
            vae_kwargs.update(subfolder="vae", **common)
            vae_config = AutoencoderKL.load_config(source, subfolder="vae", **common)
        else:
            vae_kwargs.update(local_files_only=vae_local)
            vae_config = AutoencoderKL.load_config(vae_source, local_files_only=vae_local)
        if vae_kwargs["torch_dtype"] == torch.float16 and vae_config.get("force_upcast", False):
            # The original SDXL VAE overflows in fp16; diffusers' pipelines upcast it to fp32.
            vae_kwargs["torch_dtype"] = torch.float32
        vae_model = AutoencoderKL.from_pretrained(vae_source or source, **vae_kwargs)
        vae_config = vae_model.config
    elif vae_source is not None:
        vae_config = AutoencoderKL.load_config(vae_source, local_files_only=vae_local)
    else:
        vae_config = AutoencoderKL.load_config(source, subfolder="vae", **common)
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)

    text_encoders: list[Any] = []
    tokenizers: list[Any] = []
    if "text" in components:
        text_kwargs = {**_text_from_pretrained_kwargs(dtype), **common}
        tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common))
        text_encoders.append(CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **text_kwargs))
        if kind == "sdxl":
            tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common))
            text_encoders.append(
                CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **text_kwargs)
            )
        for encoder in text_encoders:
            encoder.to(device).eval().requires_grad_(False)

    if unet is not None:
        unet.to(device).eval()
        if kind == "sdxl" and len(text_encoders) == 2:
            # diffusers' _get_add_time_ids check: 6 time ids + the pooled projection.
            passed = unet.config.addition_time_embed_dim * 6 + text_encoders[1].config.projection_dim
            expected = unet.add_embedding.linear_1.in_features
            if passed != expected:
                raise ValueError(f"UNet expects an added embedding of {expected}, conditioning gives {passed}")
    if vae_model is not None:
        vae_model.to(device).eval().requires_grad_(False)

    if resolution is None:
        resolution = int(unet_config["sample_size"]) * vae_scale_factor
    return DiffusionModel(
        kind,
        unet=unet,
        vae=vae_model,
        scheduler=scheduler,
        scheduler_config=scheduler_config,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        resolution=resolution,
        vae_scale_factor=vae_scale_factor,
        latent_channels=int(vae_config.get("latent_channels", 4)),
        device=device,
        dtype=dtype,
        pretrained=name,
    )
