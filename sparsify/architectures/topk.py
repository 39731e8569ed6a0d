"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from sparsify.architectures.base import SparseAutoencoder
from sparsify.errors import ConfigError


def topk_codes(pre: Float[Tensor, "... n_dict"], k: int) -> Float[Tensor, "... n_dict"]:
    """ReLU(TopK_k(pre)): the k largest pre-activations of each token, the rest 0 (Gao et al.
    2024, eq. 2). Gradients reach the kept entries only."""
    top = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))


class TopKSAE(SparseAutoencoder):
    """c = ReLU(TopK_k(W_e x + b_e)): at most k active latents per token, exactly k whenever
    the k largest pre-activations are positive (the rule itself sets L0, so it takes no
    sparsity term). AuxK, Gao et al.'s auxiliary loss for dead latents, is not implemented.

    Args:
        k: active latents per token (1 <= k <= n_dict).

    Raises:
        ConfigError: k above the dictionary size.
    """

    architecture: ClassVar[str] = "topk"
    sparsity_terms: ClassVar[tuple[str, ...]] = ()

    def __init__(self, d_in: int, n_dict: int, k: int):
        super().__init__(d_in, n_dict)
        if not 1 <= k <= n_dict:
            raise ConfigError(f"saes.k: {k} must be between 1 and the dictionary size ({n_dict})")
        self.k = k

    def activate(self, pre: Float[Tensor, "... n_dict"]) -> Float[Tensor, "... n_dict"]:
        return topk_codes(pre, self.k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"
