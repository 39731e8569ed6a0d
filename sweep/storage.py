"""Where a sweep keeps everything: a local (or shared-filesystem) folder, or a URI that
`pyarrow.fs` resolves (`s3://bucket/prefix`, `gs://...`), as Ray Train and Tune use
(docs/design.md §15).

`SweepStore` is the one object the sweep passes around. Our own files (trial records, run
folders, the recorded search space, the Optuna journal, replicate outcomes, the report, the
activation cache) are written and read with ordinary file I/O in `store.local`:

- a local sweep: `local` is the sweep folder itself, and `push`/`pull` do nothing;
- a sweep on object storage: `local` is this node's mirror of it (`<cache dir>/sweeps/<hash>`,
  the same path on every node), `push` uploads a file or folder written there and `pull`
  downloads what another node (or an earlier driver) wrote. The bucket is the truth: a driver
  on a fresh machine with an empty disk resumes from it alone.

Ray's own state (Tune's experiment, Train's checkpoints) goes straight to the bucket through
`ray_storage` (`RunConfig(storage_path=..., storage_filesystem=...)`).

A reader never sees half an object: every file is uploaded to a temporary key whose name
starts with "." (which every reader skips), then copied to its key in one server-side copy
(S3 CopyObject, GCS rewrite), which makes the object appear whole or not at all; an upload cut
short (a killed process) leaves at most the temporary key. A run folder is complete once its
trial's record exists: the record is pushed after the folder.

Also `check_sweep_storage`: can a sweep write where it is told to? `sweep.run` asks right after
it has resolved the sweep folder, before the model is loaded or Ray starts. Torch-free and
Ray-free.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sparsify import SparsifyError, atomic_write_with, cache_dir, check_writable

MIRRORS_DIR = "sweeps"
"""Under the cache folder (`sparsify.embedded.cache_dir`): one mirror per sweep URI."""


def is_uri(location: str) -> bool:
    """Whether a storage location is a URI (`s3://...`) rather than a local folder."""
    return "://" in location


def child_uri(uri: str, name: str) -> str:
    """`uri` / `name`, keeping a query string last (`s3://b/p?endpoint_override=h:9000`)."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))


