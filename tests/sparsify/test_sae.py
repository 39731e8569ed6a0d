import torch
from torch.testing import assert_close

from sparsify.sae import SAE


def test_dictionary_elements_are_unit_norm_and_init_orthogonal():
    torch.manual_seed(0)
    sae = SAE(d_in=8, n_dict=16)
    with torch.no_grad():
        assert_close(sae.dict_elements.norm(dim=0), torch.ones(16))
        # orthogonal init of an (8, 16) matrix: its rows are orthonormal
        w = sae.decoder.weight
        assert_close(w @ w.T, torch.eye(8), atol=1e-5, rtol=0)


def test_decoder_normalization_is_functional():
    torch.manual_seed(0)
    sae = SAE(d_in=4, n_dict=6)
    x = torch.randn(5, 4)
    with torch.no_grad():
        _, out_before = sae(x)
        sae.decoder.weight.mul_(3.0)  # rescaling stored columns must not change the output
        codes, out = sae(x)
        unit = sae.decoder.weight / sae.decoder.weight.norm(dim=0, keepdim=True)
        assert_close(out, codes @ unit.T + sae.decoder.bias)
        assert_close(out, out_before)


def test_gradient_flows_through_the_normalization():
    torch.manual_seed(0)
    sae = SAE(d_in=4, n_dict=6)
    _, out = sae(torch.randn(3, 4))
    out.sum().backward()
    # d(normalized column)/d(column) is orthogonal to the column: the scale gets no gradient
    w, g = sae.decoder.weight, sae.decoder.weight.grad
    assert_close((w * g).sum(0), torch.zeros(6), atol=1e-5, rtol=0)


def test_codes_are_relu_of_affine_encoder():
    torch.manual_seed(0)
    sae = SAE(d_in=3, n_dict=5)
    with torch.no_grad():
        x = torch.randn(2, 7, 3)
        codes, out = sae(x)
        expected = torch.relu(x @ sae.encoder[0].weight.T + sae.encoder[0].bias)
        assert_close(codes, expected)
    assert (codes >= 0).all() and out.shape == x.shape


def test_state_dict_keys_match_reference_format():
    assert sorted(SAE(2, 3).state_dict()) == [
        "decoder.bias",
        "decoder.weight",
        "encoder.0.bias",
        "encoder.0.weight",
    ]
