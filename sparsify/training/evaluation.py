"""The held-out evaluation (docs/design.md §5): eval metrics with their standard errors and
per-sequence values, alive dictionary elements, and the DDP-aware running means both the eval
and the train log use."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sparsify import metric_names as names
from sparsify import metrics
from sparsify.config import TrainConfig
from sparsify.data import iter_batches, shard_size
from sparsify.sae_transformer import ForwardOutput, SAETransformer
from sparsify.training.alive import AliveCount, count_alive, saes_in_eval_mode
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
    positions >= `first`: the means over the batch's sequences of `sequence_logit_metrics`."""
    per_sequence = sequence_logit_metrics(tokens, orig_logits, sae_logits, first)
    return {name: values.mean().item() for name, values in per_sequence.items()}


def sequence_logit_metrics(
    tokens: Tensor, orig_logits: Tensor, sae_logits: Tensor, first: int = 0
) -> dict[str, Tensor]:
    """`logit_metrics` of each sequence (float64, shape (batch,)): each the mean over the
    sequence's positions >= `first`."""
    tokens, orig_logits, sae_logits = tokens[:, first:], orig_logits[:, first:], sae_logits[:, first:]
    ce_orig = metrics.ce_loss_per_sequence(orig_logits, tokens)
    ce_sae = metrics.ce_loss_per_sequence(sae_logits, tokens)
    return {
        names.CE_ORIG: ce_orig,
        names.CE_SAE: ce_sae,
        names.CE_LOSS_INCREASE: ce_sae - ce_orig,
        names.KL: metrics.kl_divergence_per_sequence(orig_logits, sae_logits),
        names.TOP1_AGREEMENT: metrics.top1_agreement_per_sequence(orig_logits, sae_logits),
        names.TOTAL_VARIATION: metrics.total_variation_per_sequence(orig_logits, sae_logits),
    }


def sequence_l0(out: ForwardOutput) -> dict[str, Tensor]:
    """L0 of each sequence (float64, shape (batch,)) per SAE position, and summed over positions."""
    per_hook = {
        names.per_hook(names.L0, h): metrics.l0_per_sequence(a.codes) for h, a in out.sae_acts.items()
    }
    return {names.L0: torch.stack(list(per_hook.values())).sum(0), **per_hook}


@dataclasses.dataclass
class EvalResult:
    """One eval's values, by bare metric name (docs/design.md §5).

    Attributes:
        metrics: Each metric's mean over the eval sequences (weighted by sequences), and the
            alive counts.
        standard_errors: Each metric's standard error, except the alive counts (counts, not
            means). For the metrics with per-sequence values (`per_sequence`): sample std
            (ddof=1) of those values / sqrt(n sequences). For the others (explained variance,
            frac zero, loss terms), whose values exist only per batch: the standard error of
            the weighted mean of the per-batch values (`metrics.weighted_standard_error`,
            weights = sequences per batch; it depends on how sequences are grouped into batches,
            so under DDP it differs from one rank's). NaN from fewer than 2 values.
        per_sequence: For `names.PER_SEQUENCE_METRICS` (and L0 per position): the value of
            each eval sequence (the mean over its positions >= the first SAE position), in the
            order of the eval stream whatever the number of ranks. With equal-length sequences
            their mean is the metric's value in `metrics`.
    """

    metrics: dict[str, float]
    standard_errors: dict[str, float]
    per_sequence: dict[str, list[float]]
    alive: AliveCount | None = None
    """Firing counts of the eval's sequences that the alive count covers, for `count_alive`."""


