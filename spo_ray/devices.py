"""The one device and dtype resolver every role of every app uses.

    device = resolve_device(cfg.run.device)          # "auto" | "cpu" | "cuda"
    dtype = model_dtype(cfg.model.dtype, device)      # "auto": bf16 on a GPU, fp32 on a CPU
    torch_dtype("bf16")                               # a config name (or torch's) -> torch.dtype
"""

from __future__ import annotations

import torch

_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}


def resolve_device(setting: str) -> torch.device:
    """``auto``: the GPU when this process sees one, else the CPU; ``cuda`` without one is an error."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible to this process")
    return torch.device(setting)


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.bfloat16`` or a config name such as ``"bf16"`` / ``"bfloat16"`` / ``"torch.float16"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    found = getattr(torch, _ALIASES.get(name, name), None)
    if not isinstance(found, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return found


def model_dtype(setting: str, device: torch.device) -> torch.dtype:
    """A diffusion model's dtype (UNet, VAE, text encoders): ``auto`` is bf16 on a GPU (the
    reference used fp16: a documented deviation) and fp32 on a CPU."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(setting)
