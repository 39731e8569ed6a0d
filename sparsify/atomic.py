"""Atomic file writes: write a temp file in the same folder, then `os.replace` it into place,
so a crash at any moment leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write_with(path: Path, writer: Callable[[str], object]) -> None:
    """Call `writer(tmp_path)` to write a temp file, then move it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # the suffix keeps writers that look at extensions (torch.save's zip writer) happy
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())  # the data is on disk before the name points at it
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_with(path, lambda tmp: Path(tmp).write_text(text))
