"""Make a config's model and data ready before many processes use them.

A sweep calls `prepare(cfg)` once in its driver, so parallel trials neither dequantize the
embedded model nor tokenize the same corpus at the same time.
"""

from __future__ import annotations

from typing import Any

from sparsify.config import TrainConfig
from sparsify.data import count_local_sequences
from sparsify.model_loading import model_source


def load_tokenizer(model_name: str) -> Any:
    """The tokenizer of `model_name` (embedded default, local folder or hub name)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_source(model_name), add_bos_token=True)


def prepare(cfg: TrainConfig) -> dict[str, int | None]:
    """Cache the model and tokenize local data; returns the sequences available per split.

    Raises:
        ConfigError, DataError, MissingPackageError: as the trainer would, but before any trial.
    """
    tokenizer = load_tokenizer(cfg.model_name)
    available: dict[str, int | None] = {}
    for field_name in ("train_data", "eval_data"):
        data = getattr(cfg, field_name)
        if data is not None:
            available[field_name] = count_local_sequences(data, tokenizer)
    return available
