"""Fidelity measurements: how far a setting or a past preprocessing moves SPO from the reference's.

``python -m spo_ray.fidelity <what>`` (docs/fidelity.md records the figures and the commands):

- ``spm-inputs``: the SPM's pixel inputs made the reference's way (raw decode, bicubic resize without
  antialias, then clamp) against the way this project made them before (clamped decode, antialiased
  resize), on random images with a natural 1/f spectrum, as a relative L2 distance.
- ``trajectory-bf16``: how much storing the trajectory latents in bf16 would move the log-prob's
  standardised residual (x_{t-1} - mu) / sigma at each step, on tiny-model trajectories.
- ``scorer-dtype``: candidate pools sampled once, decoded once (raw, as the scorer sees them) and scored
  by the step-aware preference model in fp32 (the reference's precision) and in bf16 / fp16; counts the
  scoring events whose keep decision flips or whose kept pair changes. The SPM is the tiny random CLIP
  (``logit_scale`` = ln 100, as PickScore) with seeded non-zero adaLN modulation, so t matters as in a
  trained SPM. Random weights size the effect of the dtype, not the released SPM's flip rate.

    python -m spo_ray.fidelity spm-inputs
    python -m spo_ray.fidelity trajectory-bf16 --prompts 8
    python -m spo_ray.fidelity scorer-dtype --size tiny --prompts 64
    python -m spo_ray.fidelity scorer-dtype --size bench --prompts 16
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("spo_ray.fidelity")


def tiny_trained_spm(path: Path, *, seed: int = 0, std: float = 0.05) -> Path:
    """A tiny SPM checkpoint (safetensors) whose modulation is non-zero, so its scores depend on t."""
    from spo_ray.spm import StepAwarePreferenceModel

    spm = StepAwarePreferenceModel.from_pretrained("tiny")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in spm.named_parameters():
            if "adaLN_modulation" in name or "t_embedder" in name:
                param.add_(torch.randn(param.shape, generator=gen) * std)
    return spm.save_safetensors(path)


def sample_pools(size: str, num_prompts: int, *, seed: int = 42, overrides: list[str] | None = None):
    """Trajectory records of ``num_prompts`` demo prompts with the tiny/bench SD1.5 model (fp32, CPU)."""
    from spo_ray import records as rec_mod
    from spo_ray.components import fit_prompts_to_tokenizer, load_model, load_prompt_set
    from spo_ray.config import load_config
    from spo_ray.sampling import CandidatePoolSampler
    from spo_ray.tiny import ensure_tiny_pipeline

    cfg = load_config("tiny-sd15", overrides=[
        f"model.pretrained={ensure_tiny_pipeline('sd15', size)}", "model.dtype=fp32", "run.device=cpu",
        f"data.max_prompts={num_prompts}", *(overrides or []),
    ])
    model = load_model(cfg, torch.device("cpu"), ("unet", "vae", "text"))
    prompts = fit_prompts_to_tokenizer(load_prompt_set(cfg), model.tokenizers[0]).prompts
    if len(prompts) < num_prompts:
        raise ValueError(f"the prompt file has {len(prompts)} prompts, {num_prompts} were asked for")
    sampler = CandidatePoolSampler(model, cfg.sampling, seed)
    batches, per = [], cfg.sampling.prompts_per_round
    for lo in range(0, num_prompts, per):
        ids = list(range(lo, min(lo + per, num_prompts)))
        batches.append(sampler.sample([prompts[i] for i in ids], ids, epoch=0, round_index=lo // per, policy_version=0))
    return cfg, model, rec_mod.concat(batches)


def natural_images(n: int, h: int, w: int, *, seed: int = 0, amplitude: float = 0.5) -> torch.Tensor:
    """Random images ``[n, 3, h, w]`` with a natural 1/f amplitude spectrum and std ``amplitude``
    (0.5: ~5 % of the pixels beyond [-1, 1], as a raw VAE decode has)."""
    gen = torch.Generator().manual_seed(seed)
    fy, fx = torch.fft.fftfreq(h).view(-1, 1), torch.fft.rfftfreq(w).view(1, -1)
    f = (fx**2 + fy**2).sqrt().clamp(min=1.0 / max(h, w))
    shape = (n, 3, h, w // 2 + 1)
    spectrum = torch.complex(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) / f
    img = torch.fft.irfft2(spectrum, s=(h, w))
    img = img - img.mean(dim=(-2, -1), keepdim=True)
    return img / img.std(dim=(-2, -1), keepdim=True) * amplitude


def previous_spm_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The SPM input as this project made it before: the decode clamped to [-1, 1], mapped to [0, 1],
    resized with antialiasing, clamped, centre-cropped, normalised (kept only to measure the change)."""
    import torch.nn.functional as F

    from spo_ray.spm import CLIP_MEAN, CLIP_STD

    x = (images.float().clamp(-1, 1) + 1) / 2
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def spm_input_difference(sizes: tuple[int, ...] = (512, 1024), n: int = 8, seed: int = 0) -> dict[str, Any]:
    """Relative L2 distance ||new - previous|| / ||new|| of the SPM's pixel inputs, per image size, and
    the share of it due to the antialiasing alone (both clamped first)."""
    from spo_ray.spm import preprocess_images

    out: dict[str, Any] = {"images": n, "amplitude": 0.5, "spectrum": "1/f"}
    for side in sizes:
        images = natural_images(n, side, side, seed=seed + side)
        new = preprocess_images(images)
        previous = previous_spm_preprocess(images)
        clamped = preprocess_images(images.clamp(-1, 1))
        out[str(side)] = {
            "outside_unit_range": float((images.abs() > 1).float().mean()),
            "relative_l2": float((new - previous).norm() / new.norm()),
            "relative_l2_antialias_only": float((clamped - previous).norm() / clamped.norm()),
        }
    return out


