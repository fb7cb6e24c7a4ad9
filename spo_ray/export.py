"""Exporting the trained policy: a LoRA in diffusers format, or a complete diffusers UNet."""

from __future__ import annotations

from pathlib import Path

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers' key names (what ``load_lora_weights`` expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet)
    return {k: v.detach().float().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}


def save_lora(state_dict: dict[str, torch.Tensor], kind: str, directory: str | Path) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` loadable with ``pipe.load_lora_weights(directory)``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(
        save_directory=str(directory), unet_lora_layers=state_dict, weight_name=LORA_WEIGHT_NAME, safe_serialization=True
    )
    return directory / LORA_WEIGHT_NAME


def save_full_unet(unet: torch.nn.Module, directory: str | Path) -> Path:
    """A complete diffusers UNet directory (``UNet2DConditionModel.from_pretrained`` loads it)."""
    directory = Path(directory)
    unet.save_pretrained(str(directory), safe_serialization=True)
    return directory


def export_policy(unet: torch.nn.Module, *, kind: str, lora: bool, directory: str | Path) -> Path:
    """Export the policy to ``directory``: LoRA weights or a full UNet directory."""
    if lora:
        return save_lora(lora_state_dict(unet), kind, directory)
    return save_full_unet(unet, Path(directory) / "unet")
