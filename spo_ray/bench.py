"""`spo-ray bench`: both engines on identical work, one table (issue 7), FLOPs per kept pair by role (issue 9).

    spo-ray bench --size bench --samplers 1 2 4 --rounds 3 --out bench-out

Every engine run gets the same config (prompts, seeds, model, pool size, steps, rounds); the Ray
runs differ only in the number of sampler actors (one scorer, one trainer worker, lag 1, one torch
thread per actor unless ``ray.<role>.torch_threads`` overrides say otherwise). The Ray runs share one local cluster that this command starts itself
(``ray.init(address="local")``, its own temp dir, no dashboard; logical CPUs are not the physical
cores: 1, 2 and 4 samplers are logical resources on whatever the machine has).

Sizes: ``tiny`` (tests), ``bench`` (SD1.5-shaped, UNet widths 128/256 at 32x32 latents: the UNet
dominates a CPU run), and ``sd15`` / ``sdxl``: the published UNet/VAE/PickScore configs with random
weights on the meta device, for FLOP counting (nothing is downloaded; the engines run only at the
tiny and bench sizes).

Throughput is measured in steady state: kept pairs of rounds 2..N over the time from the end of
round 1 to the end of round N (start-up, model loading and Ray Train's start are excluded and
reported separately as end-to-end rates).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

SIZES = ("tiny", "bench", "sd15", "sdxl")
RUNNABLE = ("tiny", "bench")
TARGET_RATIO = 0.9  # distributed >= 0.9x in-process kept pairs/s
TARGET_HOP = 1.5  # each hop's bytes <= 1.5x its tensor minimum
DEMO_PROMPTS = 16  # the runs use the demo prompt file's 16 prompts
# Pairs kept per scoring event assumed for the published sizes (not run here); the runnable sizes
# use the kept fraction their own runs measured.
ASSUMED_KEPT_FRACTION = 0.8
BRIGHTNESS_SCALE = {"bench": 20000.0}

# Published configs (stable-diffusion-v1-5, stable-diffusion-xl-base-1.0, PickScore_v1 = CLIP ViT-H/14).
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


@dataclass
class BenchOptions:
    size: str = "bench"
    samplers: list[int] = field(default_factory=lambda: [1, 2, 4])
    engines: list[str] = field(default_factory=lambda: ["in-process", "ray"])
    rounds: int = 3  # round 1 is start-up; rounds 2..N are the steady window
    prompts_per_round: int = 4
    steps: int = 10
    out: str = "bench-out"
    ray_cpus: int = 8  # logical CPUs of the local cluster (roles are 1 logical CPU each)
    flops: bool = True
    overrides: list[str] = field(default_factory=list)


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


def _unet_call(unet, shapes: Shapes, batch: int):
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
        forward = count_flops(lambda: _unet_call(plain, shapes, 1))
    policy = _meta_unet(shapes, lora=True)
    train = count_flops(lambda: _unet_call(policy, shapes, 1).float().sum().backward())
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
            _unet_call(frozen, shapes, cfg_batch)

    def trainer_step() -> None:
        with autocast:
            with torch.no_grad():
                _unet_call(frozen, shapes, cfg_batch)
            _unet_call(policy, shapes, cfg_batch).float().sum().backward()

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


def bench_config(opts: BenchOptions, engine: str, samplers: int):
    """The one config every engine run shares (only the run name and the sampler count differ)."""
    from spo_ray.config import load_config
    from spo_ray.tiny import ensure_tiny_pipeline

    prompts = opts.rounds * opts.prompts_per_round
    # The brightness rule's gaps shrink with image size (a mean over 256x256 pixels): this scale
    # keeps ~60% of scoring events at the bench size, as the preset's 5000 does at the tiny size.
    scale = [f"scorer.kwargs={{scale: {BRIGHTNESS_SCALE[opts.size]}}}"] if opts.size in BRIGHTNESS_SCALE else []
    overrides = [*scale,
        f"model.pretrained={ensure_tiny_pipeline('sd15', opts.size)}", "model.dtype=fp32",
        f"sampling.num_steps={opts.steps}", f"sampling.prompts_per_round={opts.prompts_per_round}",
        f"train.epochs={max(1, math.ceil(prompts / DEMO_PROMPTS))}", f"data.max_prompts={DEMO_PROMPTS}",
        f"run.max_rounds={opts.rounds}", "run.checkpoint_every_rounds=0", "run.progress=false", "run.device=cpu",
        "tracking.enabled=false", f"run.output_dir={Path(opts.out).resolve() / 'runs'}",
        f"run.name=bench-{engine}-{samplers}",
        f"ray.num_samplers={samplers}", "ray.num_scorers=1", "ray.num_trainers=1", "ray.max_policy_lag=1",
        "ray.torch_threads_per_actor=1",  # roles do not oversubscribe the cores
        *opts.overrides,
    ]
    return load_config("tiny-sd15", overrides=overrides)


def _records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if r["kind"] == kind]


def round_sizes(cfg) -> dict[int, int]:
    """Prompts per round of a bench run's prompt plan (an epoch's last round may be short)."""
    from spo_ray.components import prompt_plan

    return {r.index: len(r.prompt_ids) for r in prompt_plan(cfg, DEMO_PROMPTS).rounds()}


def measure_run(engine: str, summary: dict[str, Any], run_dir: Path, wall: float, samplers: int,
                prompts_per_round: dict[int, int]) -> dict[str, Any]:
    """One engine run's row. Every rate and fraction is over the steady window, from the end of
    round 1 to the end of round N (start-up excluded), the same definition for both engines.

    Prompts/s is the engines' comparable rate: every prompt costs the same sampling and scoring
    work, while how many of its pairs are kept depends on the policy that sampled it, which at lag 1
    is not the in-process engine's (so kept pairs per round differ between the engines)."""
    from spo_ray import telemetry

    rounds = sorted(_records(run_dir, "round"), key=lambda r: r["round"])
    if len(rounds) < 2:
        raise ValueError(f"{run_dir}: the benchmark needs at least 2 rounds to measure a steady state")
    steady = rounds[1:]
    window = (rounds[0]["time"], rounds[-1]["time"])
    span = max(window[1] - window[0], 1e-9)
    pairs = sum(len(r.get("pair_ids", [])) for r in steady)
    steady_ids = {r["round"] for r in steady}
    steps = sum(1 for r in _records(run_dir, "step") if r.get("round") in steady_ids)
    tel = telemetry.summarize(summary.get("telemetry", {}).get("snapshots", {}), window)["roles"]
    sampler, scorer, trainer = (tel.get(r, {}) for r in ("sampler", "scorer", "trainer"))
    if engine == "ray":  # rank 0's round records: round r trains between the ends of rounds r-1 and r
        waits = sum(r.get("wait_seconds", 0.0) for r in steady)
        trainer_busy = span - waits
    else:
        waits, trainer_busy = 0.0, trainer.get("busy_seconds", 0.0)
    n_samplers, n_scorers = max(sampler.get("actors", 1), 1), max(scorer.get("actors", 1), 1)
    busy = {
        "sampler": sampler.get("busy_seconds", 0.0) / span / n_samplers,
        "scorer": scorer.get("busy_seconds", 0.0) / span / n_scorers,
        "trainer": trainer_busy / span,
    }
    sc, so = sampler.get("counters", {}), scorer.get("counters", {})
    st, sot = sampler.get("totals", {}), scorer.get("totals", {})
    acc = summary["accounting"]
    lags = summary.get("lags") or [0] * len(rounds)
    row: dict[str, Any] = {
        "engine": engine, "samplers": samplers if engine == "ray" else None, "rounds": len(rounds),
        "kept_pairs_per_s": pairs / span, "steady_window_s": span, "steady_pairs": pairs,
        "prompts_per_s": sum(prompts_per_round[r["round"]] for r in steady) / span,
        "kept_pairs_per_s_end_to_end": acc["trained"] / max(wall, 1e-9), "wall_s": wall,
        "kept": acc["kept"], "scoring_events": acc["scoring_events"], "optimizer_steps": acc["optimizer_steps"],
        "unet_forwards_per_s_per_sampler": sc.get("unet_forwards", 0) / span / n_samplers,
        "images_scored_per_s_per_scorer": so.get("images_scored", 0) / span / n_scorers,
        "optimizer_steps_per_s": steps / span,
        "busy_fraction": busy,
        "wall_split": {"sampling": busy["sampler"], "scoring": busy["scorer"], "training": busy["trainer"],
                       "waiting": waits / span},
        "peak_rss_mib": {r: tel.get(r, {}).get("peak_rss_bytes", 0) / 2**20 for r in ("sampler", "scorer", "trainer")},
        "policy_lag": {str(k): v for k, v in sorted(Counter(int(x) for x in lags).items())},  # JSON keys
        "unet_forwards": st.get("unet_forwards", 0), "prompts": acc["prompts"],
        # Whole run, the engine's own processes (in process: one process for all roles; on Ray the
        # role actors, not Ray's own daemons): robust to other tenants, unlike wall-clock rates.
        "cpu_seconds": (sampler.get("cpu_seconds", 0.0) if engine == "in-process"
                        else sum(tel.get(r, {}).get("cpu_seconds", 0.0) for r in ("sampler", "scorer", "trainer"))),
    }
    row["cpu_seconds_per_kept_pair"] = row["cpu_seconds"] / max(acc["kept"], 1)
    if engine == "ray":
        row["hops"] = {
            "sampler_to_scorer": {
                "bytes": st.get("bytes_out", 0), "min_bytes": st.get("min_bytes_out", 0),
                "per_scoring_event": st.get("bytes_out", 0) / max(acc["scoring_events"], 1),
                "min_per_scoring_event": st.get("min_bytes_out", 0) / max(acc["scoring_events"], 1),
                "ratio": st.get("bytes_out", 0) / max(st.get("min_bytes_out", 1), 1),
            },
            "scorer_to_trainer": {
                "bytes": sot.get("bytes_out", 0), "min_bytes": sot.get("min_bytes_out", 0),
                "per_kept_pair": sot.get("bytes_out", 0) / max(acc["kept"], 1),
                "min_per_kept_pair": sot.get("min_bytes_out", 0) / max(acc["kept"], 1),
                "ratio": sot.get("bytes_out", 0) / max(sot.get("min_bytes_out", 1), 1),
            },
        }
        row["bottleneck"] = max(busy, key=busy.get)  # the busiest role (per actor) bounds the stream
    return row


