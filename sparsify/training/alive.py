"""Alive dictionary elements (docs/design.md §2, §5): the elements that fired at least once over
`act_frequency_n_tokens` tokens of the eval stream.

Two shortcuts, neither of which changes the count:

- The eval reads the first `eval_n_samples` sequences of the same stream with the SAEs in the
  same (eval) mode, so its codes are counted as they go by (`AliveCount.add`); `count_alive`
  then runs only the sequences past them.
- With one SAE position, its inputs on the eval stream are the frozen model's activations there,
  the same for every trial of a sweep: on a CPU (`activation_cache: auto`, or `on` anywhere)
  they are read from the activation cache (`sparsify.training.activation_cache`, keyed by the
  model, the position and the token ids), so only the first run on a machine pays the model's
  forward. With several positions an SAE's input depends on the SAEs before it: no cache.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor

from sparsify import metric_names as names
from sparsify.config import TrainConfig
from sparsify.data import iter_batches, shard_size
from sparsify.metrics import FiringCounter
from sparsify.sae_transformer import SAETransformer
from sparsify.training.activation_cache import MAX_CACHE_BYTES, activation_cache


@contextlib.contextmanager
def saes_in_eval_mode(model: SAETransformer) -> Iterator[None]:
    """The SAEs in eval mode inside the block (BatchTopK: the threshold rule, not the batch
    rule), then each back in the mode it was in (a frozen pretrained SAE stays in eval mode)."""
    modes = [(module, module.training) for module in model.saes.modules()]
    model.saes.eval()
    try:
        yield
    finally:
        for module, was_training in modes:
            module.training = was_training


def alive_shard(cfg: TrainConfig, rank: int, world_size: int) -> int:
    """This rank's sequences of the alive count: its round-robin share of
    ceil(act_frequency_n_tokens / n_ctx) eval sequences (`sparsify.data.iter_sequences`)."""
    assert cfg.eval_data is not None
    return shard_size(math.ceil(cfg.act_frequency_n_tokens / cfg.eval_data.n_ctx), rank, world_size)


class AliveCount:
    """Firing counts per SAE position over the first `n_seqs` sequences of this rank's alive stream."""

    def __init__(self, model: SAETransformer, cfg: TrainConfig, rank: int, world_size: int) -> None:
        self.counters = {
            h: FiringCounter(model.sae(h).n_dict, model.model_device) for h in model.sae_positions
        }
        self.n_seqs = 0
        self.wanted = alive_shard(cfg, rank, world_size)

    def add(self, codes: dict[str, Float[Tensor, "batch pos n_dict"]]) -> None:
        """Count the next sequences of the stream (codes per SAE position, SAEs in eval mode);
        those past the alive budget are left out."""
        n_batch = next(iter(codes.values())).shape[0] if codes else 0
        take = min(n_batch, self.wanted - self.n_seqs)
        if take <= 0:
            return
        for hook, hook_codes in codes.items():
            self.counters[hook].update(hook_codes[:take])
        self.n_seqs += take


@torch.no_grad()
def count_alive(
    model: SAETransformer,
    cfg: TrainConfig,
    tokenizer: Any,
    rank: int = 0,
    world_size: int = 1,
    counted: AliveCount | None = None,
) -> dict[str, float]:
    """Alive dictionary elements per position (fired at least once) over
    `act_frequency_n_tokens` eval tokens, and their sum over positions (SAEs in eval mode).
    Collective under torch.distributed.

    Args:
        counted: the counts of the stream's first sequences, taken by an eval that ran over
            them with these SAEs (`AliveCount.add`); only the rest are run here.
    """
    assert cfg.eval_data is not None
    count = counted or AliveCount(model, cfg, rank, world_size)
    with saes_in_eval_mode(model):
        for codes in _codes_after(model, cfg, tokenizer, rank, world_size, count.n_seqs):
            count.add(codes)
    result: dict[str, float] = {}
    for hook, counter in count.counters.items():
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counter.counts)
        result[names.per_hook(names.ALIVE, hook)] = counter.alive()
    result[names.ALIVE] = sum(result.values())
    return result


def _codes_after(
    model: SAETransformer, cfg: TrainConfig, tokenizer: Any, rank: int, world_size: int, skip: int
) -> Iterator[dict[str, Tensor]]:
    """Codes per SAE position of this rank's alive sequences after the first `skip`, in batches."""
    assert cfg.eval_data is not None
    n_seqs = alive_shard(cfg, rank, world_size)
    if skip >= n_seqs:
        return
    batch_size = max(1, cfg.batch_size // world_size)
    tokens = _dropping(
        iter_batches(
            cfg.eval_data, tokenizer, batch_size, n_seqs, "act_frequency_n_tokens", rank, world_size
        ),
        skip,
    )
    if _alive_cache_wanted(cfg, model, n_seqs - skip):
        for acts in activation_cache(model, cfg, tokens, rank).batches(batch_size):
            yield {h: a.codes for h, a in model.apply_saes(acts).sae_acts.items()}
        return
    stop = model.stop_layer_for(model.sae_positions)
    for batch in tokens:
        out = model.forward(batch.to(model.model_device), stop_at_layer=stop)
        yield {h: a.codes for h, a in out.sae_acts.items()}


def _dropping(batches: Iterator[Tensor], skip: int) -> Iterator[Tensor]:
    """`batches` without their first `skip` sequences (rows)."""
    for batch in batches:
        drop = min(skip, batch.shape[0])
        skip -= drop
        if drop < batch.shape[0]:
            yield batch[drop:]


def _alive_cache_wanted(cfg: TrainConfig, model: SAETransformer, n_seqs: int) -> bool:
    """Whether the alive count reads its SAE inputs from the activation cache: one SAE
    position, local eval data, `activation_cache` on, or auto on a CPU (on a GPU the forward is
    faster than reading), and the stored activations under `MAX_CACHE_BYTES`."""
    assert cfg.eval_data is not None
    if (
        cfg.activation_cache == "off"
        or len(model.sae_positions) != 1
        or cfg.eval_data.dataset_name is not None
    ):
        return False
    n_bytes = n_seqs * cfg.eval_data.n_ctx * model.sae(model.sae_positions[0]).d_in * 4
    on_cpu = model.model_device.type == "cpu"
    return n_bytes <= MAX_CACHE_BYTES and (cfg.activation_cache == "on" or on_cpu)
