"""Real read-only and real full filesystems for tests: a read-only bind mount and a tiny tmpfs.

Root ignores permission bits (`chmod -w` stops nobody in CI, which runs as root), so these are
mounts: the kernel itself answers EROFS or ENOSPC, through every layer (Python, pyarrow, the
Rust inside safetensors). Mounting needs root with CAP_SYS_ADMIN, as on CI and the project's
machines; elsewhere (a developer without root) the tests that use these helpers skip with the
reason, like the GPU tests, and the same code paths stay tested by the tests that make the
lowest layer raise the real OSError. Under CI (`CI` set) a missing capability is a failure,
never a skip. Every mount is unmounted when its `with` block ends.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"mount {' '.join(args)}: {done.stderr.strip()}")


def _cannot_mount(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the real-filesystem tests: {reason}")
    pytest.skip(reason)


@contextmanager
def _mounted(target: Path, *args: str) -> Iterator[Path]:
    if shutil.which("mount") is None or os.geteuid() != 0:
        _cannot_mount("needs root and mount(8) for a real read-only or full filesystem")
    target.mkdir(parents=True, exist_ok=True)
    try:
        _mount(*args, str(target))
    except OSError as exc:
        _cannot_mount(f"cannot mount here (needs CAP_SYS_ADMIN): {exc}")
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


@contextmanager
def read_only_view(source: Path, target: Path) -> Iterator[Path]:
    """`source` seen read-only at `target` (a bind mount remounted read-only)."""
    with _mounted(target, "--bind", str(source)):
        _mount("-o", "remount,bind,ro", str(target))
        yield target


@contextmanager
def tiny_disk(target: Path, size_kib: int) -> Iterator[Path]:
    """A tmpfs of `size_kib` KiB at `target`: writes past its size fail with ENOSPC."""
    with _mounted(target, "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs"):
        yield target


def fill_disk(folder: Path, leave_kib: int = 0) -> Path:
    """Write a file into `folder` until its filesystem is full, then shrink it to leave about
    `leave_kib` KiB free. Returns the filler (delete it to free the space)."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    size, chunk = 0, b"\0" * 4096
    try:
        while True:
            size += os.write(fd, chunk)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    os.truncate(filler, max(0, size - leave_kib * 1024))
    return filler
