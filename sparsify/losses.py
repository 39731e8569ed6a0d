"""Loss terms: one pure function each, plus the weighted total (docs/design.md §4).

Term names: `sparsity`, `out_to_in`, `in_to_orig`, `out_to_orig`, `logits_kl`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from sparsify.config import LossConfig


def sparsity_loss(codes: Float[Tensor, "... n_dict"], p_norm: float, d_in: int) -> Float[Tensor, ""]:
    """Mean over tokens of ||codes||_p, divided by d_in (docs/design.md §4, sparsity row).

    Args:
        codes: SAE latent activations, any leading token dims.
        p_norm: p of the norm (1.0 = L1).
        d_in: width of the SAE input.
    """
    return torch.linalg.vector_norm(codes, ord=p_norm, dim=-1).mean() / d_in


def mse_loss(pred: Float[Tensor, "... d"], target: Float[Tensor, "... d"]) -> Float[Tensor, ""]:
    """Mean squared error over every element (so per token and per dimension; docs/design.md §4).

    Used for out_to_in (pred = SAE output, target = SAE input), out_to_orig and each hook of
    in_to_orig.
    """
    return F.mse_loss(pred, target)


KL_CHUNK_ELEMENTS = 2**26
"""Token x vocab entries per block of the KL (256 MB in float32): its float32 temporaries stay
this small however large the batch (e.g. one 1,024-token sequence of GPT-2's 50,257 tokens)."""


def logits_kl_loss(
    orig_logits: Float[Tensor, "... vocab"], sae_logits: Float[Tensor, "... vocab"]
) -> Float[Tensor, ""]:
    """KL(P_orig || P_sae) of next-token distributions in nats, mean over tokens (docs/design.md §4).

    KL = sum_v p_orig(v) (log p_orig(v) - log p_sae(v)), computed in float32 whatever the
    logits' dtype; a vocabulary entry with p_orig(v) = 0 (a -inf logit, e.g. a masked token)
    adds 0, and gets gradient p_sae(v) / n_tokens (0 when the SAE model masks it too). Memory: block by block (about `KL_CHUNK_ELEMENTS` float32 entries of
    temporaries at a time), and the forward stores only the gradient for the backward, in the
    logits' dtype: the closed form d KL / d sae_logits = (p_sae - p_orig) / n_tokens (and,
    should the original logits need one, p_orig (log p_orig - log p_sae - KL_token) / n_tokens).
    Autograd through the formula would keep both log-softmaxes and more, in float32.
    """
    if orig_logits.shape != sae_logits.shape:
        raise ValueError(f"logits shapes differ: {tuple(orig_logits.shape)} and {tuple(sae_logits.shape)}")
    return _LogitsKL.apply(orig_logits, sae_logits)  # type: ignore[no-any-return]


def _blocks(shape: tuple[int, ...]) -> Iterator[tuple[slice, slice]]:
    """(sequences, positions) slices covering a (batch, pos, vocab) tensor in blocks of about
    KL_CHUNK_ELEMENTS entries: whole sequences when they fit, else parts of one."""
    batch, positions, vocab = shape
    per_sequence = max(positions * vocab, 1)
    if per_sequence <= KL_CHUNK_ELEMENTS:
        n = KL_CHUNK_ELEMENTS // per_sequence
        for start in range(0, batch, n):
            yield slice(start, min(start + n, batch)), slice(None)
        return
    size = max(1, KL_CHUNK_ELEMENTS // vocab)
    for b in range(batch):
        for start in range(0, positions, size):
            yield slice(b, b + 1), slice(start, min(start + size, positions))


def _as_3d(logits: Tensor) -> Tensor:
    """(batch, pos, vocab) view of (..., vocab) logits (a copy only for 4+ dims that cannot merge)."""
    if logits.dim() == 3:
        return logits
    if logits.dim() < 3:
        return logits.reshape((1,) * (3 - logits.dim()) + tuple(logits.shape))
    return logits.flatten(0, -3)


class _LogitsKL(torch.autograd.Function):
    """`logits_kl_loss`: block by block; the forward computes the gradients too."""

    @staticmethod
    def forward(ctx: Any, orig_logits: Tensor, sae_logits: Tensor) -> Tensor:
        orig, sae = _as_3d(orig_logits), _as_3d(sae_logits)
        n_tokens = max(orig.shape[0] * orig.shape[1], 1)
        want_orig, want_sae = ctx.needs_input_grad
        grad_orig = torch.empty(orig.shape, dtype=orig.dtype, device=orig.device) if want_orig else None
        grad_sae = torch.empty(sae.shape, dtype=sae.dtype, device=sae.device) if want_sae else None
        total = torch.zeros((), dtype=torch.float32, device=orig.device)
        for seqs, pos in _blocks(tuple(orig.shape)):
            orig_logprobs = F.log_softmax(orig[seqs, pos].float(), dim=-1)
            sae_logprobs = F.log_softmax(sae[seqs, pos].float(), dim=-1)
            orig_probs = orig_logprobs.exp()
            # a token the original model rules out (logit -inf, p = 0) adds 0 to KL, whatever
            # the SAE model gives it: 0 * (-inf - -inf) would be NaN
            log_ratio = torch.where(orig_probs > 0, orig_logprobs - sae_logprobs, 0.0)
            per_token = (orig_probs * log_ratio).sum(dim=-1, keepdim=True)
            total += per_token.sum()
            if grad_sae is not None:
                grad_sae[seqs, pos] = (sae_logprobs.exp() - orig_probs) / n_tokens
            if grad_orig is not None:
                grad_orig[seqs, pos] = orig_probs * (log_ratio - per_token) / n_tokens
        ctx.grad_shapes = (orig_logits.shape, sae_logits.shape)
        ctx.save_for_backward(
            grad_orig if grad_orig is not None else torch.empty(0),
            grad_sae if grad_sae is not None else torch.empty(0),
        )
        return total / n_tokens

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None]:  # pyright: ignore[reportIncompatibleMethodOverride]
        grad_orig, grad_sae = ctx.saved_tensors
        want_orig, want_sae = ctx.needs_input_grad
        orig_shape, sae_shape = ctx.grad_shapes
        return (
            (grad_orig * grad_output).view(orig_shape) if want_orig else None,
            (grad_sae * grad_output).view(sae_shape) if want_sae else None,
        )


LossFn = TypeVar("LossFn", bound=Callable[..., Tensor])


@functools.cache
def compiled(fn: LossFn) -> LossFn:
    """`torch.compile` of a loss function, built once per process (`TrainConfig.compile`).

    For `logits_kl_loss` the log-softmaxes, the KL and its closed-form gradient of each block
    fuse into a few kernels: 0.4 s against 3.1-3.6 s eager for its forward and backward on CPU
    at (8, 128, 49152). Same values to float32 rounding.
    """
    return torch.compile(fn)  # type: ignore[return-value]


def weighted_total(terms: dict[str, Float[Tensor, ""]], loss_cfg: LossConfig) -> Float[Tensor, ""]:
    """Total loss = sum over configured terms of coeff * term (docs/design.md §4).

    Per-position terms (sparsity, out_to_in, out_to_orig) arrive already summed over SAE
    positions, and `in_to_orig` as the mean over its hooks, so
    `total = kl_coeff*KL + sum_pos(sparsity_coeff*L_sp + sum mse_coeff*MSE)`, with in_to_orig's
    per-hook weight total_coeff / n_hooks. Gradient-accumulation division happens in the trainer.

    Raises:
        KeyError: if a configured term is missing from `terms` (a bug, not a user error).
    """
    coeffs = loss_cfg.coeffs()
    total = torch.zeros((), device=next(iter(terms.values())).device)
    for name, coeff in coeffs.items():
        if coeff:
            total = total + coeff * terms[name]
    return total
