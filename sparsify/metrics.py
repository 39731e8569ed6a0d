"""Pure metric functions (docs/design.md §5). Names live in `sparsify.metric_names`.

Every function returns a plain float or tensor of counts; the caller prefixes `train/`/`eval/`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from sparsify.losses import logits_kl_loss


def l0(codes: Float[Tensor, "... n_dict"]) -> float:
    """Mean over tokens of the number of nonzero codes."""
    return (codes > 0).sum(dim=-1).float().mean().item()


def frac_zero(codes: Float[Tensor, "... n_dict"]) -> float:
    """Fraction of all code entries that are exactly zero."""
    return (codes == 0).float().mean().item()


def ce_loss(logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]) -> float:
    """Next-token cross-entropy in nats/token: logits at pos t predict tokens at t+1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()).item()


def kl_divergence(orig_logits: Float[Tensor, "... vocab"], sae_logits: Float[Tensor, "... vocab"]) -> float:
    """KL(P_orig || P_sae) in nats, mean over tokens (same formula as the logits_kl loss)."""
    return logits_kl_loss(orig_logits, sae_logits).item()


def top1_agreement(orig_logits: Float[Tensor, "... vocab"], sae_logits: Float[Tensor, "... vocab"]) -> float:
    """Fraction of tokens where both models' most likely next token is the same."""
    return (orig_logits.argmax(-1) == sae_logits.argmax(-1)).float().mean().item()


def total_variation(orig_logits: Float[Tensor, "... vocab"], sae_logits: Float[Tensor, "... vocab"]) -> float:
    """Total-variation distance 0.5 * sum_v |p_orig - p_sae|, mean over tokens."""
    p = F.softmax(orig_logits.float(), dim=-1)
    q = F.softmax(sae_logits.float(), dim=-1)
    return (0.5 * (p - q).abs().sum(-1)).mean().item()


def explained_variance(
    pred: Float[Tensor, "... d"], target: Float[Tensor, "... d"], layer_norm: bool = False
) -> float:
    """Explained variance, mean over tokens (docs/design.md §5).

    Per token: 1 - sum_d (pred - target)^2 / sum_d (target - mean_target)^2, where mean_target is
    the mean target vector over all tokens in the batch. With `layer_norm`, both are first passed
    through a parameter-free LayerNorm over d.
    """
    pred, target = pred.float(), target.float()
    if layer_norm:
        pred = F.layer_norm(pred, pred.shape[-1:])
        target = F.layer_norm(target, target.shape[-1:])
    token_dims = tuple(range(target.ndim - 1))
    residual = (pred - target).pow(2).sum(-1)
    total = (target - target.mean(dim=token_dims)).pow(2).sum(-1)
    return (1 - residual / total).mean().item()


class FiringCounter:
    """Counts, per dictionary element, the tokens on which it fired (code > 0).

    `alive()` is the number of elements that fired at least once (docs/design.md §2: alive
    dictionary elements over a token budget).
    """

    def __init__(self, n_dict: int, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(n_dict, dtype=torch.long, device=device)
        self.n_tokens = 0

    def update(self, codes: Float[Tensor, "... n_dict"]) -> None:
        flat = codes.detach().reshape(-1, codes.shape[-1])
        self.counts += (flat > 0).sum(0)
        self.n_tokens += flat.shape[0]

    def alive(self) -> int:
        return int((self.counts > 0).sum().item())
