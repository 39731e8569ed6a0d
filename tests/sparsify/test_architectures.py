"""Every SAE architecture against hand-computed values, its straight-through gradients, and its
config rules (sparsify/architectures/)."""

import math

import pytest
import torch
from torch.testing import assert_close

from sparsify.architectures import ARCHITECTURES, BatchTopKSAE, JumpReLUSAE, ReluSAE, TopKSAE, sae_factory
from sparsify.config import SPARSITY_TERMS, SAEsConfig, validate_config
from sparsify.errors import ConfigError

# one token x = (2, 1) through W_e = [[1, 0], [0, 1], [1, 1], [-1, 0]], b_e = (0, 0, -0.5, 0):
# pre = (2, 1, 2.5, -2)
X = torch.tensor([[2.0, 1.0]])
W_E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
B_E = torch.tensor([0.0, 0.0, -0.5, 0.0])
# decoder columns (1, 0), (0, 1), (0, 2) and (3, 4): unit-normalized to (1, 0), (0, 1), (0, 1), (0.6, 0.8)
W_D = torch.tensor([[1.0, 0.0, 0.0, 3.0], [0.0, 1.0, 2.0, 4.0]])
B_D = torch.tensor([0.1, -0.1])


def _set_weights(sae):
    with torch.no_grad():
        sae.encoder[0].weight.copy_(W_E)
        sae.encoder[0].bias.copy_(B_E)
        sae.decoder.weight.copy_(W_D)
        sae.decoder.bias.copy_(B_D)
    return sae


def _codes_and_out(sae, x=X):
    with torch.no_grad():
        return sae(x)


def test_relu_codes_and_output_by_hand():
    codes, out = _codes_and_out(_set_weights(ReluSAE(2, 4)))
    assert_close(codes, torch.tensor([[2.0, 1.0, 2.5, 0.0]]))
    # 2 (1, 0) + 1 (0, 1) + 2.5 (0, 1) + b_d
    assert_close(out, torch.tensor([[2.1, 3.4]]))


def test_topk_keeps_the_k_largest_by_hand():
    codes, out = _codes_and_out(_set_weights(TopKSAE(2, 4, k=2)))
    assert_close(codes, torch.tensor([[2.0, 0.0, 2.5, 0.0]]))
    assert_close(out, torch.tensor([[2.1, 2.4]]))


def test_topk_l0_is_exactly_k():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, k=5)
    with torch.no_grad():
        sae.encoder[0].bias.fill_(10.0)  # every pre-activation positive: ReLU removes none of the k
        codes, _ = sae(torch.randn(4, 7, 16))
    assert ((codes > 0).sum(-1) == 5).all()


def test_topk_never_keeps_a_negative_preactivation():
    sae = _set_weights(TopKSAE(2, 4, k=4))
    codes, _ = _codes_and_out(sae)
    assert_close(codes, torch.tensor([[2.0, 1.0, 2.5, 0.0]]))  # pre -2 is among the top 4: ReLU zeroes it


def test_jumprelu_codes_by_hand():
    sae = _set_weights(JumpReLUSAE(2, 4, threshold_init=1.0, bandwidth=0.1))
    with torch.no_grad():
        sae.log_threshold.copy_(torch.tensor([2.5, 0.5, 2.0, 0.1]).log())
    codes, out = _codes_and_out(sae)
    # pre (2, 1, 2.5, -2) above (2.5, 0.5, 2.0, 0.1): latents 1 and 2, at their pre-activations
    assert_close(codes, torch.tensor([[0.0, 1.0, 2.5, 0.0]]))
    assert_close(out, torch.tensor([[0.1, 3.4]]))


def test_jumprelu_threshold_gets_the_straight_through_gradient():
    sae = JumpReLUSAE(1, 3, threshold_init=1.0, bandwidth=0.1)
    # theta = 1, eps = 0.1: pre 1.02 is inside the kernel's window (|u| = 0.2 < 1/2), 1.2 and 0.5 are not
    pre = torch.tensor([[1.02, 1.2, 0.5]], requires_grad=True)
    sae.activate(pre).sum().backward()
    # d c / d theta = -(theta / eps) K(u) = -10 where inside, times d theta / d log theta = theta = 1
    assert_close(sae.log_threshold.grad, torch.tensor([-10.0, 0.0, 0.0]))
    assert pre.grad is not None
    assert_close(pre.grad, torch.tensor([[1.0, 1.0, 0.0]]))  # a ReLU's gradient where the latent is on
    sae.log_threshold.grad = None
    penalty = sae.l0_penalty(pre.detach())
    assert penalty.item() == 2.0  # pre 1.02 and 1.2 are above the threshold
    penalty.backward()
    # d H / d theta = -(1 / eps) K(u) = -10, times theta = 1
    assert_close(sae.log_threshold.grad, torch.tensor([-10.0, 0.0, 0.0]))


