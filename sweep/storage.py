"""Can a sweep write where it is told to? `sweep.run` asks right after it has resolved the sweep
folder, before the model is loaded or Ray starts: read-only storage (or a full disk, or a folder
that is not ours) is one line naming the folder, not a traceback minutes later.

A dry run writes nothing and is not checked. A finished sweep on read-only storage can still be
read: `python -m sweep.report <sweep folder> --out DIR` (or `--out -`). Torch-free and Ray-free.
"""

from __future__ import annotations

from pathlib import Path

from sparsify import SparsifyError, check_writable
from sweep.records import TRIALS_DIR


def nearest_existing(folder: Path) -> Path:
    """`folder` if it exists, else its closest existing parent (where it would be created)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_sweep_storage(sweep_dir: Path, option: str) -> None:
    """Check that a sweep can write its folder, creating nothing: a temp file is made and
    removed in the folder, or in the closest existing parent when the folder is not there yet.

    Args:
        sweep_dir: The sweep's folder (`sweep.run.sweep_folder`).
        option: Where the folder came from, for the message: `--storage` or `storage_path`.

    Raises:
        SparsifyError: `<option>: <folder> is not writable (<reason>)`; for a sweep that already
            has trial records, the message adds how to read them without writing there.
    """
    folder = nearest_existing(sweep_dir)
    try:
        check_writable(folder)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        hint = ""
        if (sweep_dir / TRIALS_DIR).is_dir():
            hint = f"; to read its results: python -m sweep.report {sweep_dir} --out DIR"
        raise SparsifyError(f"{option}: {folder} is not writable ({reason}){hint}") from None
