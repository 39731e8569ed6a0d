"""The sparse autoencoder of docs/design.md §3: `SAE` is the ReLU SAE, the default architecture.

Every architecture (ReLU, TopK, BatchTopK, JumpReLU) lives in `sparsify.architectures`, one file
each, behind the `SparseAutoencoder` interface.
"""

from __future__ import annotations

from sparsify.architectures import SparseAutoencoder, sae_factory
from sparsify.architectures.relu import ReluSAE as SAE

__all__ = ["SAE", "SparseAutoencoder", "sae_factory"]
