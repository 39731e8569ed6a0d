"""Loss terms of one batch, and the held-out evaluation (DESIGN.md §4-5)."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sparsify import metric_names as names
from sparsify import metrics
from sparsify.config import LATER_RESID_PRE, LossConfig, TrainConfig
from sparsify.data import iter_batches, shard_size
from sparsify.errors import HookNameError
from sparsify.hooks import block_index, check_hook_names, later_resid_pre_hooks
from sparsify.losses import compiled, logits_kl_loss, mse_loss, sparsity_loss
from sparsify.sae_transformer import ForwardOutput, SAETransformer


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
        HookNameError: an in_to_orig hook the model does not have.
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
    """Unweighted values of every configured loss term for one batch (DESIGN.md §4).

    Per-position terms are summed over SAE positions; in_to_orig is the mean over its hooks
    (so `weighted_total` gives each hook total_coeff / n_hooks).

    Args:
        raw: the original model's output for these tokens (with `plan.orig_capture`), if
            already computed; otherwise it is computed here when a term needs it.
        cached_acts: stored activations (batch, pos, d_in) at every SAE position, instead of
            `tokens`; only for losses that need nothing else (`LossConfig.needs_original_model`
            false and no logits): see `sparsify.activation_cache`.

    Returns:
        (terms keyed by term name, the SAE model's forward output).
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
    sparsity_fn, mse_fn, kl_fn = sparsity_loss, mse_loss, logits_kl_loss
    if plan.compiled:
        sparsity_fn, mse_fn, kl_fn = compiled(sparsity_loss), compiled(mse_loss), compiled(logits_kl_loss)
    terms: dict[str, Tensor] = {}
    zero = torch.zeros((), device=model.model_device)
    for name in ("sparsity", "out_to_in", "out_to_orig"):
        if getattr(loss, name) is not None:
            terms[name] = zero
    first = plan.first_position
    for hook, acts in out.sae_acts.items():
        if loss.sparsity is not None:
            terms["sparsity"] = terms["sparsity"] + sparsity_fn(
                acts.codes, loss.sparsity.p_norm, acts.sae_in.shape[-1]
            )
        if loss.out_to_in is not None:
            terms["out_to_in"] = terms["out_to_in"] + mse_fn(acts.sae_out, acts.sae_in)
        if loss.out_to_orig is not None and raw is not None:
            orig = raw.acts[hook][:, first:].float()
            terms["out_to_orig"] = terms["out_to_orig"] + mse_fn(acts.sae_out, orig)
    if loss.in_to_orig is not None and raw is not None:
        per_hook = [
            mse_fn(out.acts[h][:, first:].float(), raw.acts[h][:, first:].float())
            for h in plan.in_to_orig_hooks
        ]
        terms["in_to_orig"] = torch.stack(per_hook).mean() if per_hook else zero
    if loss.logits_kl is not None and raw is not None:
        assert raw.logits is not None and out.logits is not None  # the plan runs to the logits
        terms["logits_kl"] = kl_fn(raw.logits[:, first:], out.logits[:, first:])
    return terms, out


class MeanAccumulator:
    """Weighted running means of named floats, all-reduced across ranks when distributed."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = device  # NCCL reduces only GPU tensors
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, values: dict[str, float], weight: float) -> None:
        for key, value in values.items():
            self.sums[key] += value * weight
            self.weights[key] += weight

    def means(self) -> dict[str, float]:
        keys = sorted(self.sums)
        if dist.is_available() and dist.is_initialized() and keys:
            packed = torch.tensor(
                [[self.sums[k], self.weights[k]] for k in keys], dtype=torch.float64, device=self.device
            )
            dist.all_reduce(packed)
            return {k: (s / w if w else math.nan) for k, (s, w) in zip(keys, packed.tolist(), strict=False)}
        return {k: self.sums[k] / self.weights[k] for k in keys}


def batch_sae_metrics(out: ForwardOutput) -> dict[str, float]:
    """Per-position L0, fraction of zero codes and explained variance, plus L0 summed over
    positions (metric_names: L0 aggregates are sums over SAE positions)."""
    values: dict[str, float] = {names.L0: 0.0}
    for hook, acts in out.sae_acts.items():
        hook_l0 = metrics.l0(acts.codes)
        values[names.L0] += hook_l0
        values[names.per_hook(names.L0, hook)] = hook_l0
        values[names.per_hook(names.FRAC_ZERO, hook)] = metrics.frac_zero(acts.codes)
        values[names.per_hook(names.EXPLAINED_VARIANCE, hook)] = metrics.explained_variance(
            acts.sae_out, acts.sae_in
        )
        values[names.per_hook(names.EXPLAINED_VARIANCE_LN, hook)] = metrics.explained_variance(
            acts.sae_out, acts.sae_in, layer_norm=True
        )
    return values


def downstream_metrics(plan: LossPlan, out: ForwardOutput, raw: ForwardOutput) -> dict[str, float]:
    """Explained variance of the other MSE-type terms (DESIGN.md §5): each in_to_orig hook
    (SAE model vs original model) and, per SAE, out_to_orig (SAE output vs original activation)."""
    first = plan.first_position
    pairs = {h: (out.acts[h][:, first:], raw.acts[h][:, first:]) for h in plan.in_to_orig_hooks}
    if plan.loss.out_to_orig is not None:
        pairs.update(
            {f"out_to_orig/{h}": (acts.sae_out, raw.acts[h][:, first:]) for h, acts in out.sae_acts.items()}
        )
    values: dict[str, float] = {}
    for key, (pred, target) in pairs.items():
        values[names.per_hook(names.EXPLAINED_VARIANCE, key)] = metrics.explained_variance(pred, target)
        values[names.per_hook(names.EXPLAINED_VARIANCE_LN, key)] = metrics.explained_variance(
            pred, target, layer_norm=True
        )
    return values


def logit_metrics(
    tokens: Tensor, orig_logits: Tensor, sae_logits: Tensor, first: int = 0
) -> dict[str, float]:
    """CE of both models and the increase, KL, top-1 agreement and total variation, over
    positions >= `first`."""
    tokens, orig_logits, sae_logits = tokens[:, first:], orig_logits[:, first:], sae_logits[:, first:]
    ce_orig = metrics.ce_loss(orig_logits, tokens)
    ce_sae = metrics.ce_loss(sae_logits, tokens)
    return {
        names.CE_ORIG: ce_orig,
        names.CE_SAE: ce_sae,
        names.CE_LOSS_INCREASE: ce_sae - ce_orig,
        names.KL: metrics.kl_divergence(orig_logits, sae_logits),
        names.TOP1_AGREEMENT: metrics.top1_agreement(orig_logits, sae_logits),
        names.TOTAL_VARIATION: metrics.total_variation(orig_logits, sae_logits),
    }


@torch.no_grad()
def evaluate(
    model: SAETransformer,
    cfg: TrainConfig,
    tokenizer: Any,
    plan: LossPlan,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Eval metrics on the held-out stream, un-prefixed (DESIGN.md §5).

    Over `eval_n_samples` sequences: CE of both models and the increase (nats/token), KL,
    top-1 agreement, total variation, L0, explained variance, and each configured loss term.
    Alive dictionary elements are counted over `act_frequency_n_tokens` tokens with a forward
    that stops after the last SAE.
    """
    assert cfg.eval_data is not None
    device = model.model_device
    # eval always runs the original model, so the SAE forward can always resume from it
    eval_plan = dataclasses.replace(plan, stop_at_layer=None, resume_hook=model.resume_hook)
    acc = MeanAccumulator(device)
    for tokens in iter_batches(
        cfg.eval_data,
        tokenizer,
        max(1, cfg.batch_size // world_size),
        # rank r reads sequences r, r + world_size, ...: together exactly the first eval_n_samples
        # (at least 1 each, so every rank has the same metric keys to all-reduce)
        max(1, shard_size(cfg.eval_n_samples, rank, world_size)),
        "eval_n_samples",
        rank,
        world_size,
    ):
        tokens = tokens.to(device)
        raw = model.forward_raw(tokens, capture=eval_plan.orig_capture)
        terms, out = loss_terms(model, tokens, eval_plan, raw=raw)
        values = {names.loss_term(k): v.item() for k, v in terms.items()}
        values.update(batch_sae_metrics(out))
        values.update(downstream_metrics(eval_plan, out, raw))
        assert raw.logits is not None and out.logits is not None  # eval runs to the logits
        values.update(logit_metrics(tokens, raw.logits, out.logits, plan.first_position))
        acc.add(values, weight=tokens.shape[0])
    result = acc.means()
    result.update(count_alive(model, cfg, tokenizer, rank, world_size))
    return result


@torch.no_grad()
def count_alive(
    model: SAETransformer, cfg: TrainConfig, tokenizer: Any, rank: int = 0, world_size: int = 1
) -> dict[str, float]:
    """Alive dictionary elements per position (fired at least once) over
    `act_frequency_n_tokens` eval tokens, and their sum over positions."""
    assert cfg.eval_data is not None
    n_ctx = cfg.eval_data.n_ctx
    n_seqs = shard_size(math.ceil(cfg.act_frequency_n_tokens / n_ctx), rank, world_size)
    stop = model.stop_layer_for(model.sae_positions)
    counters = {
        h: metrics.FiringCounter(model.sae(h).n_dict, model.model_device) for h in model.sae_positions
    }
    batches: Iterable[Tensor] = iter_batches(
        cfg.eval_data,
        tokenizer,
        max(1, cfg.batch_size // world_size),
        n_seqs,
        "act_frequency_n_tokens",
        rank,
        world_size,
    )
    for tokens in batches:
        out = model.forward(tokens.to(model.model_device), stop_at_layer=stop)
        for hook, acts in out.sae_acts.items():
            counters[hook].update(acts.codes)
    result: dict[str, float] = {}
    for hook, counter in counters.items():
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counter.counts)
        result[names.per_hook(names.ALIVE, hook)] = counter.alive()
    result[names.ALIVE] = sum(result.values())
    return result