@dataclass(frozen=True)
class SweepStore:
    """A sweep's storage: a local folder or a `pyarrow.fs` URI (see the module docstring).

    Picklable by its `uri` alone (Ray sends it to trials and workers); each process opens the
    filesystem itself, with the credentials of its environment (`AWS_*`, an instance role, ...).

    Attributes:
        uri: The sweep folder: a local path, or a URI with a scheme (and, for S3, an optional
            query such as `?endpoint_override=127.0.0.1:9000&scheme=http`).
    """

    uri: str

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri}  # not the opened filesystem

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "uri", state["uri"])

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        """The sweep folder's last path component (the sweep's name)."""
        path = urlsplit(self.uri).path if self.remote else str(Path(self.uri).resolve())
        return PurePosixPath(path.rstrip("/")).name

    @property
    def remote(self) -> bool:
        """Whether the sweep lives on a `pyarrow.fs` URI (object storage) rather than a folder."""
        return is_uri(self.uri)

    @cached_property
    def local(self) -> Path:
        """The folder our files are read and written in: the sweep folder itself, or this
        node's mirror of a remote sweep (`<cache dir>/sweeps/<sha256 of the URI, 16 hex>`)."""
        if not self.remote:
            return Path(self.uri)
        digest = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        return cache_dir() / MIRRORS_DIR / digest

    @cached_property
    def _filesystem(self) -> tuple[Any, str]:
        """(pyarrow FileSystem, the sweep folder's path in it)."""
        import pyarrow.fs

        try:
            fs, path = pyarrow.fs.FileSystem.from_uri(self.uri)
        except (ValueError, OSError) as exc:
            raise SparsifyError(f"cannot open {self.uri}: {_first_line(exc)}") from None
        return fs, path.rstrip("/")

    def remote_path(self, rel: str | os.PathLike[str] = "") -> str:
        """The filesystem path of `rel` (relative to the sweep folder) on the remote storage."""
        base = self._filesystem[1]
        rel = PurePosixPath(os.fspath(rel)).as_posix()
        return base if rel in ("", ".") else f"{base}/{rel}"

    def ray_storage(self, rel: str) -> tuple[str, Any]:
        """`(storage_path, storage_filesystem)` for a Ray `RunConfig` that keeps its state in
        `rel` under the sweep folder (Tune's experiments, Train's checkpoints)."""
        if not self.remote:
            return str(self.local / rel), None
        return self.remote_path(rel), self._filesystem[0]

    # -- writing --------------------------------------------------------------------------

    def write_bytes(self, rel: str | os.PathLike[str], data: bytes) -> Path:
        """Write `rel` atomically in `local` (temp file, then rename), then `push` it.

        Returns:
            The local path.

        Raises:
            StorageError: the local disk refuses the write (full, read-only, ...).
            OSError: the upload failed (the local file is kept).
        """
        path = self.local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))
        self.push(rel)
        return path

    def push(self, rel: str | os.PathLike[str]) -> None:
        """Upload the file `local / rel` to the remote storage as one whole object (nothing
        for a local sweep)."""
        if not self.remote:
            return
        self._put(self.remote_path(rel), (self.local / rel).read_bytes())

    def push_tree(
        self,
        rel: str | os.PathLike[str],
        local_root: Path | None = None,
        only: Collection[Path] | None = None,
    ) -> None:
        """Upload every file under the folder `local / rel` (or `local_root`; with `only`, those
        of its files) whose remote copy is missing or of another size or age, each as one whole
        object (nothing for a local sweep). Names starting with "." (temp files of an
        interrupted write) are skipped."""
        if not self.remote:
            return
        root = self.local / rel if local_root is None else local_root
        remote = self._listing(rel)
        for path in sorted(p for p in root.rglob("*") if p.is_file() and (only is None or p in only)):
            inner = path.relative_to(root)
            if any(part.startswith(".") for part in inner.parts):
                continue
            sub = (PurePosixPath(os.fspath(rel)) / inner.as_posix()).as_posix()
            info = remote.get(sub)
            if info is not None and _same(info, path):
                continue
            self._put(self.remote_path(sub), path.read_bytes())
            _stamp(path, self._info(sub))

    def delete(self, rel: str | os.PathLike[str]) -> None:
        """Remove the file `rel`, locally and on the remote storage; no error when missing."""
        (self.local / rel).unlink(missing_ok=True)
        if self.remote and self._info(rel) is not None:
            self._filesystem[0].delete_file(self.remote_path(rel))

    def _put(self, path: str, data: bytes) -> None:
        """One whole object at `path`: uploaded to a "."-named temp key beside it, then copied
        into place (a rename on a local filesystem)."""
        fs = self._filesystem[0]
        parent, _, name = path.rpartition("/")
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        if fs.type_name == "local":
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        if fs.type_name == "local":
            fs.move(tmp, path)
            return
        fs.copy_file(tmp, path)
        fs.delete_file(tmp)

    # -- reading --------------------------------------------------------------------------

    def pull(self, rel: str | os.PathLike[str]) -> bool:
        """Download the file `rel` into `local` when the remote copy differs (size or age).

        Returns:
            Whether the file now exists locally. A remote file that is gone is removed locally
            too (the storage is the truth); for a local sweep: whether it exists.
        """
        path = self.local / rel
        if not self.remote:
            return path.is_file()
        info = self._info(rel)
        if info is None:
            path.unlink(missing_ok=True)
            return False
        if not _same(info, path):
            self._get(PurePosixPath(os.fspath(rel)).as_posix(), info)
        return True

    def pull_tree(
        self, rel: str | os.PathLike[str], delete: bool = True, local_root: Path | None = None
    ) -> bool:
        """Download every file under the remote folder `rel` that is missing locally (in
        `local / rel`, or `local_root`) or differs; with `delete`, remove local files the
        remote folder does not have.

        Returns:
            Whether the folder now exists locally.
        """
        root = self.local / rel if local_root is None else local_root
        if not self.remote:
            return root.is_dir()
        prefix = PurePosixPath(os.fspath(rel)).as_posix()
        remote = self._listing(rel)
        local_names = {sub: root / sub[len(prefix) + 1 :] for sub in remote}
        for sub, info in remote.items():
            if not _same(info, local_names[sub]):
                self._get(sub, info, local_names[sub])
        if delete and root.is_dir():
            keep = set(local_names.values())
            for path in root.rglob("*"):
                if path.is_file() and path not in keep and not path.name.startswith("."):
                    path.unlink()
        return root.is_dir()

    def probe(self) -> None:
        """Write and delete an empty object under the sweep's prefix.

        Raises:
            OSError: the storage refuses it (no bucket, no credentials, no permission, ...).
        """
        path = self.remote_path(f".write_probe_{uuid.uuid4().hex[:8]}")
        self._put(path, b"")
        self._filesystem[0].delete_file(path)

    def exists(self) -> bool:
        """Whether the sweep folder exists (remote: any object under it)."""
        if not self.remote:
            return self.local.is_dir()
        import pyarrow.fs

        fs = self._filesystem[0]
        selector = pyarrow.fs.FileSelector(self.remote_path(), recursive=False, allow_not_found=True)
        return bool(fs.get_file_info(selector))

    def _info(self, rel: str | os.PathLike[str]) -> Any | None:
        import pyarrow.fs

        info = self._filesystem[0].get_file_info(self.remote_path(rel))
        return info if info.type == pyarrow.fs.FileType.File else None

    def _listing(self, rel: str | os.PathLike[str]) -> dict[str, Any]:
        """The remote files under folder `rel`, by path relative to the sweep folder (names
        starting with "." skipped)."""
        import pyarrow.fs

        fs, base = self._filesystem
        selector = pyarrow.fs.FileSelector(self.remote_path(rel), recursive=True, allow_not_found=True)
        listing = {}
        for info in fs.get_file_info(selector):
            sub = info.path[len(base) + 1 :]
            if info.type == pyarrow.fs.FileType.File and not any(p.startswith(".") for p in sub.split("/")):
                listing[sub] = info
        return listing

    def _get(self, rel: str, info: Any, path: Path | None = None) -> None:
        """Download `rel` atomically into `local` (or `path`) and give it the remote copy's age."""
        path = self.local / rel if path is None else path
        path.parent.mkdir(parents=True, exist_ok=True)
        fs = self._filesystem[0]

        def download(tmp: str) -> None:
            with fs.open_input_stream(self.remote_path(rel)) as source, open(tmp, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)

        atomic_write_with(path, download)
        _stamp(path, info)


