"""Stored trial records -> one results table (docs/design.md §7, §8).

Every trial of a sweep, finished or not, leaves one JSON record at
`<sweep_dir>/trials/<arm>/<trial_id>.json` (format and writing: `sweep.records`).
`load_records` reads them whole (with per-sequence values and replicates); `load_results`
turns them into one pandas DataFrame, one row per trial; `finished` keeps the rows a frontier
may be built from. Torch-free and Ray-free on purpose.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sparsify.metric_names import DEFAULT_OBJECTIVES
from sweep.records import FINISHED, TRIALS_DIR, SweepDir, TrialRecord, load_record_json
from sweep.storage import as_store

logger = logging.getLogger(__name__)

PARAM_PREFIX = "param:"
FIXED_COLUMNS = ("arm", "trial_id", "status", "error", "wall_time_s", "n_seeds")
RECORD_COLUMNS = FIXED_COLUMNS[:-1]
"""The fixed columns that are record fields; `n_seeds` is the number of trainings of the point
(`len(replicates)`, 1 for a record without replicates)."""


def _read_record(path: Path) -> TrialRecord | None:
    """One record, or None (with a warning) when it cannot be used: the same check as
    `sweep.records.read_trial_record` (`TrialRecord.from_json`)."""
    data = load_record_json(path)
    if data is None:
        return None
    # the path is built from arm and trial_id, so it is the fallback for both
    data = {"arm": path.parent.name, "trial_id": path.stem, **data}
    try:
        return TrialRecord.from_json(data)
    except ValueError as exc:
        logger.warning("skipping trial record %s: %s", path, exc)
        return None


def _row(record: TrialRecord) -> dict[str, Any]:
    """One record as a flat table row."""
    row: dict[str, Any] = {**record.metrics, **{f"{PARAM_PREFIX}{k}": v for k, v in record.params.items()}}
    # the fixed fields last, so no metric key can shadow them
    row.update({column: getattr(record, column) for column in RECORD_COLUMNS})
    row["n_seeds"] = len(record.replicates) or 1
    return row


def load_records(sweep_dir: SweepDir) -> list[TrialRecord]:
    """Every usable stored trial record of a sweep, whole (with `eval_per_sequence` and
    `replicates`), sorted by arm then trial_id. On object storage, the records are fetched into
    the local mirror first (only those that changed).

    The same files as `load_results`: names starting with "." (temp files of an interrupted
    write) are ignored; unreadable or corrupt records are skipped with a logged warning.

    Raises:
        FileNotFoundError: If `sweep_dir` does not exist or is not a folder.
    """
    store = as_store(sweep_dir)
    if not store.exists():
        raise FileNotFoundError(f"sweep folder not found: {store}")
    store.pull_tree(TRIALS_DIR)
    sweep_dir = store.local
    records = []
    for path in sorted((sweep_dir / TRIALS_DIR).glob("*/*.json")):
        if path.name.startswith(".") or not path.is_file():
            continue
        record = _read_record(path)
        if record is not None:
            records.append(record)
    return sorted(records, key=lambda r: (r.arm, r.trial_id))


def load_results(sweep_dir: SweepDir) -> pd.DataFrame:
    """Read every stored trial record of a sweep into one table (records: `load_records`).

    Files whose names start with "." (temp files of an interrupted write) are ignored;
    unreadable or corrupt records are skipped with a logged warning.

    Args:
        sweep_dir: The sweep's folder (holding `trials/<arm>/<trial_id>.json`).

    Returns:
        One row per trial, sorted by arm then trial_id. Columns: `arm`, `trial_id`,
        `status`, `error`, `wall_time_s`, `n_seeds` (trainings of the point: its replicates,
        or 1), then each metric key as stored (e.g. "eval/L0", "eval_se/L0"), then each
        searched parameter as "param:<dotted path>". Metrics or params a trial did not record
        are NaN. A sweep without records gives an empty table that still has the fixed columns.

    Raises:
        FileNotFoundError: If `sweep_dir` does not exist or is not a folder.
    """
    return results_table(load_records(sweep_dir))


def results_table(records: Sequence[TrialRecord]) -> pd.DataFrame:
    """`load_results` on records already read (`load_records`): one row per record, the columns
    `load_results` describes."""
    rows = [_row(record) for record in records]
    if not rows:
        return pd.DataFrame(columns=list(FIXED_COLUMNS))
    df = pd.DataFrame(rows)
    extra = [c for c in df.columns if c not in FIXED_COLUMNS]
    metric_cols = sorted(c for c in extra if not c.startswith(PARAM_PREFIX))
    param_cols = sorted(c for c in extra if c.startswith(PARAM_PREFIX))
    df = df[list(FIXED_COLUMNS) + metric_cols + param_cols]
    df["wall_time_s"] = pd.to_numeric(df["wall_time_s"], errors="coerce")
    return df.sort_values(["arm", "trial_id"], kind="stable").reset_index(drop=True)


def finished(df: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES) -> pd.DataFrame:
    """The trials a frontier may be built from (docs/design.md §8, §9: stopped trials carry
    half-trained values and are left out).

    Args:
        df: A table from `load_results`.
        objectives: Metric columns that must be finite; by default eval L0 and eval CE-loss
            increase.

    Returns:
        The rows with status "finished" whose objective values are all finite numbers. A
        missing objective column means no row qualifies.
    """
    keep = df["status"] == FINISHED
    for column in objectives:
        if column not in df.columns:
            return df.iloc[0:0]
        values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float)
        keep &= np.isfinite(values)
    return df[keep]
