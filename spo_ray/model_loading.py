"""Loading SD1.5 / SDXL from a local diffusers directory, a hub id or ``tiny:<kind>`` (the same path for
all three), with the layout checked first and each component in its dtype."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from spo_ray.diffusion import make_ddim_scheduler
from spo_ray.models import COMPONENTS, KINDS, TINY_PREFIX, DiffusionModel

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

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
