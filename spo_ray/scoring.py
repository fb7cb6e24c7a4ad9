"""Scoring candidate pools into win/lose pairs (the pair rule of DESIGN.md section 1).

Input: a trajectory record batch from ``sampling.py``. Each segment's k candidates are decoded
(x0_hat -> RGB) and scored by the preference model at their own timestep; the top- and
bottom-scored candidates form a pair, kept when the softmax gap exceeds the threshold.
Output: a pair batch (one row per kept pair) and the scoring counts for accounting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from spo_ray.preference import select_pair
from spo_ray.scorers import PreferenceScorer

# Kept-pair fractions are reported per bucket of the scored timestep ("t0" = finished images).
BUCKET_WIDTH = 250


def pair_id(epoch: int, prompt_id: int, seg_start: int) -> int:
    """A run-unique id for the pair of one prompt's segment in one epoch (for exactly-once checks)."""
    return (epoch * 10_000_000 + prompt_id) * 1_000 + seg_start


def prompt_of_pair(pair_ids: torch.Tensor) -> torch.Tensor:
    """The (epoch, prompt) key of each pair id (:func:`pair_id` without the segment)."""
    return pair_ids // 1_000


def timestep_bucket(t: int) -> str:
    """'t0' for finished images, else the 250-wide bucket of t, e.g. 't1-250', 't751-1000'."""
    if t <= 0:
        return "t0"
    low = (t - 1) // BUCKET_WIDTH * BUCKET_WIDTH
    return f"t{low + 1}-{low + BUCKET_WIDTH}"


@dataclass
class ScoringStats:
    """Counts for one scored batch; ``events = kept + rejected + nonfinite`` always."""

    events: int = 0
    kept: int = 0
    rejected: int = 0
    nonfinite: int = 0  # pools dropped because a candidate's score was not finite
    nonfinite_latents: int = 0  # of those, pools whose x0_hat was already non-finite (the sampler's)
    score_sum: float = 0.0  # over all scored candidates
    images: int = 0
    events_by_bucket: dict[str, int] = field(default_factory=dict)
    kept_by_bucket: dict[str, int] = field(default_factory=dict)
    # Per input row (prompt): pools kept, and (events, kept) per timestep bucket. The Ray engine
    # reports these per prompt so that redone work is counted once.
    kept_per_row: list[int] = field(default_factory=list)
    nonfinite_per_row: list[int] = field(default_factory=list)
    score_sum_per_row: list[float] = field(default_factory=list)  # over the row's k * S candidates
    buckets_per_row: list[dict[str, tuple[int, int]]] = field(default_factory=list)

    def add(self, other: ScoringStats) -> None:
        self.events += other.events
        self.kept += other.kept
        self.rejected += other.rejected
        self.nonfinite += other.nonfinite
        self.nonfinite_latents += other.nonfinite_latents
        self.score_sum += other.score_sum
        self.images += other.images
        for mine, theirs in ((self.events_by_bucket, other.events_by_bucket), (self.kept_by_bucket, other.kept_by_bucket)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value

    @property
    def mean_score(self) -> float:
        return self.score_sum / max(self.images, 1)


def nonfinite_problem(round_index: int, events: int, nonfinite: int, max_fraction: float,
                      from_latents: int | None = None) -> str | None:
    """The message that stops a run when more than ``max_fraction`` of a round's pools had a
    non-finite score (None otherwise)."""
    if nonfinite <= max_fraction * events:
        return None
    where = "" if from_latents is None else (
        f": {from_latents} of them from the sampler (non-finite x0_hat), {nonfinite - from_latents} from the scorer")
    return (f"round {round_index}: {nonfinite} of {events} scored pools had non-finite scores{where} "
            f"(scorer.max_nonfinite_fraction={max_fraction}); stopping")


def check_scores(scores: object, n: int, scorer: object) -> torch.Tensor:
    """A scorer's output as float32 on the CPU, or a clear error naming the scorer: it must be a
    tensor of shape [N] (one score per image; non-finite values are counted by the caller)."""
    name = type(scorer).__name__
    if not torch.is_tensor(scores):
        raise TypeError(f"scorer {name}.score returned a {type(scores).__name__}; expected a torch tensor of shape [{n}]")
    if tuple(scores.shape) != (n,) or not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"scorer {name}.score returned a {scores.dtype} tensor of shape {tuple(scores.shape)}; "
                         f"expected one float per image, shape [{n}]")
    return scores.detach().float().cpu()