def run_in_process_bench(opts: BenchOptions) -> dict[str, Any]:
    from spo_ray.local_engine import run_in_process

    cfg = bench_config(opts, "in-process", 1)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a fresh run: no appended metrics, no resume
    started, load = time.time(), os.getloadavg()[0]
    summary = run_in_process(cfg)
    row = measure_run("in-process", summary, cfg.run_dir, time.time() - started, 1, round_sizes(cfg))
    return {**row, "load_average": [load, os.getloadavg()[0]]}


def start_local_ray(opts: BenchOptions) -> None:
    """A local cluster of this process' own (own temp dir, random ports, no dashboard)."""
    import ray

    if ray.is_initialized():
        return
    env = {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # ray.train.report blocks ~1.5 s per call otherwise
        "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "torch_extensions"),
        "OMP_NUM_THREADS": "1",
    }
    os.environ.update({k: v for k, v in env.items() if k != "OMP_NUM_THREADS"})
    ray.init(
        address="local", num_cpus=opts.ray_cpus, include_dashboard=False, log_to_driver=False,
        _temp_dir=f"/tmp/ray-spo-bench-{os.getpid()}", runtime_env={"env_vars": env},
    )


def run_ray_bench(opts: BenchOptions, samplers: int) -> dict[str, Any]:
    from spo_ray.config import role_threads
    from spo_ray.ray.driver import run_on_ray

    cfg = bench_config(opts, "ray", samplers)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a fresh run: no appended metrics, no resume
    start_local_ray(opts)
    started, load = time.time(), os.getloadavg()[0]
    summary = run_on_ray(cfg)
    row = measure_run("ray", summary, cfg.run_dir, time.time() - started, samplers, round_sizes(cfg))
    threads = {role: role_threads(cfg.ray, role) for role in ("sampler", "scorer", "trainer")}
    return {**row, "torch_threads": threads, "load_average": [load, os.getloadavg()[0]]}


