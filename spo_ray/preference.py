"""The pair rule: which candidates form a win/lose pair, and whether it is kept (DESIGN.md section 1)."""

from __future__ import annotations

import torch


def select_pair(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top- and bottom-scored candidate per prompt, kept when the softmax gap exceeds ``threshold``.

    ``scores`` has shape [k, B]. Returns (win_idx [B], lose_idx [B], keep [B] bool), where keep is
    softmax([s_w, s_l])[0] - softmax([s_w, s_l])[1] > threshold. Ties go to the lowest index
    for the winner and the highest for the loser, so win != lose whenever k >= 2.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [k, B], got {tuple(scores.shape)}")
    k = scores.shape[0]
    if k < 2:
        raise ValueError(f"a pool needs k >= 2 candidates to form a pair, got {k}")
    scores = scores.float()
    win_idx = scores.argmax(dim=0)
    # argmin over the reversed pool picks the last minimum, so a constant pool gives win != lose.
    lose_idx = (k - 1) - scores.flip(0).argmin(dim=0)
    columns = torch.arange(scores.shape[1], device=scores.device)
    s_win = scores[win_idx, columns]
    s_lose = scores[lose_idx, columns]
    probs = torch.softmax(torch.stack([s_win, s_lose]), dim=0)
    keep = (probs[0] - probs[1]) > threshold
    return win_idx, lose_idx, keep
