"""Pure metric functions (docs/design.md §5). Names live in `sparsify.metric_names`.

Every function returns a plain float or tensor of counts; the caller prefixes `train/`/`eval/`.
The `*_per_sequence` variants take (batch, pos, ...) tensors and return one float64 value per
sequence (the mean over its tokens), whose mean over equal-length sequences is the plain
function's value. `standard_error` and `weighted_standard_error` give the eval metrics' SEs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def l0_per_sequence(codes: Float[Tensor, "batch pos n_dict"]) -> Float[Tensor, " batch"]:
    """`l0` of each sequence: mean over its tokens of the number of nonzero codes."""
    return (codes > 0).sum(dim=-1).double().mean(dim=-1)


def ce_loss_per_sequence(
    logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, " batch"]:
    """`ce_loss` of each sequence: mean over its predicted tokens (positions 1..pos-1)."""
    per_token = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none"
    )
    return per_token.view(tokens.shape[0], -1).double().mean(dim=-1)


def kl_divergence_per_sequence(
    orig_logits: Float[Tensor, "batch pos vocab"], sae_logits: Float[Tensor, "batch pos vocab"]
) -> Float[Tensor, " batch"]:
    """`kl_divergence` of each sequence (one `logits_kl_loss` per sequence, so its memory stays
    bounded by the loss's blocks)."""
    per_sequence = [logits_kl_loss(o[None], s[None]) for o, s in zip(orig_logits, sae_logits, strict=True)]
    return (
        torch.stack(per_sequence).double() if per_sequence else orig_logits.new_zeros(0, dtype=torch.float64)
    )


def top1_agreement_per_sequence(
    orig_logits: Float[Tensor, "batch pos vocab"], sae_logits: Float[Tensor, "batch pos vocab"]
) -> Float[Tensor, " batch"]:
    """`top1_agreement` of each sequence."""
    return (orig_logits.argmax(-1) == sae_logits.argmax(-1)).double().mean(dim=-1)


def total_variation_per_sequence(
    orig_logits: Float[Tensor, "batch pos vocab"], sae_logits: Float[Tensor, "batch pos vocab"]
) -> Float[Tensor, " batch"]:
    """`total_variation` of each sequence."""
    p = F.softmax(orig_logits.float(), dim=-1)
    q = F.softmax(sae_logits.float(), dim=-1)
    return (0.5 * (p - q).abs().sum(-1)).double().mean(dim=-1)


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of `values`: sample standard deviation (ddof=1) / sqrt(n);
    NaN for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = math.fsum(values) / n
    return math.sqrt(math.fsum((x - mean) ** 2 for x in values) / (n - 1) / n)


def weighted_standard_error(values: Sequence[float], weights: Sequence[float]) -> float:
    """Standard error of the weighted mean `m = sum w_i x_i / sum w_i` of n values (each a
    cluster's mean, e.g. an eval batch's value weighted by its sequences):
    `sqrt(n / (n - 1) * sum_i w_i^2 (x_i - m)^2) / sum_i w_i`, which with equal weights is
    `standard_error(values)`. NaN for fewer than 2 values or no weight."""
    n = len(values)
    total = math.fsum(weights)
    if n < 2 or total <= 0:
        return math.nan
    mean = math.fsum(w * x for x, w in zip(values, weights, strict=True)) / total
    spread = math.fsum((w * (x - mean)) ** 2 for x, w in zip(values, weights, strict=True))
    return math.sqrt(n / (n - 1) * spread) / total


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
