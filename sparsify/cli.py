"""The shared shape of our `python -m ... config.yaml` commands: one config file in, a run
folder and its headline metrics out; a user mistake is one `error: <file>: ...` line (exit 2),
a diverged run one line (exit 1), Ctrl-C one line (exit 130); `--debug` shows tracebacks."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sparsify.errors import DivergedError, SparsifyError
from sparsify.redact import redact


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
