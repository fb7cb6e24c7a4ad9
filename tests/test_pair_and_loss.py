"""The pair rule and the SPO loss against hand-computed values."""

import math

import pytest
import torch

from spo_ray.loss import spo_loss
from spo_ray.preference import select_pair


def test_select_pair_hand_computed():
    scores = torch.tensor([[20.0, 10.0, 5.0], [21.0, 10.2, 5.0], [19.0, 10.1, 5.0], [22.5, 9.9, 5.0]])  # [k=4, B=3]
    win, lose, keep = select_pair(scores, threshold=0.3)
    assert win.tolist() == [3, 1, 0]
    assert lose.tolist() == [2, 3, 3]  # constant column: the last index loses, win != lose
    # gap = tanh((s_w - s_l) / 2): 3.5 -> 0.94 kept; 0.3 -> 0.149 dropped; 0 -> dropped
    assert keep.tolist() == [True, False, False]


@pytest.mark.parametrize("gap", [0.1, 0.5, 1.0, 2.0])
def test_select_pair_threshold_is_softmax_gap(gap):
    scores = torch.tensor([[0.0], [gap]])
    probs = torch.softmax(torch.tensor([gap, 0.0]), 0)
    expected_gap = (probs[0] - probs[1]).item()
    for threshold in (0.3, 0.4):
        _, _, keep = select_pair(scores, threshold)
        assert bool(keep[0]) == (expected_gap > threshold)


def test_select_pair_rejects_bad_shapes():
    with pytest.raises(ValueError, match="k >= 2"):
        select_pair(torch.zeros(1, 3), 0.3)
    with pytest.raises(ValueError, match="shape"):
        select_pair(torch.zeros(4), 0.3)


def test_spo_loss_hand_computed():
    lw, rw = torch.tensor([0.05, 0.5]), torch.tensor([0.0, 0.0])
    ll, rl = torch.tensor([-0.02, 0.0]), torch.tensor([0.0, 0.3])
    loss, stats = spo_loss(lw, rw, ll, rl, beta=10.0, eps=0.1)
    # pair 0: r_w = e^0.05 (inside), r_l = e^-0.02 (inside): margin = 10 * (0.05 + 0.02) = 0.7
    # pair 1: r_w = e^0.5 -> 1.1, r_l = e^-0.3 -> 0.9: margin = 10 * (ln 1.1 - ln 0.9)
    m0 = 0.7
    m1 = 10 * (math.log(1.1) - math.log(0.9))
    expected = (-math.log(1 / (1 + math.exp(-m0))) - math.log(1 / (1 + math.exp(-m1)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["ratio_win"].item() == pytest.approx((math.exp(0.05) + math.exp(0.5)) / 2, rel=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    assert stats["accuracy"].item() == 1.0


def test_spo_loss_gradient_direction_and_clip():
    # Inside the clip range: descent raises the winner's log-prob and lowers the loser's.
    lw = torch.tensor([0.01], requires_grad=True)
    ll = torch.tensor([0.02], requires_grad=True)
    loss, _ = spo_loss(lw, torch.zeros(1), ll, torch.zeros(1), beta=10.0, eps=0.1)
    loss.backward()
    assert lw.grad.item() < 0 and ll.grad.item() > 0
    # Outside it (ratio clipped): zero gradient.
    lw = torch.tensor([0.5], requires_grad=True)
    ll = torch.tensor([-0.5], requires_grad=True)
    loss, _ = spo_loss(lw, torch.zeros(1), ll, torch.zeros(1), beta=10.0, eps=0.1)
    loss.backward()
    assert lw.grad.item() == 0.0 and ll.grad.item() == 0.0
    # Analytic gradient inside: dL/dlw = -beta * sigmoid(-margin) / N
    lw = torch.tensor([0.01, 0.03], requires_grad=True)
    loss, _ = spo_loss(lw, torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=10.0, eps=0.1)
    loss.backward()
    expected = -10.0 * torch.sigmoid(-10.0 * torch.tensor([0.01, 0.03])) / 2
    torch.testing.assert_close(lw.grad, expected)