def _same(info: Any, path: Path) -> bool:
    """Whether the local file is the remote one as last pulled or pushed: same size, and the
    remote copy's modification time (which `_stamp` gave it)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    return stat.st_size == info.size and info.mtime_ns is not None and stat.st_mtime_ns == info.mtime_ns


def _stamp(path: Path, info: Any) -> None:
    """Give a local file its remote copy's modification time, so `_same` knows it is current."""
    if info is not None and info.mtime_ns is not None:
        os.utime(path, ns=(info.mtime_ns, info.mtime_ns))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def as_store(location: str | os.PathLike[str] | SweepStore) -> SweepStore:
    """A sweep folder given as a `SweepStore`, a local path or a URI, as a `SweepStore`."""
    if isinstance(location, SweepStore):
        return location
    return SweepStore(os.fspath(location))


def nearest_existing(folder: Path) -> Path:
    """`folder` if it exists, else its closest existing parent (where it would be created)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_sweep_storage(store: SweepStore | str | os.PathLike[str], option: str) -> None:
    """Check that a sweep can write its folder, creating nothing: a temp file is made and
    removed in the folder, or in the closest existing parent when the folder is not there yet;
    on object storage, a temp object under the sweep's prefix (and this node's mirror folder).

    A dry run writes nothing and is not checked. A finished sweep on read-only storage can
    still be read: `python -m sweep.report <sweep folder> --out DIR` (or `--out -`).

    Args:
        store: The sweep's storage (`sweep.run.sweep_folder`).
        option: Where the folder came from, for the message: `--storage` or `storage_path`.

    Raises:
        SparsifyError: `<option>: <folder> is not writable (<reason>)`; for a sweep that already
            has trial records, the message adds how to read them without writing there.
    """
    store = as_store(store)
    if store.remote:
        try:
            store.probe()
        except SparsifyError as exc:  # the URI itself (`cannot open ...`)
            raise SparsifyError(f"{option}: {exc}") from None
        except OSError as exc:
            raise SparsifyError(f"{option}: {store.uri} is not writable ({_first_line(exc)})") from None
    folder = nearest_existing(store.local)
    try:
        check_writable(folder)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        hint = ""
        from sweep.records import TRIALS_DIR  # it imports this module

        if (store.local / TRIALS_DIR).is_dir():
            hint = f"; to read its results: python -m sweep.report {store.uri} --out DIR"
        raise SparsifyError(f"{option}: {folder} is not writable ({reason}){hint}") from None
