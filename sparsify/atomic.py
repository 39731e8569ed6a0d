"""Atomic file writes: write a temp file in the same folder, then `os.replace` it into place,
so a crash at any moment leaves either the old file or the new one, never half of one.

A write the storage refuses (full, over quota, read-only, no permission) raises `StorageError`,
one line naming the file: `cannot write <path>: No space left on device`. The old file is
kept and the temp file removed, so the next write starts clean."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from sparsify.errors import StorageError

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})
"""The storage refuses the write: retrying the same write would fail the same way. Other
errors (EIO, ESTALE on a network filesystem, ...) may pass and are raised unchanged."""


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
"""How a Rust `io::Error` shows its errno, e.g. inside safetensors' SafetensorError."""


def error_number(exc: BaseException) -> int | None:
    """The errno behind an exception: an OSError's, or one a library's own exception type
    reports in its message (safetensors says `(os error 28)`) or raised it `from`."""
    seen: BaseException | None = exc
    for _ in range(5):  # the exception, its cause, its cause's cause, ...
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        match = _RUST_OS_ERROR.search(str(seen))
        if match:
            return int(match.group(1))
        seen = seen.__cause__
    return None


def storage_error(exc: BaseException, path: str | os.PathLike[str]) -> StorageError | None:
    """The `StorageError` naming `path` that `exc` (raised while writing it) stands for, or None
    when `exc` is not the storage refusing a write (see `STORAGE_ERRNOS`)."""
    code = error_number(exc)
    if code not in STORAGE_ERRNOS:
        return None
    assert code is not None
    return StorageError(code, os.strerror(code), str(path))


def _refused(exc: OSError, path: str | os.PathLike[str]) -> OSError:
    """What to raise for `exc`: its StorageError naming `path`, or `exc` itself."""
    return storage_error(exc, path) or exc


def check_writable(folder: Path) -> None:
    """Create, write and remove a dot-named temp file in `folder` (which must exist).

    Raises:
        StorageError: `folder` is read-only, full, or not ours to write (its `filename` is
            `folder`).
        OSError: for another reason it cannot hold a file (e.g. it is not a folder).
    """
    probe: str | None = None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        try:
            os.write(fd, b"\0")  # a full disk may still create an empty file
        finally:
            os.close(fd)
    except OSError as exc:
        raise _refused(exc, folder) from None
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                os.unlink(probe)


def make_folders(folder: Path) -> None:
    """`folder.mkdir(parents=True, exist_ok=True)`, raising `StorageError` naming `folder` when
    the storage refuses it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _refused(exc, folder) from None


def atomic_write_with(path: Path, writer: Callable[[str], object]) -> None:
    """Call `writer(tmp_path)` to write a temp file, then move it to `path`.

    Raises:
        StorageError: the storage refused the write (full, read-only, ...); `path` is unchanged.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the suffix keeps writers that look at extensions (torch.save's zip writer) happy
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
        writer(tmp)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())  # the data is on disk before the name points at it
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; results are for sharing
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        error = storage_error(exc, path) if isinstance(exc, Exception) else None
        if error is None:
            raise
        raise error from exc


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_with(path, lambda tmp: Path(tmp).write_text(text))
