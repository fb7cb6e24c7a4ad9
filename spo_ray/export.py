"""Exporting the trained policy: a LoRA in diffusers format, or a complete diffusers UNet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_state_dict(unet: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers' key names (what ``load_lora_weights`` expects); from
    ``weights`` (by parameter name, e.g. DeepSpeed's fp32 masters) when given, else the module's."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, state_dict=weights)
    return {k: v.detach().float().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}


def lora_adapter_metadata(unet: torch.nn.Module) -> dict[str, Any]:
    """The adapter's ``LoraConfig`` as a dict: what diffusers stores beside the weights so that a
    loader rebuilds the adapter with its rank AND alpha (without it, alpha is taken to be the rank and
    a LoRA trained with ``lora_alpha != rank`` loads at the wrong strength)."""
    configs = getattr(unet, "peft_config", None) or {}
    if len(configs) != 1:
        raise ValueError(f"expected exactly one LoRA adapter on the UNet, found {sorted(configs) or 'none'}")
    (config,) = configs.values()
    return config.to_dict()


def save_lora(
    state_dict: dict[str, torch.Tensor], kind: str, directory: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` loadable with ``pipe.load_lora_weights(directory)``;
    ``metadata`` (:func:`lora_adapter_metadata`) goes into the file's header, as diffusers reads it."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(
        save_directory=str(directory), unet_lora_layers=state_dict, weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True, unet_lora_adapter_metadata=metadata,
    )
    return directory / LORA_WEIGHT_NAME


def save_full_unet(unet: torch.nn.Module, directory: str | Path) -> Path:
    """A complete diffusers UNet directory (``UNet2DConditionModel.from_pretrained`` loads it)."""
    directory = Path(directory)
    unet.save_pretrained(str(directory), safe_serialization=True)
    return directory


def export_policy(unet: torch.nn.Module, *, kind: str, lora: bool, directory: str | Path,
                  weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Export the policy to ``directory``: LoRA weights with their adapter config (from ``weights``
    by parameter name when given: a bf16 DeepSpeed module holds its LoRA's fp32 values in the
    optimizer), or a full UNet directory."""
    if lora:
        return save_lora(lora_state_dict(unet, weights), kind, directory, lora_adapter_metadata(unet))
    return save_full_unet(unet, Path(directory) / "unet")


def checkpoint_lora_exporter(unet: torch.nn.Module, *, kind: str, lora: bool):
    """What ``save_checkpoint(export=...)`` calls to put the LoRA in diffusers' format into each
    checkpoint (None for full fine-tuning: its checkpoint is the UNet's weights, 3.4 GB for SDXL,
    which ``spo-ray`` resumes from and the final export turns into ``final/unet``)."""
    if not lora:
        return None
    metadata = lora_adapter_metadata(unet)

    def export(weights: dict[str, torch.Tensor], directory: Path) -> Path:
        return save_lora(lora_state_dict(unet, weights), kind, directory, metadata)

    return export
