import pytest
import torch
from torch.testing import assert_close

from sparsify.errors import HookNameError
from sparsify.sae_transformer import SAETransformer

POS = "blocks.1.hook_resid_pre"


@pytest.fixture()
def model(tiny_bridge):
    torch.manual_seed(0)
    return SAETransformer(tiny_bridge, [POS], dict_size_to_input_ratio=2.0)


def test_sae_sizes_come_from_the_hook_width(model):
    sae = model.sae(POS)
    assert (sae.d_in, sae.n_dict) == (64, 128)


def test_forward_raw_matches_the_plain_model(model, tiny_bridge, tiny_tokens):
    with torch.no_grad():
        expected = tiny_bridge(tiny_tokens)
    assert_close(model.forward_raw(tiny_tokens).logits, expected)


def test_splice_changes_logits_and_sae_output_replaces_activation(model, tiny_tokens):
    raw = model.forward_raw(tiny_tokens, capture=[POS])
    out = model(tiny_tokens, capture=["blocks.2.hook_resid_pre"])
    assert (out.logits - raw.logits).abs().max() > 1e-3
    acts = out.sae_acts[POS]
    assert_close(acts.sae_in, raw.acts[POS])
    # with the SAE output forced to equal its input, the spliced model equals the original
    with torch.no_grad():
        sae = model.sae(POS)
        sae.encoder[0].weight.zero_()
        sae.encoder[0].bias.zero_()
        sae.decoder.bias.zero_()
    zero_out = model(tiny_tokens)
    assert_close(zero_out.sae_acts[POS].sae_out, torch.zeros_like(acts.sae_in))
    assert (zero_out.logits - raw.logits).abs().max() > 1e-3


def test_gradients_reach_only_sae_parameters(model, tiny_tokens):
    out = model(tiny_tokens)
    out.logits.logsumexp(-1).mean().backward()
    sae_params = {id(p) for p in model.saes.parameters()}
    for name, param in model.named_parameters():
        if id(param) in sae_params:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


def test_splice_survives_eval_call(model, tiny_tokens):
    first = model(tiny_tokens).logits.detach()
    model.forward_raw(tiny_tokens, capture=[POS], stop_at_layer=2)  # temporary hooks elsewhere
    again = model(tiny_tokens).logits.detach()
    assert_close(first, again)
    assert (again - model.forward_raw(tiny_tokens).logits).abs().max() > 1e-3


def test_stop_at_layer_captures_the_same_activation(model, tiny_tokens):
    stop = model.stop_layer_for([POS])
    assert stop == 2
    early = model.forward_raw(tiny_tokens, capture=[POS], stop_at_layer=stop)
    full = model.forward_raw(tiny_tokens, capture=[POS])
    assert early.logits is None
    assert_close(early.acts[POS], full.acts[POS])


def test_unknown_hook_lists_close_names(tiny_bridge):
    with pytest.raises(HookNameError, match=r"no hook 'blocks.1.hook_resid_pr'.*blocks.1.hook_resid_pre"):
        SAETransformer(tiny_bridge, ["blocks.1.hook_resid_pr"], 1.0)


def test_skip_first_position_leaves_position_0_untouched(tiny_bridge, tiny_tokens):
    torch.manual_seed(0)
    model = SAETransformer(tiny_bridge, [POS], 2.0, skip_first_position=True)
    raw = model.forward_raw(tiny_tokens, capture=[POS])
    out = model(tiny_tokens)
    acts = out.sae_acts[POS]
    assert acts.codes.shape == (2, 11, 128)
    assert_close(acts.sae_in, raw.acts[POS][:, 1:])
    # causal model: the prediction at position 0 sees only position 0, which the SAE left alone
    assert_close(out.logits[:, 0], raw.logits[:, 0])
    assert (out.logits[:, 1:] - raw.logits[:, 1:]).abs().max() > 1e-3


def test_decoder_bias_from_data_is_the_mean_input(tiny_bridge, tiny_tokens):
    torch.manual_seed(0)
    model = SAETransformer(tiny_bridge, [POS], 2.0, skip_first_position=True)
    model.init_decoder_bias_from_data(tiny_tokens)
    expected = model.forward_raw(tiny_tokens, capture=[POS]).acts[POS][:, 1:].mean(dim=(0, 1))
    assert_close(model.sae(POS).decoder.bias.data, expected)
