"""sparsify: train local, end-to-end and e2e+downstream SAEs on TransformerLens models.

The public API, re-exported lazily so that torch-free modules (`sparsify.metric_names`) can be
imported without importing torch. `train` itself is `sparsify.training.trainer.train`: `sparsify.train` is
the command-line module, which would shadow an attribute of that name once imported.
"""

from __future__ import annotations

import importlib
from typing import Any

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
    "SAETransformer": "sparsify.sae_transformer",
    "TrainResult": "sparsify.training.trainer",
    "build_model": "sparsify.training.trainer",
    "run_dir_for": "sparsify.training.trainer",
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
    # used by `sweep` (general plumbing, not SAE math)
    "train": "sparsify.training.trainer",
    "StrictModel": "sparsify.schema",
    "validate_model": "sparsify.schema",
    "SAFE_NAME": "sparsify.schema",
    "Seed": "sparsify.schema",
    "atomic_write_text": "sparsify.atomic",
    "atomic_write_with": "sparsify.atomic",
    "redact": "sparsify.redaction",
}

__all__ = sorted(_EXPORTS)  # pyright: ignore[reportUnsupportedDunderAll]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sparsify' has no attribute {name!r}")