class PoolScorer:
    """Decodes x0_hat, scores every candidate at its timestep, and applies the pair rule.

    ``decode`` is :meth:`DiffusionModel.decode` (or anything taking ``clamp=``): the scorer gets the
    raw decode, not clamped to [-1, 1], as the reference's SPM input (the scorer clamps after resizing).
    """

    def __init__(
        self,
        decode: Callable[..., torch.Tensor],
        scorer: PreferenceScorer,
        *,
        threshold: float,
        max_batch: int = 64,
    ):
        self.decode = decode
        self.scorer = scorer
        self.threshold = threshold
        self.max_batch = max_batch

    @torch.no_grad()
    def score_images(self, latents: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
        """Scores of x0_hat latents [N, C, H, W], decoded and scored in chunks of max_batch."""
        scores = []
        for lo in range(0, latents.shape[0], self.max_batch):
            images = self.decode(latents[lo : lo + self.max_batch], clamp=False)
            chunk = self.scorer.score(images, prompts[lo : lo + self.max_batch], timesteps[lo : lo + self.max_batch])
            scores.append(check_scores(chunk, images.shape[0], self.scorer))
        return torch.cat(scores) if scores else torch.zeros(0)

    def __call__(self, records: dict[str, object]) -> tuple[dict[str, object], ScoringStats]:
        x0_hat: torch.Tensor = records["x0_hat"]  # [B, S, k, C, H, W]
        batch, num_segments, k = x0_hat.shape[:3]
        score_t: torch.Tensor = records["score_t"]  # [B, S]
        prompts = [p for p in records["prompt"] for _ in range(num_segments * k)]
        timesteps = score_t.unsqueeze(-1).expand(batch, num_segments, k).reshape(-1)
        scores = self.score_images(x0_hat.reshape(-1, *x0_hat.shape[3:]), prompts, timesteps)
        scores = scores.view(batch, num_segments, k)
        # A pool with a non-finite score is dropped as such (counted apart, never a pair): its
        # candidates are wasted, but a NaN never decides which one wins.
        finite = torch.isfinite(scores).all(-1)
        latents_finite = torch.isfinite(x0_hat).flatten(2).all(-1)  # [B, S]: the sampler's x0_hat
        win, lose, keep = select_pair(scores.nan_to_num(0.0, 0.0, 0.0).reshape(-1, k).T, self.threshold)
        win, lose, keep = win.view(batch, num_segments), lose.view(batch, num_segments), keep.view(batch, num_segments)
        keep = keep & finite
        good = scores[finite]
        stats = ScoringStats(
            events=batch * num_segments,
            kept=int(keep.sum()),
            rejected=int((~keep & finite).sum()),
            nonfinite=int((~finite).sum()),
            nonfinite_latents=int((~finite & ~latents_finite).sum()),
            score_sum=float(good.sum()),
            images=good.numel(),
        )
        for b in range(batch):
            row: dict[str, tuple[int, int]] = {}
            for s in range(num_segments):
                bucket = timestep_bucket(int(score_t[b, s]))
                events, kept = row.get(bucket, (0, 0))
                row[bucket] = (events + 1, kept + int(keep[b, s]))
                stats.events_by_bucket[bucket] = stats.events_by_bucket.get(bucket, 0) + 1
                stats.kept_by_bucket[bucket] = stats.kept_by_bucket.get(bucket, 0) + int(keep[b, s])
            stats.kept_per_row.append(int(keep[b].sum()))
            stats.nonfinite_per_row.append(int((~finite[b]).sum()))
            stats.score_sum_per_row.append(float(scores[b][finite[b]].sum()))
            stats.buckets_per_row.append(row)

        rows_b, rows_s = keep.nonzero(as_tuple=True)
        chains: torch.Tensor = records["chains"]  # [B, S, k, M, C, H, W]
        w, lo = win[rows_b, rows_s], lose[rows_b, rows_s]
        pairs: dict[str, object] = {
            "pair_id": torch.tensor(
                [
                    pair_id(int(records["epoch"][b]), int(records["prompt_id"][b]), int(records["seg_start"][b, s]))
                    for b, s in zip(rows_b.tolist(), rows_s.tolist(), strict=True)
                ],
                dtype=torch.long,
            ),
            "prompt_id": records["prompt_id"][rows_b],
            "prompt": [records["prompt"][b] for b in rows_b.tolist()],
            "epoch": records["epoch"][rows_b],
            "round": records["round"][rows_b],
            "policy_version": records["policy_version"][rows_b],
            "seg_start": records["seg_start"][rows_b, rows_s],
            "seg_len": records["seg_len"][rows_b, rows_s],
            "timesteps": records["seg_timesteps"][rows_b, rows_s],
            "x_t": records["x_t"][rows_b, rows_s],
            "win": chains[rows_b, rows_s, w],
            "lose": chains[rows_b, rows_s, lo],
            "score_win": scores[rows_b, rows_s, w],
            "score_lose": scores[rows_b, rows_s, lo],
            "score_t": score_t[rows_b, rows_s],
            "win_idx": w.to(torch.long),  # candidate indices in the pool (to find the scored x0_hat)
            "lose_idx": lo.to(torch.long),
        }
        for key, value in records.items():
            if key.startswith("cond_"):
                pairs[key] = value[rows_b]
        return pairs, stats
