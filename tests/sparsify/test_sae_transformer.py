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


def test_resuming_from_the_original_residual_gives_the_same_logits_and_gradients(model, tiny_tokens):
    assert model.resume_hook == POS  # the first SAE's block input
    raw = model.forward_raw(tiny_tokens, capture=[POS])
    full = model(tiny_tokens)
    full.logits.logsumexp(-1).mean().backward()
    full_grads = [p.grad.clone() for p in model.saes.parameters()]
    model.saes.zero_grad()
    resumed = model(tiny_tokens, resume_from=(POS, raw.acts[POS]))
    resumed.logits.logsumexp(-1).mean().backward()
    assert_close(resumed.logits, full.logits)
    for p, expected in zip(model.saes.parameters(), full_grads, strict=True):
        assert_close(p.grad, expected)


def test_resuming_skips_the_earlier_blocks_and_restores_them(model, tiny_tokens):
    raw = model.forward_raw(tiny_tokens, capture=[POS, "blocks.0.hook_resid_post"])
    fired: list[str] = []
    hooks = [("blocks.0.hook_resid_post", lambda act, hook: fired.append(hook.name))]
    model.tlens_model.run_with_hooks(tiny_tokens, fwd_hooks=hooks)
    assert fired  # block 0 runs in a plain forward
    fired.clear()
    model.forward_raw(tiny_tokens, resume_from=(POS, torch.zeros_like(raw.acts[POS])))
    with model.tlens_model.hooks(fwd_hooks=hooks):
        model.forward_raw(tiny_tokens, resume_from=(POS, raw.acts[POS]))
    assert not fired  # block 0 was skipped
    assert_close(model.forward_raw(tiny_tokens).logits, raw.logits)  # and is back afterwards


def test_bf16_autocast_keeps_sae_math_in_float32(tiny_bridge, tiny_tokens):
    torch.manual_seed(0)
    model = SAETransformer(tiny_bridge, [POS], 2.0, autocast_dtype=torch.bfloat16)
    out = model(tiny_tokens, capture=["blocks.2.hook_resid_pre"])
    acts = out.sae_acts[POS]
    assert acts.codes.dtype == acts.sae_out.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.saes.parameters())
    reference = SAETransformer(tiny_bridge, [POS], 2.0)
    reference.saes.load_state_dict(model.saes.state_dict())
    expected = reference(tiny_tokens).logits
    rel = (out.logits.float() - expected).norm() / expected.norm()
    assert 0 < rel < 3e-2  # bf16 matmuls: close to float32, but not identical
