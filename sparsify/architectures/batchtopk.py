"""BatchTopK SAE (Bussmann, Leask and Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv 2412.06410)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from sparsify.architectures.base import SparseAutoencoder
from sparsify.errors import ConfigError

THRESHOLD_EMA = 0.01
"""Weight of the newest batch in the threshold estimate once 100 batches have been seen (before
that, the plain mean of every batch so far)."""


class BatchTopKSAE(SparseAutoencoder):
    """Training: keep the k x B largest of ReLU(pre) over a batch of B tokens (per-token L0
    varies, its mean is k). Eval and inference: c = ReLU(pre) * 1[pre > theta], one threshold
    theta for every latent, so a token's codes do not depend on the rest of its batch.

    theta is estimated during training (Bussmann et al. 2024, §3.2): after each training
    forward, the smallest activation the batch rule kept is averaged into `threshold` (the
    running mean of the first 100 batches, then an exponential moving average with weight
    `THRESHOLD_EMA`). `threshold` is a buffer: saved with the weights, not trained. A batch is
    every token the SAE sees in one call: (batch, pos) flattened, per DDP rank. `train()` /
    `eval()` choose the rule, as for dropout.

    Args:
        k: mean active latents per token (1 <= k <= n_dict).

    Raises:
        ConfigError: k above the dictionary size.
    """

    architecture: ClassVar[str] = "batchtopk"
    sparsity_terms: ClassVar[tuple[str, ...]] = ()
    threshold: Tensor
    """The eval rule's threshold theta (0-dim buffer)."""
    threshold_updates: Tensor
    """Training forwards averaged into `threshold` so far (0-dim buffer)."""

    def __init__(self, d_in: int, n_dict: int, k: int):
        super().__init__(d_in, n_dict)
        if not 1 <= k <= n_dict:
            raise ConfigError(f"saes.k: {k} must be between 1 and the dictionary size ({n_dict})")
        self.k = k
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros(()))

    def activate(self, pre: Float[Tensor, "... n_dict"]) -> Float[Tensor, "... n_dict"]:
        acts = F.relu(pre)
        if not self.training:
            return acts * (pre > self.threshold)
        flat = acts.reshape(-1)
        n_keep = min(self.k * (flat.numel() // self.n_dict), flat.numel())
        top = flat.topk(n_keep, sorted=False)
        codes = torch.zeros_like(flat).scatter(0, top.indices, top.values).reshape(acts.shape)
        self._update_threshold(top.values)
        return codes

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        positive = kept[kept > 0]
        if positive.numel() == 0:
            return
        weight = max(THRESHOLD_EMA, 1.0 / float(self.threshold_updates + 1))
        self.threshold.lerp_(positive.min().to(self.threshold.dtype), weight)
        self.threshold_updates += 1

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"
