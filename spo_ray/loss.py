"""The SPO loss (DESIGN.md section 1).

r = exp(log p_theta - log p_ref); L = -log sigmoid(beta log clip(r_w) - beta log clip(r_l)),
clip to [1 - eps, 1 + eps]. The clamp makes the gradient zero outside the clip range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def spo_loss(
    logp_win: torch.Tensor,
    logp_ref_win: torch.Tensor,
    logp_lose: torch.Tensor,
    logp_ref_lose: torch.Tensor,
    *,
    beta: float,
    eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean SPO loss over the pairs in the batch, and detached per-batch statistics.

    Each argument has shape [N] (one entry per transition pair). Returns (loss, stats) where
    stats holds ``ratio_win``, ``ratio_lose`` (means, unclipped), ``clip_frac`` and ``accuracy``
    (fraction of pairs whose clipped log-ratio margin is positive).
    """
    ratio_win = torch.exp(logp_win - logp_ref_win)
    ratio_lose = torch.exp(logp_lose - logp_ref_lose)
    clipped_win = torch.clamp(ratio_win, 1 - eps, 1 + eps)
    clipped_lose = torch.clamp(ratio_lose, 1 - eps, 1 + eps)
    margin = beta * torch.log(clipped_win) - beta * torch.log(clipped_lose)
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        outside = ((ratio_win - 1).abs() > eps).float() + ((ratio_lose - 1).abs() > eps).float()
        stats = {
            "ratio_win": ratio_win.detach().mean(),
            "ratio_lose": ratio_lose.detach().mean(),
            "clip_frac": outside.mean() / 2,
            "accuracy": (margin.detach() > 0).float().mean(),
        }
    return loss, stats