@torch.no_grad()
def trajectory_bf16_residual(num_prompts: int = 8, *, seed: int = 42, last: int = 4) -> dict[str, Any]:
    """Per step, the RMS change of (x_{t-1} - mu) / sigma if x_t and x_{t-1} were stored in bf16, against
    the RMS of that residual itself (~1, the drawn noise). mu moves with x_t by sqrt(a_prev / a_t)
    (the noise prediction is held fixed: the UNet sees a bf16 input either way)."""
    from spo_ray.diffusion import _alphas, ddim_mean_std

    cfg, model, records = sample_pools("tiny", num_prompts, seed=seed)
    x_t, chains = records["x_t"], records["chains"][:, :, :, 0]  # [B, S, ...], [B, S, k, ...]
    steps = records["seg_start"][0].tolist()
    scheduler = model.scheduler
    out: dict[str, Any] = {"prompts": num_prompts, "steps": {}}
    for s, step in list(enumerate(steps))[-last:]:
        t = int(scheduler.timesteps[step])
        a_t, a_prev = _alphas(scheduler, t, 1)
        _, std, _ = ddim_mean_std(scheduler, torch.zeros(1, 1), t, torch.zeros(1, 1), eta=cfg.sampling.eta)
        sigma = float(std.flatten()[0])
        start = x_t[:, s].unsqueeze(1)
        d_out = chains[:, s].to(torch.bfloat16).float() - chains[:, s]
        d_in = start.to(torch.bfloat16).float() - start
        shift = float((a_prev / a_t).sqrt())
        dz = (d_out - shift * d_in) / sigma
        rms, change = float(chains[:, s].pow(2).mean().sqrt()), float(dz.pow(2).mean().sqrt())
        out["steps"][t] = {
            "sigma": sigma, "latent_rms": rms, "residual_change_rms": change,
            "residual_change_max": float(dz.abs().max()),
            # bf16's rounding is relative: scaled to latents of RMS 1 (SD's scaled latents; the tiny
            # random model's are far larger)
            "residual_change_rms_at_unit_latents": change / rms,
        }
    return out


