"""The training objective: which loss terms one step computes, and their values for a batch
(docs/design.md §4).

`assemble_terms` is the one place the configured terms are put together from tensors; the
transformer path (`loss_terms`) and the MLP path (`sparsify.models.mlp_splice`) both call it,
so the two cannot drift apart. The weighted total is `sparsify.losses.weighted_total`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from sparsify.config import LATER_RESID_PRE, LossConfig
from sparsify.errors import HookNameError
from sparsify.hooks import block_index, check_hook_names, later_resid_pre_hooks
from sparsify.losses import compiled, logits_kl_loss, mse_loss, sparsity_loss
from sparsify.sae_transformer import ForwardOutput, SAETransformer


@dataclass(frozen=True)
class SAETermInputs:
    """What the per-SAE terms read at one SAE position. Shapes (..., d_in) and (..., n_dict)
    with the same leading token dims."""

    codes: Float[Tensor, "... n_dict"]
    sae_in: Float[Tensor, "... d_in"]
    sae_out: Float[Tensor, "... d_in"]
    orig: Float[Tensor, "... d_in"] | None = None
    """The original model's activation there (for out_to_orig), when it was run."""
    penalties: dict[str, Float[Tensor, ""]] = field(default_factory=dict)
    """Sparsity terms the SAE computed itself (JumpReLU's `l0_penalty`)."""


def assemble_terms(
    loss: LossConfig,
    saes: Iterable[SAETermInputs],
    downstream: Sequence[tuple[Tensor, Tensor]] | None,
    logits: tuple[Tensor, Tensor] | None,
    zero: Float[Tensor, ""],
    use_compiled: bool = False,
) -> dict[str, Float[Tensor, ""]]:
    """Unweighted value of every configured loss term (docs/design.md §4), keyed by term name.

    sparsity (the ReLU SAE's L_p norm), l0_penalty (the JumpReLU SAE's, from
    `SAETermInputs.penalties`), out_to_in and out_to_orig are summed over SAE positions; in_to_orig is the mean
    MSE over its hooks (so `weighted_total` weights each hook total_coeff / n_hooks); logits_kl
    is KL(P_orig || P_sae) in nats, mean over tokens. A term whose inputs are missing (no
    original run) is left out, except the summed ones, which start at `zero`.

    Args:
        loss: the configured terms.
        saes: per SAE position, its codes, input, output and the original activation.
        downstream: (SAE model activation, original activation) per in_to_orig hook, or None
            when the original model was not run.
        logits: (orig_logits, sae_logits) (..., vocab or classes), or None.
        zero: a 0-dim zero on the model's device (the start of each sum).
        use_compiled: use the `torch.compile`d loss functions.
    """
    sparsity_fn, mse_fn, kl_fn = sparsity_loss, mse_loss, logits_kl_loss
    if use_compiled:
        sparsity_fn, mse_fn, kl_fn = compiled(sparsity_loss), compiled(mse_loss), compiled(logits_kl_loss)
    terms = {
        name: zero
        for name in ("sparsity", "l0_penalty", "out_to_in", "out_to_orig")
        if getattr(loss, name) is not None
    }
    for sae in saes:
        if loss.sparsity is not None:
            terms["sparsity"] = terms["sparsity"] + sparsity_fn(
                sae.codes, loss.sparsity.p_norm, sae.sae_in.shape[-1]
            )
        if loss.l0_penalty is not None:
            terms["l0_penalty"] = terms["l0_penalty"] + sae.penalties["l0_penalty"]
        if loss.out_to_in is not None:
            terms["out_to_in"] = terms["out_to_in"] + mse_fn(sae.sae_out, sae.sae_in)
        if loss.out_to_orig is not None and sae.orig is not None:
            terms["out_to_orig"] = terms["out_to_orig"] + mse_fn(sae.sae_out, sae.orig)
    if loss.in_to_orig is not None and downstream is not None:
        per_hook = [mse_fn(pred, target) for pred, target in downstream]
        terms["in_to_orig"] = torch.stack(per_hook).mean() if per_hook else zero
    if loss.logits_kl is not None and logits is not None:
        terms["logits_kl"] = kl_fn(*logits)
    return terms


@dataclass(frozen=True)
class LossPlan:
    """What one training step must run: resolved in_to_orig hooks, and where to stop."""

    loss: LossConfig
    sae_positions: tuple[str, ...]
    in_to_orig_hooks: tuple[str, ...]
    stop_at_layer: int | None
    """None: run to the logits; else stop after the last block the losses need."""
    first_position: int = 0
    """Positions before this are left out of every term (`saes.skip_first_position`)."""
    resume_hook: str | None = None
    """The SAE forward resumes here from the original model's residual, so the blocks before
    the first SAE run once per step, not twice (`SAETransformer.resume_hook`)."""
    compiled: bool = False
    """Use the `torch.compile`d loss functions (`TrainConfig.compile`)."""

    @property
    def orig_capture(self) -> tuple[str, ...]:
        at_saes = self.sae_positions if self.loss.out_to_orig is not None else ()
        resume = (self.resume_hook,) if self.resume_hook else ()
        return at_saes + self.in_to_orig_hooks + resume


