"""Per-role compute measured with random weights at a size's shapes: FLOP/s and MFU against the
measured dense matmul rate (the CPU here; a GPU wherever one is visible)."""

from __future__ import annotations

import time
from typing import Any

import torch

from spo_ray.bench.flops import shapes_for, spm_flops, unet_call, unet_flops, vae_decode_flops


def measured_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """The device's measured dense matmul rate (FLOP/s) in ``dtype``: the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    reps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        reps += 1
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - started)


def _timed_rate(step, flops_per_call: float, sync, seconds: float) -> float:
    """FLOP/s of ``step()`` repeated for ``seconds`` after one warm-up call."""
    step()
    sync()
    started, reps = time.perf_counter(), 0
    while reps == 0 or time.perf_counter() - started < seconds:
        step()
        reps += 1
    sync()
    return flops_per_call * reps / (time.perf_counter() - started)


def role_throughput(size: str, device: torch.device, dtype: torch.dtype, batch: int = 4,
                    seconds: float = 3.0, flops: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each role's compute at the size's shapes with random weights, timed on ``device``: the
    sampler's guided UNet forward (CFG as one batch), the scorer's VAE decode + preference-model
    vision tower, the trainer's LoRA policy forward + backward and frozen reference forward (CFG).
    MFU is against the device's measured dense matmul rate in ``dtype``; with ``flops`` (a
    ``flops_report``) also the compute time per kept pair (each role on one device, one after the
    other) against the bound total FLOPs / peak. On a GPU at ``sd15`` this is issue 9's figure."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from spo_ray.config import TrainConfig
    from spo_ray.training import add_lora

    shapes = shapes_for(size)
    counted = unet_flops(shapes)
    decode_flops, spm = vae_decode_flops(shapes), spm_flops(shapes)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    peak = measured_peak_flops(device, dtype, n=8192 if device.type == "cuda" else 1024)

    def placed(module: torch.nn.Module) -> torch.nn.Module:
        return module.to(device) if dtype == torch.float32 else module.to(device, dtype)

    frozen = placed(UNet2DConditionModel(**shapes.unet)).eval()
    policy = placed(UNet2DConditionModel(**shapes.unet))
    policy.requires_grad_(False)
    add_lora(policy, TrainConfig(lora_rank=shapes.lora_rank))
    for p in policy.parameters():  # fp32 trainables, as the trainer keeps them
        if p.requires_grad:
            p.data = p.data.float()
    vae = placed(AutoencoderKL(**shapes.vae)).eval()
    z = torch.randn(batch, 4, shapes.latent, shapes.latent, device=device, dtype=dtype)
    cfg_batch = 2 * batch  # CFG: conditional and unconditional latents in one call

    def sampler_step() -> None:
        with torch.no_grad(), autocast:
            unet_call(frozen, shapes, cfg_batch)

    def trainer_step() -> None:
        with autocast:
            with torch.no_grad():
                unet_call(frozen, shapes, cfg_batch)
            unet_call(policy, shapes, cfg_batch).float().sum().backward()

    spm_model = None
    if shapes.clip is not None:
        from transformers import CLIPConfig, CLIPModel

        from spo_ray.spm import StepAwarePreferenceModel

        spm_model = placed(StepAwarePreferenceModel.from_clip(CLIPModel(CLIPConfig(**shapes.clip)))).eval()
        side = shapes.clip["vision_config"]["image_size"]
        pixels = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
        steps = torch.full((batch,), 500, device=device)

    def scorer_step() -> None:
        with torch.no_grad(), autocast:
            vae.decode(z)
            if spm_model is not None:
                spm_model.image_embeds(pixels, steps)

    per_call = {
        "sampler": cfg_batch * counted["forward"],
        "scorer": batch * (decode_flops + spm["vision_per_image"]),
        "trainer": cfg_batch * (counted["policy_fwd_bwd"] + counted["reference_fwd"]),
    }
    result: dict[str, Any] = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "batch": batch,
                              "peak_flops_per_s": peak, "roles": {}}
    for role, step in (("sampler", sampler_step), ("scorer", scorer_step), ("trainer", trainer_step)):
        rate = _timed_rate(step, per_call[role], sync, seconds)
        result["roles"][role] = {"flops_per_s": rate, "mfu": rate / peak}
    if flops is not None:
        per_pair = flops["after"]["per_kept_pair"]
        result["seconds_per_kept_pair"] = sum(per_pair[r] / result["roles"][r]["flops_per_s"] for r in per_pair)
        result["bound_seconds_per_kept_pair"] = flops["after"]["total_per_kept_pair"] / peak
    return result


# ----------------------------------------------------------------------------- engine runs
