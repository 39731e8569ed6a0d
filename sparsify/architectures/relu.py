"""ReLU SAE: the paper's architecture and the default (docs/design.md §3)."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from sparsify.architectures.base import SparseAutoencoder


class ReluSAE(SparseAutoencoder):
    """c = ReLU(W_e x + b_e) (Braun et al. 2024, §2; Bricken et al. 2023).

    Its sparsity comes from the `sparsity` loss term, the L_p norm of the codes.
    """

    architecture: ClassVar[str] = "relu"
    sparsity_terms: ClassVar[tuple[str, ...]] = ("sparsity",)

    def activate(self, pre: Float[Tensor, "... n_dict"]) -> Float[Tensor, "... n_dict"]:
        return F.relu(pre)
