"""Keep secrets out of everything we print or write (docs/design.md §11): the values of
secret-looking environment variables (WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...) and
anything shaped like a W&B API key are replaced by `***`."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
"""Environment variables whose values are treated as secrets."""
MIN_SECRET_LENGTH = 8
"""Shorter values (flags such as `1`, `true`) are not secrets and would match everywhere."""
WANDB_KEY_SHAPE = re.compile(r"\b[0-9a-f]{40}\b")
"""A W&B API key is 40 hex characters; one pasted into a YAML file is caught by its shape."""
MASK = "***"


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-looking variables in `environ` (default: this process's), longest
    first so a secret containing another is masked whole."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`text` with every secret value and W&B-key-shaped string replaced by `***`."""
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    return WANDB_KEY_SHAPE.sub(MASK, text)
