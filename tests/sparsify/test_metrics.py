import math

import pytest
import torch

from sparsify import metrics


def test_l0_counts_nonzero_codes_per_token():
    codes = torch.tensor([[[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]], [[3.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])
    assert metrics.l0(codes) == pytest.approx((2 + 0 + 1 + 3) / 4)
    assert metrics.frac_zero(codes) == pytest.approx(6 / 12)


def test_ce_loss_predicts_next_token():
    # vocab 2; logits at pos 0 predict token at pos 1
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [9.0, 9.0]]])
    tokens = torch.tensor([[0, 1, 0]])
    # pos0 -> token1 with p=0.5; pos1 -> token0 with p=3/4
    expected = (-math.log(0.5) - math.log(0.75)) / 2
    assert metrics.ce_loss(logits, tokens) == pytest.approx(expected, rel=1e-6)


def test_top1_agreement_and_total_variation():
    orig = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
    sae = torch.tensor([[[3.0, 0.0], [2.0, 0.0]]])
    assert metrics.top1_agreement(orig, sae) == pytest.approx(0.5)
    p = torch.softmax(orig, -1)
    q = torch.softmax(sae, -1)
    expected = (0.5 * (p - q).abs().sum(-1)).mean().item()
    assert metrics.total_variation(orig, sae) == pytest.approx(expected)
    assert metrics.total_variation(orig, orig) == pytest.approx(0.0)


def test_explained_variance_hand_computed():
    target = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean vector (2, 1)
    pred = torch.tensor([[1.0, 1.0], [3.0, 2.0]])
    # token 1: residual 1, variance (1+1) = 2 -> 0.5 ; token 2: residual 0 -> 1
    assert metrics.explained_variance(pred, target) == pytest.approx(0.75)
    assert metrics.explained_variance(target, target) == pytest.approx(1.0)


def test_explained_variance_layer_norm_ignores_scale():
    target = torch.randn(4, 5, 8)
    assert metrics.explained_variance(3 * target + 1, target, layer_norm=True) == pytest.approx(1.0, abs=1e-4)
    assert metrics.explained_variance(3 * target + 1, target) < 0.5


def test_firing_counter_alive_over_batches():
    counter = metrics.FiringCounter(4)
    counter.update(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    counter.update(torch.tensor([[[0.0, 0.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0]]]))
    assert counter.alive() == 2
    assert counter.n_tokens == 3
    assert counter.counts.tolist() == [2, 0, 1, 0]
