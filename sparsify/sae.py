"""The sparse autoencoder of docs/design.md §3."""

from __future__ import annotations

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn


class SAE(nn.Module):
    """ReLU encoder, unit-norm dictionary elements, bias in the decoder (docs/design.md §3).

    codes = ReLU(W_e x + b_e); sae_out = D codes + b_d, where D is the decoder weight with each
    column normalized to unit L2 norm inside forward (functional normalization keeps Adam's
    state consistent with the true gradients). Parameter names match the reference library's
    state dicts (`encoder.0.weight`, `encoder.0.bias`, `decoder.weight`, `decoder.bias`).
    Decoder init is orthogonal, as in the reference.

    Args:
        d_in: width of the activation the SAE reads.
        n_dict: dictionary size (number of latents).
    """

    def __init__(self, d_in: int, n_dict: int):
        super().__init__()
        self.d_in = d_in
        self.n_dict = n_dict
        self.encoder = nn.Sequential(nn.Linear(d_in, n_dict, bias=True), nn.ReLU())
        self.decoder = nn.Linear(n_dict, d_in, bias=True)
        nn.init.orthogonal_(self.decoder.weight)

    @property
    def dict_elements(self) -> Float[Tensor, "d_in n_dict"]:
        """Decoder columns normalized to unit L2 norm."""
        return F.normalize(self.decoder.weight, dim=0)

    def encode(self, sae_in: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_dict"]:
        return self.encoder(sae_in)

    def decode(self, codes: Float[Tensor, "... n_dict"]) -> Float[Tensor, "... d_in"]:
        return F.linear(codes, self.dict_elements, self.decoder.bias)

    def forward(
        self, sae_in: Float[Tensor, "... d_in"]
    ) -> tuple[Float[Tensor, "... n_dict"], Float[Tensor, "... d_in"]]:
        """Returns (codes, sae_out)."""
        codes = self.encode(sae_in)
        return codes, self.decode(codes)
