"""A disk cache of the original model's activations at the SAE positions, for local SAEs.

A local SAE (sparsity + MSE(out, in)) needs only the activations at its own position, and
those do not change while it trains: every local trial of a sweep over the same data reads the
same tensors. The first run computes them once and writes one safetensors file, keyed by the
model, the positions and the exact token ids; later runs (other trials, other processes) read
batches from it lazily, so memory stays at one batch.

When it pays (docs/design.md §11): a cached token costs d_in x 4 bytes read from disk (2.3 KB for
SmolLM2's 576), a recomputed one the model's blocks before the SAE (about 108 MFLOP at
SmolLM2's layer 15). On a CPU at ~0.1 TFLOP/s that is ~1 ms of compute against ~1 us of reading:
the cache wins by orders of magnitude. On a GPU (~400 TFLOP/s) recomputing takes ~0.3 ns per
token, faster than reading 2.3 KB from any disk or even host memory: `auto` leaves it off there.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from sparsify.atomic import atomic_write_with
from sparsify.config import TrainConfig
from sparsify.embedded import cache_dir
from sparsify.errors import ConfigError
from sparsify.hooks import hook_to_key
from sparsify.sae_transformer import SAETransformer

logger = logging.getLogger(__name__)

CACHE_FORMAT = "acts-v1"


def activations_dir() -> Path:
    """The folder of the activation caches: `<cache dir>/activations` (`sparsify.embedded.cache_dir`)."""
    return cache_dir() / "activations"


MAX_CACHE_BYTES = 8 * 2**30
"""`auto` leaves the cache off above this size (the first run holds it in memory once)."""


def wants_activation_cache(cfg: TrainConfig, model: SAETransformer, n_sequences: int) -> bool:
    """Whether a run reads its SAE inputs from the cache: its loss needs nothing but them
    (local), it has one SAE (a second SAE's input depends on the first one's output), its data
    is local (hub streams are not replayed), its `n_sequences` x n_ctx tokens fit in
    `MAX_CACHE_BYTES`, and `activation_cache` is `on`, or `auto` on a CPU.

    Raises:
        ConfigError: `activation_cache: on` for a loss, SAEs or data the cache cannot serve.
    """
    local_loss = not cfg.loss.needs_original_model and not cfg.loss.needs_logits
    local_data = cfg.train_data.dataset_name is None
    servable = local_loss and local_data and len(model.sae_positions) == 1
    if cfg.activation_cache == "on" and not servable:
        raise ConfigError(
            "activation_cache: on needs a local loss (sparsity, out_to_in), one SAE position "
            "and local train_data"
        )
    if cfg.activation_cache == "off" or not servable:
        return False
    widths = sum(model.sae(name).d_in for name in model.sae_positions)
    n_bytes = n_sequences * cfg.train_data.n_ctx * widths * 4
    if cfg.activation_cache == "auto" and n_bytes > MAX_CACHE_BYTES:
        logger.info(
            "activation cache off: %.1f GiB would exceed %.0f GiB", n_bytes / 2**30, MAX_CACHE_BYTES / 2**30
        )
        return False
    return cfg.activation_cache == "on" or model.model_device.type == "cpu"


class ActivationCache:
    """Stored activations (n_sequences, pos, d_in) per SAE position, read one batch at a time."""

    def __init__(self, path: Path, sae_positions: list[str]):
        self.path = path
        self.sae_positions = sae_positions

    def batches(self, batch_size: int) -> Iterator[dict[str, Tensor]]:
        """Batches in the order they were written: {hook name: (batch, pos, d_in)}."""
        with safe_open(str(self.path), framework="pt", device="cpu") as stored:
            n_rows = stored.get_slice(hook_to_key(self.sae_positions[0])).get_shape()[0]
            for start in range(0, n_rows, batch_size):
                yield {
                    name: stored.get_slice(hook_to_key(name))[start : start + batch_size]
                    for name in self.sae_positions
                }


def activation_cache(
    model: SAETransformer, cfg: TrainConfig, token_batches: Iterable[Tensor], rank: int = 0
) -> ActivationCache:
    """The cache for these token batches, computed and written on first use.

    Args:
        model: the SAE model (its frozen language model computes the activations).
        cfg: the run's config (model name and dtype enter the key).
        token_batches: the run's training batches (batch, pos), in training order.
        rank: DDP rank (each rank caches its own shard).
    """
    batches = list(token_batches)
    path = activations_dir() / f"{_cache_key(model, cfg, batches, rank)}.safetensors"
    cache = ActivationCache(path, list(model.sae_positions))
    if path.exists():
        logger.info("reading SAE inputs from the activation cache %s", path)
        return cache
    stop = model.stop_layer_for(model.sae_positions)
    stored: dict[str, list[Tensor]] = {name: [] for name in model.sae_positions}
    for tokens in batches:
        raw = model.forward_raw(
            tokens.to(model.model_device), capture=model.sae_positions, stop_at_layer=stop
        )
        for name in model.sae_positions:
            stored[name].append(raw.acts[name].detach().cpu())
    tensors = {hook_to_key(name): torch.cat(parts).contiguous() for name, parts in stored.items()}
    atomic_write_with(path, lambda tmp: save_file(tensors, tmp))
    size_mib = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    logger.info("wrote the activation cache %s (%.0f MiB)", path, size_mib)
    return cache


def _cache_key(model: SAETransformer, cfg: TrainConfig, batches: list[Tensor], rank: int) -> str:
    identity: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "model": cfg.model_name,
        "model_files": _model_files_stamp(cfg.model_name),
        "model_shape": [model.n_layers, model.n_ctx, model.hook_names[:3]],
        "dtype": cfg.model_dtype,
        "autocast": str(model.autocast_dtype),
        "device": model.model_device.type,
        "positions": list(model.sae_positions),
        "rank": rank,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for tokens in batches:  # the exact token ids: same ids and model -> same activations
        digest.update(tokens.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:24]


def _model_files_stamp(model_name: str) -> list[str]:
    """Size and mtime of a local model folder's files (a retrained model gets a new key)."""
    folder = Path(model_name)
    if not folder.is_dir():
        return []
    return [
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.iterdir()) if p.is_file()
    ]
