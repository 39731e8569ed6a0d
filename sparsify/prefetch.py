"""Check and prepare a config's model and data before many processes use them.

A sweep calls `prepare(cfg)` once per SAE type in its driver, before Ray starts: the embedded
model is dequantized and the corpus tokenized once (not by parallel trials at the same time),
and every mistake that would otherwise surface inside each trial (a hook the model lacks, n_ctx
above the model's context, missing or too small data) fails here, once.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsify.config import TrainConfig
from sparsify.data import check_data_budget


def prepare(cfg: TrainConfig, tlens_model: Any | None = None) -> Any:
    """Load the model on CPU (unless given), build the SAEs and loss plan, check the data budget.

    Args:
        tlens_model: a model already loaded for `cfg.model_name`, to skip loading it again.

    Returns:
        The loaded TransformerBridge, to pass to the next call for the same model.

    Raises:
        ConfigError, DataError, HookNameError, MissingPackageError: as the trainer would, but
            before any trial starts.
    """
    from sparsify.model_loading import load_tlens_model
    from sparsify.training.build import build_model
    from sparsify.training.objective import make_loss_plan

    # CPU: the sweep driver may run on a head node without a GPU
    if tlens_model is not None:
        loaded = tlens_model
    else:
        loaded = load_tlens_model(cfg.model_name, torch.device("cpu"), cfg.model_dtype)
    model = build_model(cfg, loaded)
    make_loss_plan(model, cfg.loss)
    check_data_budget(cfg, loaded.tokenizer)
    return loaded