@torch.no_grad()
def evaluate(
    model: SAETransformer,
    cfg: TrainConfig,
    tokenizer: Any,
    plan: LossPlan,
    rank: int = 0,
    world_size: int = 1,
) -> EvalResult:
    """Eval metrics on the held-out stream, un-prefixed, with their standard errors and the
    per-sequence values they come from (`EvalResult`, docs/design.md §5).

    Over `eval_n_samples` sequences: CE of both models and the increase (nats/token), KL,
    top-1 agreement, total variation, L0, explained variance, and each configured loss term.
    Alive dictionary elements are counted over `act_frequency_n_tokens` tokens with a forward
    that stops after the last SAE. Collective under torch.distributed: every rank returns the
    same result. The SAEs run in eval mode (`SparseAutoencoder.eval()`: BatchTopK's threshold rule
    instead of its batch rule) and are put back in the mode they were in.
    """
    result = evaluate_without_alive(model, cfg, tokenizer, plan, rank, world_size)
    result.metrics.update(count_alive(model, cfg, tokenizer, rank, world_size, result.alive))
    return result


@torch.no_grad()
def evaluate_without_alive(
    model: SAETransformer,
    cfg: TrainConfig,
    tokenizer: Any,
    plan: LossPlan,
    rank: int = 0,
    world_size: int = 1,
) -> EvalResult:
    """`evaluate` without the alive counts, so each part is timed: `count_alive(...,
    result.alive)` adds them, running only the alive sequences the eval did not."""
    with saes_in_eval_mode(model):
        return _evaluate(model, cfg, tokenizer, plan, rank, world_size)


def _evaluate(
    model: SAETransformer, cfg: TrainConfig, tokenizer: Any, plan: LossPlan, rank: int, world_size: int
) -> EvalResult:
    assert cfg.eval_data is not None
    device = model.model_device
    # eval always runs the original model, so the SAE forward can always resume from it
    eval_plan = dataclasses.replace(plan, stop_at_layer=None, resume_hook=model.resume_hook)
    acc = MeanAccumulator(device)
    sequences: dict[str, list[float]] = defaultdict(list)  # this rank's, in its reading order
    batches: list[tuple[dict[str, float], float]] = []  # this rank's per-batch values and weights
    alive = AliveCount(model, cfg, rank, world_size)  # the eval's sequences start the alive stream
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
        per_sequence = sequence_l0(out)
        per_sequence.update(sequence_logit_metrics(tokens, raw.logits, out.logits, plan.first_position))
        for name, per_seq in per_sequence.items():
            sequences[name].extend(per_seq.tolist())
            values[name] = per_seq.mean().item()  # (the batch's L0 too: the same mean, in float64)
        acc.add(values, weight=tokens.shape[0])
        alive.add({hook: acts.codes for hook, acts in out.sae_acts.items()})
        batches.append(({k: v for k, v in values.items() if k not in per_sequence}, tokens.shape[0]))
    means = acc.means()
    every_rank = _gather((dict(sequences), batches), world_size)
    ordered = _in_stream_order([rank_sequences for rank_sequences, _ in every_rank])
    all_batches = [batch for _, rank_batches in every_rank for batch in rank_batches]
    standard_errors = {name: metrics.standard_error(values) for name, values in ordered.items()}
    for name in sorted({name for values, _ in all_batches for name in values}):
        weighted = [(values[name], weight) for values, weight in all_batches if name in values]
        standard_errors[name] = metrics.weighted_standard_error(
            [value for value, _ in weighted], [weight for _, weight in weighted]
        )
    return EvalResult(metrics=means, standard_errors=standard_errors, per_sequence=ordered, alive=alive)


def _gather(local: Any, world_size: int) -> list[Any]:
    """`local` of every rank, by rank (collective under torch.distributed; else `[local]`)."""
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        every_rank: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every_rank, local)
        return every_rank
    return [local]


def _in_stream_order(by_rank: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per-sequence values of every rank in the eval stream's order: rank r read sequences r,
    r + world_size, ..., so the stream is rank 0's first, rank 1's first, ..., rank 0's second..."""
    world_size = len(by_rank)
    names_seen = sorted({name for rank_values in by_rank for name in rank_values})
    ordered: dict[str, list[float]] = {}
    for name in names_seen:
        columns = [rank_values.get(name, []) for rank_values in by_rank]
        n = sum(map(len, columns))
        ordered[name] = [columns[i % world_size][i // world_size] for i in range(n)]
    return ordered
