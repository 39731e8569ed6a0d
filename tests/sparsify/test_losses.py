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


def _plain_kl(orig, sae):
    """The textbook formula through autograd: what logits_kl_loss's closed form must equal."""
    orig_lp, sae_lp = orig.double().log_softmax(-1), sae.double().log_softmax(-1)
    return (orig_lp.exp() * (orig_lp - sae_lp)).sum(-1).mean()


@pytest.mark.parametrize("chunk_elements", [2**26, 40, 7])  # one block; whole sequences; parts of one
def test_logits_kl_value_and_gradients_equal_autograd_of_the_formula(monkeypatch, chunk_elements):
    monkeypatch.setattr("sparsify.losses.KL_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    full_orig, full_sae = torch.randn(3, 5, 11) * 3, torch.randn(3, 5, 11) * 3
    # the trainer passes non-contiguous views (positions after the first)
    orig = full_orig.clone().requires_grad_(True)
    sae = full_sae.clone().requires_grad_(True)
    value = logits_kl_loss(orig[:, 1:], sae[:, 1:])
    (2.5 * value).backward()
    ref_orig = full_orig.double().requires_grad_(True)
    ref_sae = full_sae.double().requires_grad_(True)
    ref = _plain_kl(ref_orig[:, 1:], ref_sae[:, 1:])
    (2.5 * ref).backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(sae.grad, ref_sae.grad.float(), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(orig.grad, ref_orig.grad.float(), atol=1e-6, rtol=1e-4)
    assert sae.grad[:, 0].abs().max() == 0  # the left-out position gets no gradient


def test_logits_kl_gradcheck_in_float64():
    torch.manual_seed(1)
    orig = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    sae = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    # float32 internally, so a loose check: the closed form against finite differences
    assert torch.autograd.gradcheck(logits_kl_loss, (orig, sae), eps=1e-3, atol=1e-3, rtol=1e-2)


def test_logits_kl_of_bf16_logits_computes_in_float32_and_returns_bf16_gradients():
    torch.manual_seed(2)
    orig = (torch.randn(2, 4, 9) * 2).bfloat16()
    sae = (torch.randn(2, 4, 9) * 2).bfloat16().requires_grad_(True)
    value = logits_kl_loss(orig, sae)
    value.backward()
    assert value.dtype == torch.float32 and sae.grad is not None and sae.grad.dtype == torch.bfloat16
    assert value.item() == pytest.approx(_plain_kl(orig.float(), sae.float()).item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sae_masks_too", [True, False])
def test_logits_kl_leaves_out_tokens_the_original_model_masks(dtype, sae_masks_too):
    """A -inf original logit (p_orig = 0) adds 0 to KL(P_orig || P_sae) and to its gradient,
    instead of 0 * (-inf - -inf) = NaN; the rest equals the KL over the unmasked tokens."""
    torch.manual_seed(3)
    orig, sae = torch.randn(2, 3, 7) * 2, torch.randn(2, 3, 7) * 2
    masked = torch.zeros(7, dtype=torch.bool)
    masked[[1, 4]] = True
    orig[..., masked] = -math.inf
    if sae_masks_too:
        sae[..., masked] = -math.inf
    sae_in = sae.to(dtype).requires_grad_(True)
    value = logits_kl_loss(orig.to(dtype), sae_in)
    value.backward()
    # by hand: p_orig lives on the 5 unmasked tokens; p_sae is normalized over all 7 (or 5)
    p_orig = orig.to(dtype).double()[..., ~masked].softmax(-1)
    log_p_sae = sae.to(dtype).double().log_softmax(-1)[..., ~masked]
    expected = (p_orig * (p_orig.log() - log_p_sae)).sum(-1).mean()
    assert math.isfinite(value.item()) and value.item() == pytest.approx(expected.item(), rel=1e-4)
    assert sae_in.grad is not None and torch.isfinite(sae_in.grad.float()).all()
    p_sae_masked = sae.to(dtype).double().softmax(-1)[..., masked]  # d KL / d sae_logit = p_sae - 0
    torch.testing.assert_close(sae_in.grad.double()[..., masked], p_sae_masked / 6, atol=1e-3, rtol=1e-2)


def test_logits_kl_refuses_logits_of_different_shapes():
    with pytest.raises(ValueError, match=r"logits shapes differ: \(1, 5, 7\) and \(3, 5, 7\)"):
        logits_kl_loss(torch.randn(1, 5, 7), torch.randn(3, 5, 7))


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