# ----------------------------------------------------------------------------- the report


def machine() -> dict[str, Any]:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_cores": os.cpu_count(), "memory_gib": round(mem, 1), "gpu": gpu, "platform": platform.platform(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _tflop(x: float) -> str:
    return f"{x / 1e12:.3g} T" if x >= 1e11 else f"{x / 1e9:.3g} G"


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each from this run: the kept-pairs ratio and the hop bytes of every Ray run."""
    base = next((r for r in rows if r["engine"] == "in-process"), None)
    targets = []
    for row in rows:
        if row["engine"] != "ray":
            continue
        if base is not None:
            ratio = row["kept_pairs_per_s"] / max(base["kept_pairs_per_s"], 1e-12)
            prompt_ratio = row["prompts_per_s"] / max(base["prompts_per_s"], 1e-12)
            row["ratio_vs_in_process"], row["prompt_ratio_vs_in_process"] = ratio, prompt_ratio
            # Met only if both rates are: kept pairs/s alone can be flattered by a lucky kept count.
            targets.append({"target": f"ray ({row['samplers']} sampler(s)) >= {TARGET_RATIO}x in-process "
                                      "kept pairs/s and prompts/s (the lower shown)",
                            "value": min(ratio, prompt_ratio), "met": min(ratio, prompt_ratio) >= TARGET_RATIO})
        for hop, h in row["hops"].items():
            targets.append({"target": f"{hop} bytes <= {TARGET_HOP}x tensor minimum ({row['samplers']} samplers)",
                            "value": h["ratio"], "met": h["ratio"] <= TARGET_HOP})
    return targets


def _threads_phrase(rows: list[dict[str, Any]]) -> str:
    ray_threads = [r["torch_threads"] for r in rows if "torch_threads" in r]
    if not ray_threads:
        return "in-process engine only"
    per_role = " / ".join(f"{role} {n}" for role, n in ray_threads[0].items())
    mixed = " (differs between runs: see bench.json)" if any(t != ray_threads[0] for t in ray_threads) else ""
    return f"torch threads per Ray actor: {per_role}{mixed}; the in-process engine uses {torch.get_num_threads()}"


def render_markdown(result: dict[str, Any]) -> str:
    rows = result["runs"]
    heads = [("in-process" if r["engine"] == "in-process" else f"ray, {r['samplers']} sampler(s)") for r in rows]
    lines = [f"Size `{result['options']['size']}`: {result['options']['rounds']} rounds x "
             f"{result['options']['prompts_per_round']} prompts, {result['options']['steps']} DDIM steps, pool k=4, "
             f"lag 1, one trainer worker, one scorer; {_threads_phrase(rows)}.", "",
             "| | " + " | ".join(heads) + " |", "|---|" + "---|" * len(rows)]

    def add(name: str, values: list[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(values) + " |")

    if not rows:  # the published sizes: FLOP counting only (the engines run at tiny and bench)
        lines = []

    if rows:
        add("**kept pairs/s** (steady: rounds 2..N; all rates below too)", [_fmt(r["kept_pairs_per_s"], 3) for r in rows])
        add("ratio distributed / in-process (kept pairs/s)", [_fmt(r.get("ratio_vs_in_process")) if r["engine"] == "ray" else "1.00" for r in rows])
        add("**prompts/s** (same sampling + scoring work per prompt)", [_fmt(r["prompts_per_s"], 3) for r in rows])
        add("ratio distributed / in-process (prompts/s)",
            [_fmt(r.get("prompt_ratio_vs_in_process")) if r["engine"] == "ray" else "1.00" for r in rows])
        add("kept pairs in the steady rounds", [str(r["steady_pairs"]) for r in rows])
        add("kept pairs/s end to end (incl. start-up)", [_fmt(r["kept_pairs_per_s_end_to_end"], 3) for r in rows])
        add("UNet forwards/s per sampler", [_fmt(r["unet_forwards_per_s_per_sampler"]) for r in rows])
        add("images scored/s per scorer", [_fmt(r["images_scored_per_s_per_scorer"]) for r in rows])
        add("optimizer steps/s", [_fmt(r["optimizer_steps_per_s"], 3) for r in rows])
        add("busy fraction sampler / scorer / trainer",
            [" / ".join(_fmt(r["busy_fraction"][k]) for k in ("sampler", "scorer", "trainer")) for r in rows])
        add("wall split sampling / scoring / training / waiting",
            [" / ".join(_fmt(r["wall_split"][k]) for k in ("sampling", "scoring", "training", "waiting")) for r in rows])
        add("sampler -> scorer bytes per scoring event (x min)",
            [f"{_fmt(r['hops']['sampler_to_scorer']['per_scoring_event'], 0)} ({_fmt(r['hops']['sampler_to_scorer']['ratio'], 3)}x)"
             if "hops" in r else "in memory" for r in rows])
        add("scorer -> trainer bytes per kept pair (x min)",
            [f"{_fmt(r['hops']['scorer_to_trainer']['per_kept_pair'], 0)} ({_fmt(r['hops']['scorer_to_trainer']['ratio'], 3)}x)"
             if "hops" in r else "in memory" for r in rows])
        add("peak RSS MiB sampler / scorer / trainer",
            [" / ".join(_fmt(r["peak_rss_mib"][k], 0) for k in ("sampler", "scorer", "trainer")) for r in rows])
        add("policy lag (rounds: count)", [", ".join(f"{k}: {v}" for k, v in r["policy_lag"].items()) for r in rows])
        add("bottleneck role", [r.get("bottleneck", "-") for r in rows])
        add("CPU seconds per kept pair (whole run, engine processes)", [_fmt(r["cpu_seconds_per_kept_pair"]) for r in rows])
        add("wall seconds", [_fmt(r["wall_s"], 0) for r in rows])
        add("machine load average (1 min) before / after", [" / ".join(_fmt(x, 1) for x in r["load_average"]) for r in rows])

    if result.get("flops"):
        f = result["flops"]
        lines += ["", f"FLOPs (FlopCounterMode; multiply-add = 2), size `{f['size']}`: UNet forward "
                  f"{_tflop(f['unet_forward_per_sample'])}FLOP per sample, VAE decode {_tflop(f['vae_decode_per_image'])}FLOP "
                  f"per image, SPM {_tflop(f['spm_vision_per_image'])}FLOP per image + {_tflop(f['spm_text_per_prompt'])}FLOP "
                  f"text; kept fraction {f['kept_fraction']:.2f}.", "",
                  "| per kept pair | sampler | scorer | trainer | total | training share |", "|---|---|---|---|---|---|"]
        for when in ("before", "after"):
            w = f[when]
            roles = w["per_kept_pair"]
            lines.append(f"| {when} | " + " | ".join(_tflop(roles[k]) + "FLOP" for k in ("sampler", "scorer", "trainer"))
                         + f" | {_tflop(w['total_per_kept_pair'])}FLOP | {w['training_share']:.1%} |")
        if "measured_training" in f:
            m = f["measured_training"]
            lines.append("")
            lines.append(f"Project code (`microbatch_loss` + backward, CPU) per transition pair: after "
                         f"{_tflop(m['after'])}FLOP, before {_tflop(m['before'])}FLOP (x{m['before'] / max(m['after'], 1):.2f}).")
        if "achieved" in f:
            a = f["achieved"]
            lines.append(f"Achieved {a['flops_per_s'] / 1e9:.1f} GFLOP/s (in-process, steady) = {a['mfu']:.1%} of this "
                         f"machine's measured fp32 matmul rate ({a['peak_flops_per_s'] / 1e9:.0f} GFLOP/s).")
    if result.get("flops", {}).get("roles_measured"):
        m = result["flops"]["roles_measured"]
        lines += ["", f"Per-role compute, measured on {m['device']} in {m['dtype']} (random weights at these shapes, "
                  f"batch {m['batch']}, CFG as one batch); MFU against the measured dense matmul rate "
                  f"({_tflop(m['peak_flops_per_s'])}FLOP/s):", "",
                  "| role | work timed | FLOP/s | MFU |", "|---|---|---|---|"]
        work = {"sampler": "guided UNet forward", "scorer": "VAE decode + SPM vision tower",
                "trainer": "LoRA policy fwd + bwd, reference fwd"}
        for role, r in m["roles"].items():
            lines.append(f"| {role} | {work[role]} | {_tflop(r['flops_per_s'])}FLOP/s | {r['mfu']:.1%} |")
        if "seconds_per_kept_pair" in m:
            lines += ["", f"Compute time per kept pair at these rates (roles one after the other on one device): "
                      f"{m['seconds_per_kept_pair'] * 1e3:.0f} ms, against the bound (FLOPs per kept pair / peak) "
                      f"{m['bound_seconds_per_kept_pair'] * 1e3:.0f} ms."]
    if result.get("targets"):
        lines += ["", "| target | value | met |", "|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {_fmt(t['value'], 3)} | {'yes' if t['met'] else '**no**'} |")
    m = result["machine"]
    lines += ["", f"Machine: {m['cpu_cores']} CPU cores, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}, "
              f"torch {m['torch']}; {result['seconds']:.0f} s in all."]
    return "\n".join(lines) + "\n"


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Run the suite; write ``bench.json`` and ``bench.md`` under ``opts.out``; return the result."""
    if opts.size not in SIZES:
        raise ValueError(f"unknown size {opts.size!r}; expected one of {SIZES}")
    started = time.time()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"options": asdict(opts), "machine": machine(), "runs": []}
    if opts.size in RUNNABLE:
        if "in-process" in opts.engines:
            result["runs"].append(run_in_process_bench(opts))
        if "ray" in opts.engines:
            for n in opts.samplers:
                result["runs"].append(run_ray_bench(opts, n))
        result["targets"] = evaluate_targets(result["runs"])
    if opts.flops:
        runs = result["runs"]
        kept_fraction = (statistics.mean(r["kept"] / max(r["scoring_events"], 1) for r in runs)
                         if runs else ASSUMED_KEPT_FRACTION)
        sampling = dict(num_steps=opts.steps, divert_start_step=4, pool_size=4, num_inner_steps=0)
        if opts.size not in RUNNABLE:
            sampling = dict(num_steps=20, divert_start_step=4, **PUBLISHED_SAMPLING[opts.size])
        flops = flops_report(opts.size, kept_fraction=kept_fraction, **sampling)
        if torch.cuda.is_available():
            flops["roles_measured"] = role_throughput(opts.size, torch.device("cuda"), torch.bfloat16, flops=flops)
        elif opts.size in RUNNABLE:  # the published sizes are too slow for a CPU
            flops["roles_measured"] = role_throughput(opts.size, torch.device("cpu"), torch.float32, batch=2,
                                                      seconds=0.5 if opts.size == "tiny" else 2.0, flops=flops)
        if opts.size in RUNNABLE:
            flops["measured_training"] = training_flops_measured(bench_config(opts, "flops", 1))
            base = next((r for r in runs if r["engine"] == "in-process"), None)
            if base is not None:  # the engines run on the CPU (run.device=cpu): one CPU peak for both lines
                cpu_roles = flops.get("roles_measured", {})
                peak = (cpu_roles["peak_flops_per_s"] if cpu_roles.get("device") == "cpu"
                        else measured_peak_flops(torch.device("cpu"), torch.float32, n=1024))
                rate = flops["after"]["total_per_kept_pair"] * base["kept_pairs_per_s"]
                flops["achieved"] = {"flops_per_s": rate, "peak_flops_per_s": peak, "mfu": rate / peak}
        result["flops"] = flops
    result["seconds"] = time.time() - started
    result["markdown"] = render_markdown(result)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "bench.md").write_text(result["markdown"])
    return result
