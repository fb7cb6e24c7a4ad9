"""FLOPs per kept pair by role, at the tiny/bench sizes and the published SD1.5/SDXL shapes (meta device)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SIZES = ("tiny", "bench", "sd15", "sdxl")
RUNNABLE = ("tiny", "bench")
ASSUMED_KEPT_FRACTION = 0.8
PUBLISHED_UNET = {
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    ),
}
PUBLISHED_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
)
PICKSCORE_CLIP = dict(
    text_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "max_position_embeddings": 77, "vocab_size": 49408},
    vision_config={"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
                   "image_size": 224, "patch_size": 14},
    projection_dim=1024,
)
# The paper presets' sampling and LoRA shapes (DESIGN.md section 1).
PUBLISHED_SAMPLING = {"sd15": dict(pool_size=4, num_inner_steps=0), "sdxl": dict(pool_size=2, num_inner_steps=3)}
PUBLISHED_LORA_RANK = {"sd15": 4, "sdxl": 64}


# ----------------------------------------------------------------------------- FLOPs


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` by torch's FlopCounterMode (a multiply-add is 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def guided_forwards_per_prompt(num_steps: int, divert_start_step: int, pool_size: int, num_inner_steps: int) -> int:
    """Guided UNet forwards (CFG counted once) one prompt's candidate-pool trajectory takes
    (what ``CandidatePoolSampler.unet_forwards`` counts at run time)."""
    from spo_ray.sampling import plan_segments

    total = divert_start_step + 1  # plain steps, then the forward at the first branching x_t
    for seg in plan_segments(num_steps, divert_start_step, num_inner_steps):
        total += pool_size * (seg.num_transitions - 1)  # inner steps
        if seg.start_step + seg.num_transitions < num_steps:
            total += pool_size  # the forward that continues denoising gives the scored x0_hat
    return total


@dataclass
class Shapes:
    """What FLOP counting needs to know about one model size."""

    kind: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    latent: int
    cond_len: int
    cond_dim: int
    pooled_dim: int | None
    clip: dict[str, Any] | None  # the preference model's CLIP config; None = the brightness rule
    lora_rank: int


def shapes_for(size: str, kind: str = "sd15") -> Shapes:
    if size in RUNNABLE:
        from spo_ray import tiny

        unet = tiny.unet_config(kind, size)
        pooled = tiny.TEXT_PROJECTION if kind == "sdxl" else None
        return Shapes(kind, unet, tiny.vae_config(kind, size), unet["sample_size"], tiny.MAX_LENGTH,
                      unet["cross_attention_dim"], pooled, None, 4)
    unet = PUBLISHED_UNET[size]
    return Shapes(size, unet, PUBLISHED_VAE, unet["sample_size"], 77, unet["cross_attention_dim"],
                  1280 if size == "sdxl" else None, PICKSCORE_CLIP, PUBLISHED_LORA_RANK[size])


def _meta_unet(shapes: Shapes, lora: bool):
    from diffusers import UNet2DConditionModel

    from spo_ray.config import TrainConfig
    from spo_ray.training import add_lora

    with torch.device("meta"):
        unet = UNet2DConditionModel(**shapes.unet)
    if lora:
        add_lora(unet, TrainConfig(lora_rank=shapes.lora_rank))
    return unet


def unet_call(unet, shapes: Shapes, batch: int):
    """One UNet call on ``batch`` latents (meta tensors) with the size's conditioning."""
    dev = next(unet.parameters()).device
    x = torch.zeros(batch, 4, shapes.latent, shapes.latent, device=dev)
    cond = torch.zeros(batch, shapes.cond_len, shapes.cond_dim, device=dev)
    added = None
    if shapes.pooled_dim is not None:
        added = {"text_embeds": torch.zeros(batch, shapes.pooled_dim, device=dev), "time_ids": torch.zeros(batch, 6, device=dev)}
    t = torch.full((batch,), 500, device=dev, dtype=torch.long)
    return unet(x, t, encoder_hidden_states=cond, added_cond_kwargs=added, return_dict=False)[0]


def unet_flops(shapes: Shapes) -> dict[str, int]:
    """Per latent sample: a plain forward; a LoRA policy forward + backward; a frozen forward."""
    plain = _meta_unet(shapes, lora=False)
    with torch.no_grad():
        forward = count_flops(lambda: unet_call(plain, shapes, 1))
    policy = _meta_unet(shapes, lora=True)
    train = count_flops(lambda: unet_call(policy, shapes, 1).float().sum().backward())
    return {"forward": forward, "policy_fwd_bwd": train, "reference_fwd": forward}


def vae_decode_flops(shapes: Shapes) -> int:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**shapes.vae)
    z = torch.zeros(1, 4, shapes.latent, shapes.latent, device="meta")
    with torch.no_grad():
        return count_flops(lambda: vae.decode(z))


