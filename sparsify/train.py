"""`python -m sparsify.train config.yaml`: train SAEs from one config file, no Ray needed.

A config in the reference e2e SAE library's format (`tlens_model_name` ...) is read as it is
(`sparsify.compat`). Writes the SAE weights (safetensors), the resolved config and the final
metrics into the run folder and prints the folder and the headline metrics. User mistakes print
`error: ...` and exit 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from sparsify.cli import run_config_command
from sparsify.compat import is_reference_config, load_reference_config
from sparsify.config import read_yaml, validate_config
from sparsify.tracking import load_env_file

if TYPE_CHECKING:
    from sparsify.trainer import TrainResult


def main(argv: list[str] | None = None) -> int:
    load_env_file()  # W&B credentials, if a .env is here
    return run_config_command(
        "python -m sparsify.train",
        (__doc__ or "").splitlines()[0],
        "training config YAML (ours, or the reference library's)",
        _train,
        argv,
        headline=lambda m: {k: v for k, v in m.items() if k.startswith("eval/") and "/blocks" not in k},
    )


def _train(config: str) -> TrainResult:
    from sparsify.model_loading import quiet_library_progress_bars
    from sparsify.trainer import train

    raw = read_yaml(config)
    quiet_library_progress_bars()
    if is_reference_config(raw):
        cfg, tlens_model = load_reference_config(config)
        return train(cfg, tlens_model=tlens_model)
    return train(validate_config(raw, config))


if __name__ == "__main__":
    sys.exit(main())
