"""User scorers for the bad-input tests (``scorer.type=tests.user_scorers:<Class>``)."""

from __future__ import annotations

import torch


class MeanScorer:
    """A well-behaved user scorer: mean brightness on the SPM's scale."""

    def __init__(self, scale: float = 100.0) -> None:
        self.scale = scale

    def score(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(1, 2, 3)) * self.scale


class ListScorer(MeanScorer):
    def score(self, images, prompts, timesteps):  # a Python list, not a tensor
        return super().score(images, prompts, timesteps).tolist()


class NaNScorer(MeanScorer):
    def score(self, images, prompts, timesteps):
        scores = super().score(images, prompts, timesteps)
        scores[0] = float("nan")
        return scores
