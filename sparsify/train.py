"""`python -m sparsify.train config.yaml`: train SAEs from one config file, no Ray needed.

A config in the reference e2e SAE library's format (`tlens_model_name` ...) is read as it is
(`sparsify.compat`). Writes the SAE weights (safetensors), the resolved config and the final metrics into the run
folder and prints the folder and the headline metrics. User mistakes print `error: ...` and
exit 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sparsify.compat import is_reference_config, load_reference_config
from sparsify.config import read_yaml, validate_config
from sparsify.errors import DivergedError, SparsifyError
from sparsify.redact import redact
from sparsify.tracking import load_env_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsify.train", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("config", help="training config YAML")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    load_env_file()  # W&B credentials, if a .env is here
    try:
        raw = read_yaml(args.config)
        from sparsify.model_loading import quiet_library_progress_bars
        from sparsify.trainer import train

        quiet_library_progress_bars()
        if is_reference_config(raw):
            cfg, tlens_model = load_reference_config(args.config)
            result = train(cfg, tlens_model=tlens_model)
        else:
            result = train(validate_config(raw, args.config))
    except SparsifyError as exc:
        if args.debug:
            raise
        message = str(exc)
        if not message.startswith(args.config):
            message = f"{args.config}: {message}"  # errors found after loading name the file too
        print(f"error: {redact(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the run folder keeps its last checkpoint", file=sys.stderr)
        return 130
    except DivergedError as exc:
        print(
            f"error: training diverged: {redact(str(exc))} (try a lower lr or max_grad_norm)", file=sys.stderr
        )
        return 1
    headline = {k: v for k, v in result.metrics.items() if k.startswith("eval/") and "/blocks" not in k}
    print(json.dumps(headline, indent=2, sort_keys=True))
    if result.run_dir is not None:
        print(f"run folder: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
