"""SAE architectures, one file each, behind one interface (`SparseAutoencoder`).

`build_sae(saes_cfg, d_in, n_dict)` makes the one a config's `saes.architecture` names.
"""

from __future__ import annotations

from collections.abc import Callable

from sparsify.architectures.base import SparseAutoencoder
from sparsify.architectures.batchtopk import BatchTopKSAE
from sparsify.architectures.jumprelu import JumpReLUSAE
from sparsify.architectures.relu import ReluSAE
from sparsify.architectures.topk import TopKSAE
from sparsify.config import SAEsConfig

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (ReluSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE)
}

SAEFactory = Callable[[int, int], SparseAutoencoder]
"""(d_in, n_dict) -> a fresh SAE."""


def sae_factory(saes: SAEsConfig | None = None) -> SAEFactory:
    """What builds each SAE of a config (`saes.architecture` and its parameters); ReLU for None.

    Raises:
        ConfigError: (when called) k above the dictionary size.
    """
    if saes is None or saes.architecture == "relu":
        return ReluSAE
    if saes.architecture in ("topk", "batchtopk"):
        cls = TopKSAE if saes.architecture == "topk" else BatchTopKSAE
        k = saes.k
        assert k is not None  # SAEsConfig requires it
        return lambda d_in, n_dict: cls(d_in, n_dict, k)
    return lambda d_in, n_dict: JumpReLUSAE(
        d_in, n_dict, saes.jumprelu_threshold_init, saes.jumprelu_bandwidth
    )


__all__ = [
    "ARCHITECTURES",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "ReluSAE",
    "SAEFactory",
    "SparseAutoencoder",
    "TopKSAE",
    "sae_factory",
]
