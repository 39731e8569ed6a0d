"""The interface every SAE architecture implements (docs/design.md §3, §10).

An SAE maps an activation x (..., d_in) to codes c (..., n_dict) and back:

    pre = W_e x + b_e                  (`pre_acts`; x is not centered first: no b_pre)
    c   = activation(pre)              (`activate`: what differs between architectures)
    x^  = D c + b_d                    (`decode`; D's columns normalized to unit L2 norm)

State-dict names are the reference library's for every architecture (`encoder.0.weight`,
`encoder.0.bias`, `decoder.weight`, `decoder.bias`), plus an architecture's own tensors
(JumpReLU's `log_threshold`, BatchTopK's `threshold`).
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn


class SparseAutoencoder(nn.Module):
    """Shared encoder/decoder of every architecture; subclasses define `activate`.

    The decoder weight is stored as it trains and normalized functionally inside `decode`
    (unit-norm columns, so the codes carry the scale and Adam's state matches the true
    gradients). Decoder init is orthogonal, as in the reference library.

    Args:
        d_in: width of the activation the SAE reads.
        n_dict: dictionary size (number of latents).
    """

    architecture: ClassVar[str]
    """The name in `saes.architecture` (relu, topk, batchtopk, jumprelu)."""
    sparsity_terms: ClassVar[tuple[str, ...]]
    """The loss terms that set its sparsity and that it accepts (`sparsify.config.SPARSITY_TERMS`)."""

    def __init__(self, d_in: int, n_dict: int):
        super().__init__()
        self.d_in = d_in
        self.n_dict = n_dict
        self.encoder = nn.Sequential(nn.Linear(d_in, n_dict, bias=True))
        self.decoder = nn.Linear(n_dict, d_in, bias=True)
        nn.init.orthogonal_(self.decoder.weight)

    @property
    def dict_elements(self) -> Float[Tensor, "d_in n_dict"]:
        """Decoder columns normalized to unit L2 norm."""
        return F.normalize(self.decoder.weight, dim=0)

    def pre_acts(self, sae_in: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_dict"]:
        """W_e x + b_e."""
        return self.encoder[0](sae_in)

    def activate(self, pre: Float[Tensor, "... n_dict"]) -> Float[Tensor, "... n_dict"]:
        """Codes from pre-activations (nonnegative; zero where a latent is off)."""
        raise NotImplementedError

    def encode(self, sae_in: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_dict"]:
        return self.activate(self.pre_acts(sae_in))

    def decode(self, codes: Float[Tensor, "... n_dict"]) -> Float[Tensor, "... d_in"]:
        return F.linear(codes, self.dict_elements, self.decoder.bias)

    def forward(
        self, sae_in: Float[Tensor, "... d_in"]
    ) -> tuple[Float[Tensor, "... n_dict"], Float[Tensor, "... d_in"]]:
        """Returns (codes, sae_out)."""
        codes = self.encode(sae_in)
        return codes, self.decode(codes)

    def forward_with_penalties(
        self, sae_in: Float[Tensor, "... d_in"]
    ) -> tuple[Float[Tensor, "... n_dict"], Float[Tensor, "... d_in"], dict[str, Float[Tensor, ""]]]:
        """(codes, sae_out, penalties): `forward` plus the sparsity terms that need more than
        the codes (JumpReLU's L0 penalty needs the pre-activations), keyed by loss-term name.
        The training splice calls this; architectures without such terms return {}."""
        codes, sae_out = self(sae_in)
        return codes, sae_out, {}

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, n_dict={self.n_dict}"
