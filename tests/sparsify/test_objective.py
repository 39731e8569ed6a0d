import math

import pytest
import torch
import torch.nn.functional as F

from sparsify.config import LossConfig
from sparsify.errors import HookNameError
from sparsify.sae_transformer import SAETransformer
from sparsify.training.objective import loss_terms, make_loss_plan

POS = "blocks.1.hook_resid_pre"
ALL_TERMS = {
    "sparsity": {"coeff": 1.0, "p_norm": 1.0},
    "out_to_in": {"coeff": 1.0},
    "out_to_orig": {"coeff": 1.0},
    "in_to_orig": {
        "total_coeff": 1.0,
        "hook_positions": ["blocks.2.hook_resid_pre", "blocks.2.hook_resid_post"],
    },
    "logits_kl": {"coeff": 1.0},
}


@pytest.fixture()
def model(tiny_bridge):
    torch.manual_seed(0)
    return SAETransformer(tiny_bridge, [POS], 2.0)


def test_every_term_matches_its_definition_on_one_batch(model, tiny_tokens):
    plan = make_loss_plan(model, LossConfig.model_validate(ALL_TERMS))
    terms, out = loss_terms(model, tiny_tokens, plan)
    acts = out.sae_acts[POS]
    raw = model.forward_raw(tiny_tokens, capture=[POS, *plan.in_to_orig_hooks])
    with torch.no_grad():
        assert terms["sparsity"].item() == pytest.approx(
            acts.codes.abs().sum(-1).mean().item() / 64, rel=1e-5
        )
        assert terms["out_to_in"].item() == pytest.approx(
            ((acts.sae_out - acts.sae_in) ** 2).mean().item(), rel=1e-5
        )
        # one SAE: its input is the original activation, so out_to_orig equals out_to_in
        assert terms["out_to_orig"].item() == pytest.approx(terms["out_to_in"].item(), rel=1e-5)
        mse = [((out.acts[h] - raw.acts[h]) ** 2).mean().item() for h in plan.in_to_orig_hooks]
        assert terms["in_to_orig"].item() == pytest.approx(sum(mse) / 2, rel=1e-5)
        p_orig = F.log_softmax(raw.logits, -1)
        kl = (p_orig.exp() * (p_orig - F.log_softmax(out.logits, -1))).sum(-1).mean()
        assert terms["logits_kl"].item() == pytest.approx(kl.item(), rel=1e-4)


def test_unconfigured_terms_are_not_computed(model, tiny_tokens):
    plan = make_loss_plan(
        model, LossConfig.model_validate({"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}})
    )
    terms, out = loss_terms(model, tiny_tokens, plan)
    assert set(terms) == {"sparsity", "out_to_in"} and out.logits is None


def test_out_to_orig_and_kl_leave_out_a_skipped_first_position(tiny_bridge, tiny_tokens):
    torch.manual_seed(0)
    model = SAETransformer(tiny_bridge, [POS], 2.0, skip_first_position=True)
    plan = make_loss_plan(model, LossConfig.model_validate(ALL_TERMS))
    terms, out = loss_terms(model, tiny_tokens, plan)
    raw = model.forward_raw(tiny_tokens, capture=[POS])
    with torch.no_grad():
        assert terms["out_to_orig"].item() == pytest.approx(terms["out_to_in"].item(), rel=1e-5)
        p_orig = F.log_softmax(raw.logits[:, 1:], -1)
        kl = (p_orig.exp() * (p_orig - F.log_softmax(out.logits[:, 1:], -1))).sum(-1).mean()
        assert terms["logits_kl"].item() == pytest.approx(kl.item(), rel=1e-4)


def test_in_to_orig_hook_upstream_of_the_sae_is_rejected(model):
    loss = LossConfig.model_validate(
        {
            "sparsity": {"coeff": 1.0},
            "in_to_orig": {"total_coeff": 1.0, "hook_positions": ["blocks.0.hook_resid_pre"]},
        }
    )
    with pytest.raises(HookNameError, match="'blocks.0.hook_resid_pre' is not downstream of the SAEs"):
        make_loss_plan(model, loss)


def test_assemble_terms_sums_per_sae_terms_and_averages_in_to_orig_hooks():
    """Hand-computed on 2 tokens, d_in 2, 3 latents, the same SAE inputs at two positions."""
    from sparsify.training.objective import SAETermInputs, assemble_terms

    sae = SAETermInputs(
        codes=torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]),  # L1 norms 3, 3
        sae_in=torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        sae_out=torch.tensor([[1.0, 1.0], [3.0, 3.0]]),  # squared errors 0, 1, 0, 1 vs sae_in
        orig=torch.tensor([[0.0, 2.0], [3.0, 5.0]]),  # squared errors 1, 1, 0, 4 vs sae_out
    )
    downstream = [
        (torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]])),
        (torch.tensor([[2.0]]), torch.tensor([[0.0]])),
    ]
    logits = (
        torch.tensor([[0.0, 0.0]]),
        torch.tensor([[math.log(3.0), 0.0]]),
    )  # P_orig uniform, P_sae (3/4, 1/4)
    terms = assemble_terms(
        LossConfig.model_validate(ALL_TERMS), [sae, sae], downstream, logits, torch.zeros(())
    )
    assert list(terms) == ["sparsity", "out_to_in", "out_to_orig", "in_to_orig", "logits_kl"]
    assert terms["sparsity"].item() == pytest.approx(2 * 3 / 2)  # mean L1 norm / d_in, summed over SAEs
    assert terms["out_to_in"].item() == pytest.approx(2 * 0.5)
    assert terms["out_to_orig"].item() == pytest.approx(2 * 1.5)
    assert terms["in_to_orig"].item() == pytest.approx((0.5 + 4.0) / 2)  # mean over hooks
    assert terms["logits_kl"].item() == pytest.approx(0.5 * math.log(4 / 3))


def test_assemble_terms_without_the_original_model_leaves_its_terms_out():
    from sparsify.training.objective import SAETermInputs, assemble_terms

    sae = SAETermInputs(torch.ones(2, 3), torch.zeros(2, 2), torch.ones(2, 2))
    terms = assemble_terms(LossConfig.model_validate(ALL_TERMS), [sae], None, None, torch.zeros(()))
    assert {k: v.item() for k, v in terms.items()} == {"sparsity": 1.5, "out_to_in": 1.0, "out_to_orig": 0.0}