def spm_flops(shapes: Shapes) -> dict[str, int]:
    """The step-aware preference model: the vision tower per image (at a timestep), the text tower per prompt."""
    if shapes.clip is None:
        return {"vision_per_image": 0, "text_per_prompt": 0}
    from transformers import CLIPConfig, CLIPModel

    from spo_ray.spm import StepAwarePreferenceModel

    with torch.device("meta"):
        spm = StepAwarePreferenceModel.from_clip(CLIPModel(CLIPConfig(**shapes.clip)))
    image_size = shapes.clip["vision_config"]["image_size"]
    px = torch.zeros(1, 3, image_size, image_size, device="meta")
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    with torch.no_grad():
        vision = count_flops(lambda: spm.image_embeds(px, torch.tensor([500], device="meta")))
        text = count_flops(lambda: spm.text_embeds(ids))
    return {"vision_per_image": vision, "text_per_prompt": text}


def training_inputs_per_pair(seg_len: int) -> dict[str, int]:
    """Distinct UNet inputs per kept pair: the first transition shares x_t (one forward for both
    after issue 9; the reference ran winner and loser separately), later ones are distinct."""
    return {"before": 2 * seg_len, "after": 1 + 2 * (seg_len - 1)}


def flops_report(size: str, *, num_steps: int, divert_start_step: int, pool_size: int, num_inner_steps: int,
                 kept_fraction: float, kind: str = "sd15") -> dict[str, Any]:
    """FLOPs per kept pair by role, before and after issue 9 (meta-device counts, CFG included)."""
    shapes = shapes_for(size, kind)
    unet = unet_flops(shapes)
    decode = vae_decode_flops(shapes)
    spm = spm_flops(shapes)
    from spo_ray.sampling import plan_segments

    segments = plan_segments(num_steps, divert_start_step, num_inner_steps)
    events = len(segments)
    images = events * pool_size
    kept = events * kept_fraction
    forwards = guided_forwards_per_prompt(num_steps, divert_start_step, pool_size, num_inner_steps)
    sampler = forwards * 2 * unet["forward"]  # CFG: two latents per guided forward
    per_input = 2 * (unet["policy_fwd_bwd"] + unet["reference_fwd"])  # policy fwd+bwd and reference fwd, CFG
    out: dict[str, Any] = {
        "size": size, "kind": shapes.kind, "unet_forward_per_sample": unet["forward"],
        "unet_policy_fwd_bwd_per_sample": unet["policy_fwd_bwd"], "vae_decode_per_image": decode,
        "spm_vision_per_image": spm["vision_per_image"], "spm_text_per_prompt": spm["text_per_prompt"],
        "guided_forwards_per_prompt": forwards, "scoring_events_per_prompt": events, "images_per_prompt": images,
        "kept_fraction": kept_fraction, "transitions_per_pair": [s.num_transitions for s in segments],
    }
    for when in ("before", "after"):
        # Scorer: every image decoded and scored; the text tower per image before, per prompt after.
        text = spm["text_per_prompt"] * (images if when == "before" else 1)
        scorer = images * (decode + spm["vision_per_image"]) + text
        inputs = sum(training_inputs_per_pair(s.num_transitions)[when] for s in segments) / events
        trainer_per_pair = inputs * per_input
        roles = {"sampler": sampler / max(kept, 1e-9), "scorer": scorer / max(kept, 1e-9), "trainer": trainer_per_pair}
        total = sum(roles.values())
        out[when] = {"per_kept_pair": roles, "total_per_kept_pair": total,
                     "training_share": roles["trainer"] / total, "training_inputs_per_pair": inputs}
    return out


def training_flops_measured(cfg, num_pairs: int = 2) -> dict[str, float]:
    """FLOPs per transition pair of the project's own ``microbatch_loss`` + backward (the real
    code path, CPU tensors), with the shared x_t (after) and with every input forwarded (before)."""
    from spo_ray.components import load_model
    from spo_ray.training import expand_transitions, microbatch_loss, setup_policy

    model = load_model(cfg, torch.device("cpu"), ("unet", "text"))
    frozen = setup_policy(model.unet, cfg.train)
    shape = model.latent_shape
    gen = torch.Generator().manual_seed(0)
    cond = model.encode_prompts(["a photo"] * num_pairs)
    pairs = {
        "pair_id": torch.arange(num_pairs), "policy_version": torch.zeros(num_pairs, dtype=torch.long),
        "seg_len": torch.ones(num_pairs, dtype=torch.long), "timesteps": torch.full((num_pairs, 1), 501),
        "x_t": torch.randn(num_pairs, *shape, generator=gen),
        "win": torch.randn(num_pairs, 1, *shape, generator=gen), "lose": torch.randn(num_pairs, 1, *shape, generator=gen),
        "score_win": torch.ones(num_pairs), "score_lose": torch.zeros(num_pairs),
        **{f"cond_{k}": torch.from_numpy(v) for k, v in cond.as_dict().items()},
    }
    batch = expand_transitions(pairs)
    out = {}
    for when, shared in (("after", batch["shared"]), ("before", torch.zeros_like(batch["shared"]))):
        step = {**batch, "shared": shared}

        def run(step=step) -> None:
            loss, _ = microbatch_loss(model, model.unet, frozen, step, cfg.train, cfg.sampling)
            loss.backward()

        out[when] = count_flops(run) / num_pairs
    return out
