"""The held-out evaluation (docs/design.md §5): eval metrics, alive dictionary elements, and the
DDP-aware running means both they and the train log use."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sparsify import metric_names as names
from sparsify import metrics
from sparsify.config import TrainConfig
from sparsify.data import iter_batches, shard_size
from sparsify.sae_transformer import ForwardOutput, SAETransformer
from sparsify.training.objective import LossPlan, loss_terms


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
        """Weighted mean of each name over everything added (on every rank, when distributed:
        collective); NaN for a name that got no weight. A rank that added nothing still takes
        part, so ranks may hold different names (e.g. a rank whose eval share is empty)."""
        keys = sorted(self.sums)
        if dist.is_available() and dist.is_initialized():
            every_rank: list[list[str] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(every_rank, keys)
            keys = sorted({key for rank_keys in every_rank for key in rank_keys or ()})
            if not keys:
                return {}
            packed = torch.tensor(
                [[self.sums.get(k, 0.0), self.weights.get(k, 0.0)] for k in keys],
                dtype=torch.float64,
                device=self.device,
            )
            dist.all_reduce(packed)
            return {k: (s / w if w else math.nan) for k, (s, w) in zip(keys, packed.tolist(), strict=True)}
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
    """Explained variance of the other MSE-type terms (docs/design.md §5): each in_to_orig hook
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
    """Eval metrics on the held-out stream, un-prefixed (docs/design.md §5).

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
        # (a rank whose share is empty reads none and adds nothing to the means)
        shard_size(cfg.eval_n_samples, rank, world_size),
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
