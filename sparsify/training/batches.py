"""The trainer's one batch source: micro-batches of token ids from the data stream, or, for
local losses, of SAE inputs read from the activation cache (`activation_cache`). The
data-mean decoder-bias init (`saes.decoder_bias_init: data_mean`) reads the first one."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from jaxtyping import Float, Int
from torch import Tensor

from sparsify.config import TrainConfig
from sparsify.data import iter_batches
from sparsify.errors import ConfigError
from sparsify.sae_transformer import SAETransformer
from sparsify.training.activation_cache import activation_cache, wants_activation_cache


@dataclass(frozen=True)
class MicroBatch:
    """One rank's micro-batch: token ids, or the SAE inputs they give at every SAE position."""

    tokens: Int[Tensor, "batch pos"] | None
    """On the model's device; None when `acts` holds cached activations instead."""
    acts: dict[str, Float[Tensor, "batch pos d_in"]] | None = None

    @property
    def n_seqs(self) -> int:
        return self._shape[0]

    @property
    def n_tokens(self) -> int:
        return self._shape[0] * self._shape[1]

    @property
    def _shape(self) -> torch.Size:
        if self.tokens is not None:
            return self.tokens.shape
        assert self.acts is not None
        return next(iter(self.acts.values())).shape


def per_rank_batch_size(cfg: TrainConfig, world_size: int) -> int:
    """Sequences in each rank's micro-batch: `batch_size` is global.

    Raises:
        ConfigError: batch_size not divisible by the number of DDP ranks.
    """
    if cfg.batch_size % world_size:
        raise ConfigError(
            f"batch_size ({cfg.batch_size}) must be divisible by the number of DDP ranks ({world_size})"
        )
    return cfg.batch_size // world_size


def micro_batches(
    model: SAETransformer, cfg: TrainConfig, rank: int, world_size: int, resumed: bool, skip: int
) -> Iterator[MicroBatch]:
    """This rank's micro-batches for the whole run, from micro-batch `skip` on.

    Each rank reads a disjoint shard: batch_size / world_size sequences per micro-batch, of
    the `n_grad_steps * samples_per_step` sequences the run uses. The first `skip` micro-batches
    (those trained on before a checkpoint) are read and dropped, so a resumed run sees the same
    stream as an uninterrupted one. A fresh run with `decoder_bias_init: data_mean` first sets
    every SAE's decoder bias from micro-batch 0 (averaged over ranks).

    Raises:
        ConfigError: batch_size not divisible by the number of DDP ranks.
        DataError: the data runs out (see `sparsify.data.iter_batches`).
    """
    rank_batch_size = per_rank_batch_size(cfg, world_size)
    n_used = cfg.n_grad_steps * cfg.samples_per_step // world_size  # whole optimizer steps only
    tokenizer = model.tlens_model.tokenizer
    tokens = iter_batches(cfg.train_data, tokenizer, rank_batch_size, n_used, "n_samples", rank, world_size)
    stream: Iterator[MicroBatch]
    if wants_activation_cache(cfg, model, n_used):
        cached = activation_cache(model, cfg, tokens, rank).batches(rank_batch_size)  # replaces the tokens
        stream = (MicroBatch(None, acts) for acts in itertools.islice(cached, skip, None))
    else:  # skipped batches stay on the CPU
        stream = (MicroBatch(batch.to(model.model_device)) for batch in itertools.islice(tokens, skip, None))
    if cfg.saes.decoder_bias_init == "data_mean" and not resumed:  # then skip is 0
        first = next(stream)
        init_decoder_bias(model, first)
        stream = itertools.chain([first], stream)
    return stream


def init_decoder_bias(model: SAETransformer, batch: MicroBatch) -> None:
    """Set every SAE's decoder bias to the mean SAE input over `batch`, averaged over DDP ranks."""
    if batch.acts is not None:
        model.init_decoder_bias_from_acts(batch.acts)
    else:
        assert batch.tokens is not None
        model.init_decoder_bias_from_data(batch.tokens)
    if dist.is_available() and dist.is_initialized():
        # ranks saw different batches; DDP needs identical parameters everywhere
        for name in model.sae_positions:
            bias = model.sae(name).decoder.bias.data
            dist.all_reduce(bias)
            bias /= dist.get_world_size()
