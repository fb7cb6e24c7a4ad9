"""SPO learns: after a few rounds the policy's held-out images score higher under the preference
model that labelled the pairs (the brightness scorer, on the SPM's scale).

Recipe: evaluate the base model (the reference, i.e. LoRA disabled / the frozen copy) with plain
DDIM on 16 held-out seeds, train rounds of CandidatePoolSampler -> PoolScorer -> LocalTrainer,
then evaluate the policy on the same seeds and prompts (same noise: paired differences).
Measured on this CPU: SD1.5-shaped full fine-tuning in 5 rounds +237 (std of the paired
difference 19; 12 rounds gave +258, std 39), SDXL-shaped LoRA in 8 rounds +35 (std 17); every
seed improved in both. A control run with the preference
reversed (darker wins) ends 46 points below the normal run on average (std 17): the gain comes
from the preference labels, not from any drift that training causes on a random tiny model.
"""

from __future__ import annotations

import math

import pytest
import torch

from spo_ray.components import build_pool_scorer, load_model
from spo_ray.config import load_config
from spo_ray.sampling import CandidatePoolSampler, generate_latents
from spo_ray.scorers import BrightnessScorer
from spo_ray.scoring import PoolScorer
from spo_ray.training import LocalTrainer, reference_unet

CPU = torch.device("cpu")
PROMPTS = ["a cat", "a dog", "a tree", "a house"]
EVAL_SEEDS = list(range(1000, 1016))


def _train_and_evaluate(
    kind: str, rounds: int, overrides: list[str], *, with_base: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-seed scores (base, tuned) on the held-out seeds, always under the brightness scorer."""
    cfg = load_config(f"tiny-{kind}", overrides=overrides)
    assert cfg.scorer.type == "brightness"
    model = load_model(cfg, CPU)
    trainer = LocalTrainer(model, cfg.train, cfg.sampling, device=CPU)
    sampler = CandidatePoolSampler(model, cfg.sampling, cfg.train.seed)
    pool_scorer = build_pool_scorer(cfg, model, CPU)  # labels the training pairs
    judge = PoolScorer(model.decode, BrightnessScorer(scale=5000.0), threshold=0.0)  # evaluates
    eval_prompts = PROMPTS * 4

    def evaluate(unet: torch.nn.Module) -> torch.Tensor:
        latents = generate_latents(model, eval_prompts, EVAL_SEEDS, cfg=cfg.sampling, unet=unet)
        return judge.score_images(latents, eval_prompts, torch.zeros(len(EVAL_SEEDS)))

    base = None
    if with_base:
        with reference_unet(model.unet, trainer.frozen_copy) as ref:
            base = evaluate(ref)

    kept = 0
    for r in range(rounds):
        records = sampler.sample(PROMPTS, [0, 1, 2, 3], epoch=0, round_index=r, policy_version=r)
        pairs, stats = pool_scorer(records)
        kept += stats.kept
        steps = trainer.train_round(pairs, epoch=0, round_index=r)
        assert all(math.isfinite(s.loss) and not s.skipped for s in steps)
    assert kept > 0

    return base, evaluate(model.unet)


def _assert_learned(diff: torch.Tensor, label: str) -> None:
    mean, std = float(diff.mean()), float(diff.std())
    stderr = std / math.sqrt(diff.numel())
    improved = int((diff > 0).sum())
    msg = f"{label}: mean gain {mean:.2f}, std {std:.2f}, {improved}/{diff.numel()} seeds improved"
    print(msg)
    assert mean > 3 * stderr, msg
    assert improved >= 12, msg


@pytest.fixture(scope="module")
def sdxl_run() -> tuple[torch.Tensor, torch.Tensor]:
    return _train_and_evaluate("sdxl", 8, [])


@pytest.mark.slow
def test_sd15_full_finetuning_learns() -> None:
    base, tuned = _train_and_evaluate("sd15", 5, ["train.lora=false", "train.learning_rate=1e-3"])
    _assert_learned(tuned - base, "tiny-sd15 full fine-tuning, 5 rounds")


@pytest.mark.slow
def test_sdxl_lora_learns(sdxl_run) -> None:
    base, tuned = sdxl_run
    _assert_learned(tuned - base, "tiny-sdxl LoRA (k=2, 3 inner steps), 8 rounds")


@pytest.mark.slow
def test_sdxl_lora_follows_the_preference_direction(sdxl_run) -> None:
    """Control: the same run with the preference reversed (darker wins) ends clearly darker than
    the normal run, so the gain above is caused by the pair labels."""
    base, tuned = sdxl_run
    _, tuned_rev = _train_and_evaluate("sdxl", 8, ["scorer.kwargs={scale: -5000.0}"], with_base=False)
    _assert_learned(tuned - tuned_rev, "tiny-sdxl LoRA, normal minus reversed preference, 8 rounds")
    assert float((tuned_rev - base).mean()) < float((tuned - base).mean()) / 2
