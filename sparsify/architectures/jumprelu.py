"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity
with JumpReLU Sparse Autoencoders", arXiv 2407.14435)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn

from sparsify.architectures.base import SparseAutoencoder


def _rectangle(u: Tensor) -> Tensor:
    """K(u) = 1[|u| < 1/2], the straight-through kernel (Rajamanoharan et al. 2024, eq. 10)."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta); d/dpre = H(pre - theta), d/dtheta ~ -(theta/eps) K((pre - theta)/eps)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # pyright: ignore[reportIncompatibleMethodOverride]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_threshold = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        return grad_pre, grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """H(pre - theta); d/dpre = 0, d/dtheta ~ -(1/eps) K((pre - theta)/eps)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:  # pyright: ignore[reportIncompatibleMethodOverride]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        return None, grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


class JumpReLUSAE(SparseAutoencoder):
    """c_i = pre_i * H(pre_i - theta_i), theta_i = exp(log_threshold_i) > 0 learned per latent
    (Rajamanoharan et al. 2024, eq. 4). Sparsity: the `l0_penalty` loss term, mean over tokens
    of sum_i H(pre_i - theta_i) (eq. 9), in place of the L_p norm of the codes.

    H has zero gradient almost everywhere; theta learns through straight-through estimators
    with the rectangle kernel K(u) = 1[|u| < 1/2] and bandwidth eps (eq. 11-12):
    d c_i / d theta_i ~ -(theta_i / eps) K((pre_i - theta_i) / eps) and
    d H(pre_i - theta_i) / d theta_i ~ -(1 / eps) K((pre_i - theta_i) / eps).
    Codes pass gradients to pre where the latent is on, as a ReLU would.

    Args:
        threshold_init: theta at init, for every latent (the paper's 0.001 suits activations
            of norm ~1; residual streams of real LMs need larger).
        bandwidth: eps of the straight-through estimators (the paper's 0.001, same scale caveat).
    """

    architecture: ClassVar[str] = "jumprelu"
    sparsity_terms: ClassVar[tuple[str, ...]] = ("l0_penalty",)

    def __init__(self, d_in: int, n_dict: int, threshold_init: float, bandwidth: float):
        super().__init__(d_in, n_dict)
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.full((n_dict,), math.log(threshold_init)))

    @property
    def threshold(self) -> Float[Tensor, " n_dict"]:
        return self.log_threshold.exp()

    def activate(self, pre: Float[Tensor, "... n_dict"]) -> Float[Tensor, "... n_dict"]:
        return _JumpReLU.apply(pre, self.threshold, self.bandwidth)  # type: ignore[no-any-return]

    def l0_penalty(self, pre: Float[Tensor, "... n_dict"]) -> Float[Tensor, ""]:
        """Mean over tokens of sum_i H(pre_i - theta_i) (the expected L0), differentiable in
        theta through the straight-through estimator."""
        active = _Step.apply(pre, self.threshold, self.bandwidth)
        return active.sum(-1).mean()  # type: ignore[union-attr]

    def forward_with_penalties(
        self, sae_in: Float[Tensor, "... d_in"]
    ) -> tuple[Float[Tensor, "... n_dict"], Float[Tensor, "... d_in"], dict[str, Float[Tensor, ""]]]:
        pre = self.pre_acts(sae_in)
        codes = self.activate(pre)
        return codes, self.decode(codes), {"l0_penalty": self.l0_penalty(pre)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bandwidth={self.bandwidth:g}"
