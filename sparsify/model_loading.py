"""Load a language model as a TransformerLens 4 `TransformerBridge` (docs/design.md §9).

Three sources: the embedded default (`embedded:SmolLM2-135M-Instruct`), a local Hugging Face
model folder, or a Hugging Face hub name (needs network access).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sparsify.config import EMBEDDED_MODEL_NAME
from sparsify.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda if available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no GPU; use auto or cpu")
    return torch.device(device)


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The `autocast` config field for a device: `auto` is bfloat16 on cuda, off elsewhere."""
    if setting == "bfloat16" or (setting == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def model_source(model_name: str) -> str:
    """Where a model name points: a local folder, or a hub name (the embedded default resolved)."""
    if model_name == EMBEDDED_MODEL_NAME:
        from sparsify.embedded import embedded_model_dir

        return str(embedded_model_dir())
    if model_name.startswith("embedded:"):
        raise ConfigError(
            f"model_name: unknown embedded model {model_name!r}; allowed: {EMBEDDED_MODEL_NAME}"
        )
    return model_name


def bridge_from_hf(hf_model: Any, tokenizer: Any, name: str, device: torch.device) -> Any:
    """Wrap a loaded Hugging Face causal LM and tokenizer in a frozen TransformerBridge."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, device=device)
    bridge.eval()
    bridge.requires_grad_(False)
    return bridge


def load_tlens_model(model_name: str, device: torch.device, dtype: str = "float32") -> Any:
    """Load `model_name` as a frozen TransformerBridge on `device`.

    Args:
        model_name: `embedded:SmolLM2-135M-Instruct`, a local model folder, or a hub name.
        device: where the model lives.
        dtype: `float32` or `bfloat16`.

    Raises:
        ConfigError: a local folder that does not hold a model, or a hub model that cannot be
            fetched (one line, with the underlying reason).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_name)
    source = model_source(model_name)
    with _model_load_errors(model_name, source):
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype])
    return bridge_from_hf(hf_model, tokenizer, source, device)


def load_tokenizer(model_name: str) -> Any:
    """The tokenizer of `model_name` (embedded default, local folder or hub name).

    Raises:
        ConfigError: the model cannot be found or read (one line, with the reason).
    """
    from transformers import AutoTokenizer

    source = model_source(model_name)
    with _model_load_errors(model_name, source):
        # add_bos_token stops TransformerLens from re-fetching the tokenizer by name
        return AutoTokenizer.from_pretrained(source, add_bos_token=True)


@contextlib.contextmanager
def _model_load_errors(model_name: str, source: str) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError) as exc:  # missing files, no network, not a model folder
        kind = "local folder" if Path(source).is_dir() else "hub model"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model_name: cannot load {kind} {model_name!r}: {first}") from None


def quiet_library_progress_bars() -> None:
    """Turn off transformers' and datasets' per-file progress bars (entry points and Ray
    workers call this; our own progress bar counts tokens)."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
