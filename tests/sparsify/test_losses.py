import math

import pytest
import torch

from sparsify.config import LossConfig
from sparsify.losses import logits_kl_loss, mse_loss, sparsity_loss, weighted_total


def test_sparsity_loss_divides_by_d_in():
    # tokens: ||(1,-2,0)||_1 = 3, ||(0,0,4)||_1 = 4 -> mean 3.5, / d_in 7 -> 0.5
    codes = torch.tensor([[[1.0, -2.0, 0.0], [0.0, 0.0, 4.0]]])
    assert sparsity_loss(codes, p_norm=1.0, d_in=7).item() == pytest.approx(0.5)


def test_sparsity_loss_p2_norm():
    # ||(3,4)||_2 = 5, ||(0,0)|| = 0 -> mean 2.5, / d_in 5 -> 0.5
    codes = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert sparsity_loss(codes, p_norm=2.0, d_in=5).item() == pytest.approx(0.5)


def test_mse_is_mean_over_every_element():
    pred = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 6.0]]])
    # squared errors: 0,4,9,0,0,36 -> 49 / 6
    assert mse_loss(pred, target).item() == pytest.approx(49 / 6)


def test_logits_kl_matches_hand_computed_value():
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.5, 0.25])
    expected_tok1 = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # = 0.25 ln 2
    orig = torch.stack([p.log(), q.log()])[None]  # second token: identical dists -> KL 0
    sae = torch.stack([q.log(), q.log()])[None]
    assert logits_kl_loss(orig, sae).item() == pytest.approx(expected_tok1 / 2, rel=1e-5)


def test_logits_kl_is_zero_for_equal_logits_and_shift_invariant():
    logits = torch.randn(2, 3, 11)
    assert logits_kl_loss(logits, logits + 5.0).item() == pytest.approx(0.0, abs=1e-6)


def test_weighted_total_uses_each_coefficient():
    cfg = LossConfig.model_validate(
        {
            "sparsity": {"coeff": 2.0},
            "out_to_in": {"coeff": 0.0},
            "logits_kl": {"coeff": 0.5},
            "in_to_orig": {"total_coeff": 3.0, "hook_positions": ["blocks.1.hook_resid_pre"]},
        }
    )
    terms = {
        "sparsity": torch.tensor(1.0),
        "out_to_in": torch.tensor(100.0),
        "logits_kl": torch.tensor(4.0),
        "in_to_orig": torch.tensor(0.5),
    }
    # 2*1 + 0*100 + 0.5*4 + 3*0.5
    assert weighted_total(terms, cfg).item() == pytest.approx(5.5)


@pytest.mark.parametrize("loss", [{"out_to_in": {"coeff": 0.0}}, {"sparsity": {"coeff": 1.0}}, {}])
def test_loss_config_needs_a_positive_reconstruction_term(loss):
    with pytest.raises(ValueError, match="no reconstruction term has a positive coefficient"):
        LossConfig.model_validate(loss)