@torch.no_grad()
def scorer_dtype_flips(
    size: str = "tiny",
    num_prompts: int = 64,
    *,
    dtypes: tuple[str, ...] = ("bf16", "fp16"),
    threshold: float = 0.3,
    seed: int = 42,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Keep decisions of the fp32 SPM against each of ``dtypes`` on the same pools (see the module docstring)."""
    from spo_ray.preference import select_pair
    from spo_ray.scorers import StepAwareScorer

    started = time.time()
    cfg, model, records = sample_pools(size, num_prompts, seed=seed, overrides=overrides)
    x0_hat: torch.Tensor = records["x0_hat"]  # [B, S, k, C, H, W]
    batch, segments, k = x0_hat.shape[:3]
    latents = x0_hat.reshape(-1, *x0_hat.shape[3:])
    images = torch.cat([model.decode(latents[lo : lo + 64], clamp=False) for lo in range(0, latents.shape[0], 64)])
    prompts = [p for p in records["prompt"] for _ in range(segments * k)]
    timesteps = records["score_t"].unsqueeze(-1).expand(batch, segments, k).reshape(-1)
    sampled_s = time.time() - started

    def decisions(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return select_pair(scores.view(-1, k).T, threshold)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = tiny_trained_spm(Path(tmp) / "spm.safetensors", seed=seed)
        base = StepAwareScorer("tiny", checkpoint, dtype="fp32").score(images, prompts, timesteps)
        win, lose, keep = decisions(base)
        ranked = base.view(-1, k).sort(dim=1).values
        gap = torch.softmax(torch.stack([ranked[:, -1], ranked[:, 0]]), dim=0)
        result: dict[str, Any] = {
            "size": size, "prompts": batch, "segments_per_prompt": segments, "pool_size": k,
            "scoring_events": batch * segments, "images": images.shape[0], "threshold": threshold,
            "image_px": images.shape[-1], "kept_fp32": int(keep.sum()),
            "median_softmax_gap_fp32": float((gap[0] - gap[1]).median()),
            "median_score_spread_fp32": float((ranked[:, -1] - ranked[:, 0]).median()),
            "by_dtype": {},
        }
        for name in dtypes:
            scores = StepAwareScorer("tiny", checkpoint, dtype=name).score(images, prompts, timesteps)
            w, lo, kp = decisions(scores)
            both = keep & kp
            err = (scores - base).abs()
            result["by_dtype"][name] = {
                "kept": int(kp.sum()),
                "keep_flips": int((kp != keep).sum()),
                "kept_to_rejected": int((keep & ~kp).sum()),
                "rejected_to_kept": int((~keep & kp).sum()),
                "pair_changes_among_kept": int((both & ((w != win) | (lo != lose))).sum()),
                "score_abs_error_mean": float(err.mean()),
                "score_abs_error_max": float(err.max()),
            }
    result["seconds"] = {"sampling_and_decode": sampled_s, "total": time.time() - started}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("spm-inputs", help="the SPM's inputs: the reference's preprocessing against the previous one")
    traj = sub.add_parser("trajectory-bf16", help="bf16 trajectory storage against the log-prob's residual")
    traj.add_argument("--prompts", type=int, default=8)
    dtype = sub.add_parser("scorer-dtype", help="SPM fp32 vs bf16/fp16: keep decisions that flip on the same pools")
    dtype.add_argument("--size", choices=["tiny", "bench"], default="tiny", help="tiny/bench SD1.5 of spo_ray.tiny")
    dtype.add_argument("--prompts", type=int, default=64, help="demo prompts (at most 64)")
    dtype.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    dtype.add_argument("--threshold", type=float, default=0.3, help="the pair threshold (SD1.5: 0.3)")
    dtype.add_argument("--seed", type=int, default=42)
    dtype.add_argument("overrides", nargs="*", help="dotted config overrides for the sampling (tiny-sd15 preset)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.what == "spm-inputs":
        result = spm_input_difference()
    elif args.what == "trajectory-bf16":
        result = trajectory_bf16_residual(args.prompts)
    else:
        result = scorer_dtype_flips(args.size, args.prompts, dtypes=tuple(args.dtypes), threshold=args.threshold,
                                    seed=args.seed, overrides=args.overrides)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