def test_jumprelu_threshold_gradient_scales_with_theta():
    sae = JumpReLUSAE(1, 1, threshold_init=2.0, bandwidth=0.1)
    pre = torch.tensor([[2.03], [2.01], [5.0]])
    sae.l0_penalty(pre).backward()
    # two of the three tokens inside the window: mean over tokens of -(1/eps) * 2 tokens, times theta = 2
    assert_close(sae.log_threshold.grad, torch.tensor([-(2 / 3) * 10.0 * 2.0]))


def test_batchtopk_batch_rule_in_training_and_threshold_at_eval():
    sae = _set_weights(BatchTopKSAE(2, 4, k=1))
    x = torch.tensor([[2.0, 1.0], [0.0, 0.5]])  # pre (2, 1, 2.5, -2) and (0, 0.5, 0, 0)
    with torch.no_grad():
        codes, _ = sae(x)
    # k x B = 2 kept over the batch: both from token 0, none from token 1
    assert_close(codes, torch.tensor([[2.0, 0.0, 2.5, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert sae.threshold.item() == 2.0  # the first estimate: the smallest kept activation
    sae.eval()
    with torch.no_grad():
        codes, _ = sae(x)
    assert_close(codes, torch.tensor([[0.0, 0.0, 2.5, 0.0], [0.0, 0.0, 0.0, 0.0]]))  # strictly above 2


def test_batchtopk_threshold_is_a_running_mean_then_an_ema():
    sae = BatchTopKSAE(1, 1, k=1)
    with torch.no_grad():
        sae.encoder[0].weight.fill_(1.0)
        sae.encoder[0].bias.zero_()
        for value in (1.0, 3.0, 5.0):
            sae(torch.tensor([[value]]))
    assert sae.threshold.item() == pytest.approx(3.0)  # mean of 1, 3, 5
    assert sorted(sae.state_dict()) == [
        "decoder.bias",
        "decoder.weight",
        "encoder.0.bias",
        "encoder.0.weight",
        "threshold",
        "threshold_updates",
    ]


def test_every_architecture_accepts_what_the_config_says():
    for name, cls in ARCHITECTURES.items():
        assert cls.sparsity_terms == SPARSITY_TERMS[name]
        assert cls.architecture == name


def test_factory_builds_the_configured_architecture():
    topk = sae_factory(SAEsConfig(sae_positions=["h"], architecture="topk", k=3))(4, 8)
    assert isinstance(topk, TopKSAE) and topk.k == 3
    jump = sae_factory(
        SAEsConfig(
            sae_positions=["h"], architecture="jumprelu", jumprelu_threshold_init=0.5, jumprelu_bandwidth=0.2
        )
    )(4, 8)
    assert isinstance(jump, JumpReLUSAE) and jump.bandwidth == 0.2
    assert_close(jump.threshold, torch.full((8,), 0.5))
    assert type(sae_factory(None)(4, 8)) is ReluSAE
    with pytest.raises(ConfigError, match=r"saes.k: 9 must be between 1 and the dictionary size \(8\)"):
        sae_factory(SAEsConfig(sae_positions=["h"], architecture="batchtopk", k=9))(4, 8)


def _cfg(saes: dict, loss: dict) -> dict:
    return {
        "saes": {"sae_positions": ["blocks.0.hook_resid_pre"], **saes},
        "loss": loss,
        "n_samples": 8,
        "lr": 1e-3,
    }


@pytest.mark.parametrize(
    ("saes", "loss", "message"),
    [
        (
            {"architecture": "topk", "k": 4},
            {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}},
            "loss.sparsity: a topk SAE does not take this sparsity term; allowed for topk: none (k sets its L0)",
        ),
        (
            {"architecture": "jumprelu"},
            {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}},
            "loss.sparsity: a jumprelu SAE does not take this sparsity term; allowed for jumprelu: loss.l0_penalty",
        ),
        (
            {},
            {"l0_penalty": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}},
            "loss.l0_penalty: a relu SAE does not take this sparsity term; allowed for relu: loss.sparsity",
        ),
        ({"architecture": "topk"}, {"out_to_in": {"coeff": 1.0}}, "architecture topk needs k"),
        ({"k": 4}, {"out_to_in": {"coeff": 1.0}}, "k is for topk and batchtopk; a relu SAE does not use it"),
        (
            {"architecture": "topk", "k": 4, "jumprelu_bandwidth": 0.1},
            {"out_to_in": {"coeff": 1.0}},
            "jumprelu_bandwidth is for jumprelu; a topk SAE does not use it",
        ),
        (
            {"architecture": "jumprelu"},
            {"l0_penalty": {"coeff": 1.0}},
            "no reconstruction term has a positive coefficient",
        ),
    ],
)
def test_config_rejects_what_an_architecture_cannot_use_in_one_line(saes, loss, message):
    with pytest.raises(ConfigError) as info:
        validate_config(_cfg(saes, loss), source="arch.yaml")
    text = str(info.value)
    assert text.startswith("arch.yaml: ") and message in text and "\n" not in text


def test_jumprelu_log_threshold_init():
    sae = JumpReLUSAE(2, 3, threshold_init=0.25, bandwidth=0.01)
    assert_close(sae.log_threshold.detach(), torch.full((3,), math.log(0.25)))
