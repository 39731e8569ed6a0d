"""Our `python -m ... config.yaml` commands: the shared runner (one config file in, a run folder
and its headline metrics out; a user mistake is one `error: <file>: ...` line (exit 2), a
diverged run one line (exit 1), Ctrl-C one line (exit 130); `--debug` shows tracebacks) and
the SAE training command, `python -m sparsify.train config.yaml` (`train_main`).

A config in the reference e2e SAE library's format (`tlens_model_name` ...) is read as it is
(`sparsify.compat`). The command writes the SAE weights (safetensors), the resolved config and
the final metrics into the run folder and prints the folder and the headline eval metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sparsify.errors import DivergedError, SparsifyError
from sparsify.redaction import redact

if TYPE_CHECKING:
    from sparsify.training.trainer import TrainResult


class RunResult(Protocol):
    run_dir: Path | None
    metrics: dict[str, float]


def run_config_command(
    prog: str,
    description: str,
    config_help: str,
    run: Callable[[str], RunResult],
    argv: list[str] | None = None,
    headline: Callable[[dict[str, float]], dict[str, Any]] = lambda metrics: metrics,
    interrupted: str = "the run folder keeps its last checkpoint",
) -> int:
    """Parse `config [--debug]`, call `run(config_path)`, print `headline(metrics)` as JSON and
    the run folder. Returns the exit code (0, 1 diverged, 2 user mistake, 130 interrupted)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help=config_help)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run(args.config)
    except SparsifyError as exc:
        if args.debug:
            raise
        message = str(exc)
        if not message.startswith(args.config):
            message = f"{args.config}: {message}"  # errors found after loading name the file too
        print(f"error: {redact(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    except DivergedError as exc:
        print(
            f"error: training diverged: {redact(str(exc))} (try a lower lr or max_grad_norm)", file=sys.stderr
        )
        return 1
    print(json.dumps(headline(result.metrics), indent=2, sort_keys=True))
    if result.run_dir is not None:
        print(f"run folder: {result.run_dir}")
    return 0


def train_main(argv: list[str] | None = None) -> int:
    """`python -m sparsify.train config.yaml [--debug]`; returns the exit code."""
    from sparsify.training.tracking import load_env_file

    load_env_file()  # W&B credentials, if a .env is here
    return run_config_command(
        "python -m sparsify.train",
        "python -m sparsify.train config.yaml: train SAEs from one config file, no Ray needed",
        "training config YAML (ours, or the reference library's)",
        _train_from_file,
        argv,
        headline=lambda m: {k: v for k, v in m.items() if k.startswith("eval/") and "/blocks" not in k},
    )


def _train_from_file(config: str) -> TrainResult:
    from sparsify.compat import is_reference_config, load_reference_config
    from sparsify.config import validate_config
    from sparsify.model_loading import quiet_library_progress_bars
    from sparsify.schema import read_yaml
    from sparsify.training.trainer import train

    raw = read_yaml(config)
    quiet_library_progress_bars()
    if is_reference_config(raw):
        cfg, tlens_model = load_reference_config(config)
        return train(cfg, tlens_model=tlens_model)
    return train(validate_config(raw, config))
