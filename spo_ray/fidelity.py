"""Fidelity measurements: how much a precision setting moves SPO's decisions away from the reference's.

``scorer_dtype_flips`` samples candidate pools once, decodes them once (raw, as the scorer sees them),
scores the same images with the step-aware preference model in fp32 (the reference's precision) and in a
lower one, and counts the scoring events whose keep decision flips or whose kept pair changes. The SPM is
the tiny random CLIP (``logit_scale`` = ln 100, as PickScore) with seeded non-zero adaLN modulation, so the
timestep matters as in a trained SPM. Results are for random weights: they size the effect of the dtype, not
the released SPM's flip rate (that needs its weights). docs/fidelity.md records the figures.

    python -m spo_ray.fidelity --size tiny --prompts 64
    python -m spo_ray.fidelity --size bench --prompts 16
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
    parser = argparse.ArgumentParser(description="SPM fp32 vs bf16/fp16: keep decisions that flip on the same pools")
    parser.add_argument("--size", choices=["tiny", "bench"], default="tiny", help="tiny/bench SD1.5 of spo_ray.tiny")
    parser.add_argument("--prompts", type=int, default=64, help="demo prompts (at most 64)")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    parser.add_argument("--threshold", type=float, default=0.3, help="the pair threshold (SD1.5: 0.3)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for the sampling (tiny-sd15 preset)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = scorer_dtype_flips(args.size, args.prompts, dtypes=tuple(args.dtypes), threshold=args.threshold,
                                seed=args.seed, overrides=args.overrides)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
