"""Make a config's model and data ready before many processes use them.

A sweep calls `prepare(cfg)` once in its driver, so parallel trials neither dequantize the
embedded model nor tokenize the same corpus at the same time.
"""

from __future__ import annotations

from sparsify.config import TrainConfig
from sparsify.data import check_data_budget, count_local_sequences
from sparsify.model_loading import load_tokenizer


def prepare(cfg: TrainConfig) -> dict[str, int | None]:
    """Cache the model and tokenize local data; returns the sequences available per split.

    Raises:
        ConfigError, DataError, MissingPackageError: as the trainer would, but before any trial.
    """
    tokenizer = load_tokenizer(cfg.model_name)
    check_data_budget(cfg, tokenizer)
    available: dict[str, int | None] = {}
    for field_name in ("train_data", "eval_data"):
        data = getattr(cfg, field_name)
        if data is not None:
            available[field_name] = count_local_sequences(data, tokenizer)
    return available
