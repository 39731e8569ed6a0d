"""sparsify: train local, end-to-end and e2e+downstream SAEs on TransformerLens models.

The public API, re-exported lazily so that torch-free modules (`sparsify.metric_names`, and
`atomic_write_text` or `redact` from here) can be imported without importing torch. `train` is
`sparsify.training.trainer.train`; `python -m sparsify.train` is the training command
(`sparsify.cli.train_main`). The layout: docs/design.md §1.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TrainConfig": "sparsify.config",
    "LossConfig": "sparsify.config",
    "SAEsConfig": "sparsify.config",
    "DataConfig": "sparsify.config",
    "load_config": "sparsify.config",
    "validate_config": "sparsify.config",
    "read_yaml": "sparsify.schema",
    "EMBEDDED_MODEL_NAME": "sparsify.config",
    "SAE": "sparsify.sae",
    "SparseAutoencoder": "sparsify.architectures",
    "ARCHITECTURES": "sparsify.architectures",
    "sae_factory": "sparsify.architectures",
    "SAETransformer": "sparsify.sae_transformer",
    "TrainResult": "sparsify.training.trainer",
    "build_model": "sparsify.training.build",
    "run_dir_for": "sparsify.training.build",
    "load_tlens_model": "sparsify.model_loading",
    "quiet_library_progress_bars": "sparsify.model_loading",
    "prepare": "sparsify.prefetch",
    "load_env_file": "sparsify.training.tracking",
    "export_saelens": "sparsify.export",
    "ENV_FILE": "sparsify.training.tracking",
    "load_tokenizer": "sparsify.model_loading",
    "SparsifyError": "sparsify.errors",
    "ConfigError": "sparsify.errors",
    "DataError": "sparsify.errors",
    "DataUnavailableError": "sparsify.errors",
    "HookNameError": "sparsify.errors",
    "MissingPackageError": "sparsify.errors",
    "DivergedError": "sparsify.errors",
    "StorageError": "sparsify.errors",
    # used by `sweep` (general plumbing, not SAE math)
    "train": "sparsify.training.trainer",
    "StrictModel": "sparsify.schema",
    "validate_model": "sparsify.schema",
    "SAFE_NAME": "sparsify.schema",
    "Seed": "sparsify.schema",
    "atomic_write_text": "sparsify.atomic",
    "atomic_write_with": "sparsify.atomic",
    "check_writable": "sparsify.atomic",
    "make_folders": "sparsify.atomic",
    "redact": "sparsify.redaction",
    "standard_error": "sparsify.metrics",
    "cache_dir": "sparsify.embedded",
    "activations_dir": "sparsify.training.activation_cache",
}

if TYPE_CHECKING:  # what type checkers see (and `train` is the function, not the `-m` module)
    from sparsify.architectures import ARCHITECTURES, SparseAutoencoder, sae_factory
    from sparsify.atomic import atomic_write_text, atomic_write_with, check_writable, make_folders
    from sparsify.config import (
        EMBEDDED_MODEL_NAME,
        DataConfig,
        LossConfig,
        SAEsConfig,
        TrainConfig,
        load_config,
        validate_config,
    )
    from sparsify.embedded import cache_dir
    from sparsify.errors import (
        ConfigError,
        DataError,
        DataUnavailableError,
        DivergedError,
        HookNameError,
        MissingPackageError,
        SparsifyError,
        StorageError,
    )
    from sparsify.export import export_saelens
    from sparsify.metrics import standard_error
    from sparsify.model_loading import load_tlens_model, load_tokenizer, quiet_library_progress_bars
    from sparsify.prefetch import prepare
    from sparsify.redaction import redact
    from sparsify.sae import SAE
    from sparsify.sae_transformer import SAETransformer
    from sparsify.schema import SAFE_NAME, Seed, StrictModel, read_yaml, validate_model
    from sparsify.training.activation_cache import activations_dir
    from sparsify.training.build import build_model, run_dir_for
    from sparsify.training.tracking import ENV_FILE, load_env_file
    from sparsify.training.trainer import TrainResult, train

__all__ = sorted(_EXPORTS)  # pyright: ignore[reportUnsupportedDunderAll]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sparsify' has no attribute {name!r}")