def make_loss_plan(model: SAETransformer, loss: LossConfig, compiled: bool = False) -> LossPlan:
    """Resolve the loss config against a model (`compiled`: use `torch.compile`d loss terms).

    Raises:
        HookNameError: an in_to_orig hook the model does not have, or one not downstream of
            the SAEs.
    """
    hooks: tuple[str, ...] = ()
    if loss.in_to_orig is not None:
        if loss.in_to_orig.hook_positions == LATER_RESID_PRE:
            hooks = tuple(later_resid_pre_hooks(model.sae_positions, model.n_layers))
        else:
            hooks = tuple(loss.in_to_orig.hook_positions)
        check_hook_names(hooks, model.hook_names, "loss.in_to_orig.hook_positions")
        _check_downstream(hooks, model.sae_positions)
    stop = None if loss.needs_logits else model.stop_layer_for(model.sae_positions)
    # only a step that runs the original model anyway has a residual to resume from
    resume = model.resume_hook if loss.needs_original_model else None
    return LossPlan(loss, tuple(model.sae_positions), hooks, stop, model.first_position, resume, compiled)


def _check_downstream(hooks: tuple[str, ...], sae_positions: list[str]) -> None:
    sae_layers = [block_index(p) for p in sae_positions]
    last_sae = max((layer for layer in sae_layers if layer is not None), default=None)
    for hook in hooks:
        layer = block_index(hook)
        if hook in sae_positions or (layer is not None and last_sae is not None and layer < last_sae):
            raise HookNameError(
                f"loss.in_to_orig.hook_positions: {hook!r} is not downstream of the SAEs "
                f"(last SAE in block {last_sae}); its MSE would not train them"
            )


def loss_terms(
    model: SAETransformer,
    tokens: Tensor | None,
    plan: LossPlan,
    raw: ForwardOutput | None = None,
    cached_acts: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], ForwardOutput]:
    """Unweighted values of every configured loss term for one batch (docs/design.md §4;
    `assemble_terms`), over positions from `plan.first_position` on.

    Args:
        tokens: token ids (batch, pos), or None with `cached_acts`.
        raw: the original model's output for these tokens (with `plan.orig_capture`), if
            already computed; otherwise it is computed here when a term needs it.
        cached_acts: stored activations (batch, pos, d_in) at every SAE position, instead of
            `tokens`; only for losses that need nothing else (`LossConfig.needs_original_model`
            false and no logits): see `sparsify.training.activation_cache`.

    Returns:
        (terms keyed by term name, the SAE model's forward output).

    Raises:
        ValueError: `cached_acts` for a loss that needs the original model or the logits.
    """
    loss = plan.loss
    if cached_acts is not None:
        if loss.needs_original_model or loss.needs_logits:
            raise ValueError("cached activations serve local losses only (sparsity, out_to_in)")
        out = model.apply_saes(cached_acts)
    else:
        assert tokens is not None, "give tokens or cached_acts"
        if raw is None and loss.needs_original_model:
            raw = model.forward_raw(tokens, capture=plan.orig_capture, stop_at_layer=plan.stop_at_layer)
        resume_from = None
        if raw is not None and plan.resume_hook is not None and plan.resume_hook in raw.acts:
            resume_from = (plan.resume_hook, raw.acts[plan.resume_hook])
        out = model.forward(
            tokens, capture=plan.in_to_orig_hooks, stop_at_layer=plan.stop_at_layer, resume_from=resume_from
        )
    first = plan.first_position
    saes = (
        SAETermInputs(
            acts.codes,
            acts.sae_in,
            acts.sae_out,
            raw.acts[hook][:, first:].float() if raw is not None and loss.out_to_orig is not None else None,
            acts.penalties,
        )
        for hook, acts in out.sae_acts.items()
    )
    downstream = logits = None
    if raw is not None:
        downstream = [
            (out.acts[h][:, first:].float(), raw.acts[h][:, first:].float()) for h in plan.in_to_orig_hooks
        ]
        if loss.logits_kl is not None:
            assert raw.logits is not None and out.logits is not None  # the plan runs to the logits
            logits = (raw.logits[:, first:], out.logits[:, first:])
    zero = torch.zeros((), device=model.model_device)
    return assemble_terms(loss, saes, downstream, logits, zero, plan.compiled), out
