"""Trial records (docs/design.md §7, §8): one JSON file per trial, written when the trial ends.

Every trial of a sweep, finished or not, leaves one record at
`<sweep_dir>/trials/<arm>/<trial_id>.json`::

    {"arm": "local", "trial_id": "local_00003",
     "status": "finished" | "diverged" | "stopped" | "error" | "interrupted",
     "params": {"loss.sparsity.coeff": 0.5, ...},
     "metrics": {"eval/L0": 12.3, "eval_se/L0": 0.4, "eval/ce_loss_increase": 0.21, ...},
     "error": null | "one line", "wall_time_s": 123.4,
     "eval_per_sequence": {"eval/L0": [12.1, 12.9, ...], "eval/ce_loss_increase": [...],
                           "eval/kl": [...]},
     "replicates": [{"seed": 0, "metrics": {...}, "eval_per_sequence": {...}, "wall_time_s": 61.2},
                    {"seed": 1, ...}],
     "init_from": {"arm": "local", "trial": "local_00001"}}

`eval_per_sequence` (a finished trial's final eval, one value per eval sequence) and `replicates`
(one entry per seed of a `seeds: N` search space, N > 1; docs/design.md §7, §11) are optional:
written only when not empty, read as empty when missing (records written before them). With
replicates, `metrics` holds their means and `eval_se/<name>` the standard error across seeds,
and `eval_per_sequence` is empty (each replicate has its own). `init_from` (optional too) is
the source trial a fine-tune arm's trial started from (`sweep.init_from`): its arm and its
`trial_id`, in every record of such a trial whatever its status.

Finished and diverged trials write their own (`sweep.trial`); errored, early-stopped and
interrupted ones are written by the sweep's Tune callback the moment Tune ends them
(`sweep.tuner`). An `interrupted` record is the only one that is not final: the trial resumes
from its checkpoint when the sweep is rerun, and its next end replaces the record. This module
is the one place the statuses are spelled. Torch-free and Ray-free on purpose.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from sparsify import redact
from sweep.storage import SweepStore, as_store

logger = logging.getLogger(__name__)

Status = Literal["finished", "diverged", "stopped", "error", "interrupted"]
FINISHED: Status = "finished"
"""Trained to the end: the only status a frontier may use."""
DIVERGED: Status = "diverged"
"""Its loss became NaN/inf (never retried: it would diverge again)."""
STOPPED: Status = "stopped"
"""Stopped early by the scheduler (ASHA): its metrics are half-trained."""
ERROR: Status = "error"
"""Failed for another reason; `error` holds the last line of the message."""
INTERRUPTED: Status = "interrupted"
"""Was running when the sweep was stopped (Ctrl-C): its metrics are its last, half-trained eval.
Not an outcome: rerunning the sweep trains it again from its last checkpoint, and the record of
how it then ends replaces this one."""
STATUSES: tuple[Status, ...] = get_args(Status)
"""The statuses a trial record may carry, in the order reports list them."""

ENDED_STATUSES: tuple[Status, ...] = tuple(s for s in STATUSES if s != INTERRUPTED)
"""The statuses of trials that ended: their records are final (never replaced)."""

STOPPED_BY_ASHA = "stopped early by ASHA"
"""The `error` of a record with status `stopped`."""
INTERRUPTED_BY_USER = "the sweep was interrupted while this trial ran; rerunning the sweep resumes it"
"""The `error` of a record with status `interrupted`."""
TRIALS_DIR = "trials"
OPTIONAL_KEYS = ("eval_per_sequence", "replicates", "init_from")
"""Keys written only when not empty (so a record without them is the JSON it always was)."""
RECORD_KEYS = ("arm", "trial_id", "status", "params", "metrics", "error", "wall_time_s", *OPTIONAL_KEYS)
REQUIRED_KEYS = ("arm", "trial_id", "status")
REPLICATE_KEYS = ("seed", "metrics", "eval_per_sequence", "wall_time_s")
"""The keys of one entry of `replicates` (`seed` and `metrics` required)."""


@dataclass(frozen=True)
class TrialRecord:
    """One trial's outcome, as stored (see the module docstring for the JSON).

    Attributes:
        arm: The arm (SAE type) of the trial, e.g. "local" or "e2e".
        trial_id: The trial's id, e.g. "local_00003".
        status: How the trial ended.
        params: The searched parameters, by dotted training-config path.
        metrics: The trial's metrics by name (eval/... and others); empty for an errored trial.
        error: One line saying why a trial did not finish; None for a finished one.
        wall_time_s: The trial's training time; None when not measured (stopped, errored).
        eval_per_sequence: The final eval's value of each eval sequence for `eval/L0`,
            `eval/ce_loss_increase` and `eval/kl` (`TrainResult.eval_per_sequence`); empty when
            not recorded (an older record, an unfinished trial, or one with replicates).
        replicates: With `seeds: N` (N > 1), one entry per training of the point:
            `{"seed": int, "metrics": {...}, "eval_per_sequence": {...}, "wall_time_s": float}`,
            `seed` being the training config's seed of that replicate; empty otherwise.
        init_from: A fine-tune trial's source (`{"arm": str, "trial": str}`, the source's arm
            and `trial_id`); None for a trial of an arm without `init_from`.
    """

    arm: str
    trial_id: str
    status: Status
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    wall_time_s: float | None = None
    eval_per_sequence: dict[str, list[float]] = field(default_factory=dict)
    replicates: list[dict[str, Any]] = field(default_factory=list)
    init_from: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as the JSON object stored on disk (every key present but the empty
        `OPTIONAL_KEYS`)."""
        return {
            key: getattr(self, key) for key in RECORD_KEYS if key not in OPTIONAL_KEYS or getattr(self, key)
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrialRecord:
        """A record from its JSON object; keys other than the three required ones may be missing
        (a null or missing `params`/`metrics` reads as empty).

        Raises:
            ValueError: If a required key is missing, a key is unknown, or a value has the
                wrong type (e.g. a status not in `STATUSES`).
        """
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise ValueError(f"trial record is missing {', '.join(missing)}")
        unknown = sorted(set(data) - set(RECORD_KEYS))
        if unknown:
            raise ValueError(f"trial record has unknown keys {', '.join(unknown)}")
        status = data["status"]
        if status not in STATUSES:
            raise ValueError(f"trial record status must be one of {', '.join(STATUSES)} (got {status!r})")
        for key in ("arm", "trial_id"):
            if not isinstance(data[key], str):
                raise ValueError(f"trial record {key} must be a string (got {data[key]!r})")
        params, metrics = data.get("params") or {}, data.get("metrics") or {}
        if not isinstance(params, dict) or not isinstance(metrics, dict):
            raise ValueError("trial record 'metrics' and 'params' must be objects")
        error, wall_time_s = data.get("error"), data.get("wall_time_s")
        if error is not None and not isinstance(error, str):
            raise ValueError(f"trial record error must be a string or null (got {error!r})")
        if wall_time_s is not None and not _is_number(wall_time_s):
            raise ValueError(f"trial record wall_time_s must be a number or null (got {wall_time_s!r})")
        per_sequence = _per_sequence(data.get("eval_per_sequence"), "trial record eval_per_sequence")
        replicates = data.get("replicates") or []
        if not isinstance(replicates, list):
            raise ValueError(f"trial record replicates must be a list (got {replicates!r})")
        return cls(
            arm=data["arm"], trial_id=data["trial_id"], status=status, params=dict(params),
            metrics=dict(metrics), error=error, wall_time_s=wall_time_s, eval_per_sequence=per_sequence,
            replicates=[_replicate(entry, i) for i, entry in enumerate(replicates)],
            init_from=_init_from(data.get("init_from")),
        )  # fmt: skip


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)  # bool is an int


def _per_sequence(value: Any, what: str) -> dict[str, list[float]]:
    """A checked copy of an `eval_per_sequence` object (null reads as empty)."""
    value = value or {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object of number lists (got {value!r})")
    for name, values in value.items():
        if not isinstance(values, list) or not all(_is_number(v) for v in values):
            raise ValueError(f"{what} {name!r} must be a list of numbers")
    return {name: list(values) for name, values in value.items()}


def _init_from(value: Any) -> dict[str, str] | None:
    """A checked copy of a record's `init_from` (null reads as None)."""
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or set(value) != {"arm", "trial"}
        or not all(isinstance(v, str) for v in value.values())
    ):
        raise ValueError(f'trial record init_from must be {{"arm": str, "trial": str}} (got {value!r})')
    return {"arm": value["arm"], "trial": value["trial"]}


def _replicate(entry: Any, index: int) -> dict[str, Any]:
    """A checked replicate entry, every key of `REPLICATE_KEYS` present."""
    what = f"trial record replicates[{index}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{what} must be an object (got {entry!r})")
    unknown = sorted(set(entry) - set(REPLICATE_KEYS))
    if unknown:
        raise ValueError(f"{what} has unknown keys {', '.join(unknown)}")
    seed, metrics, wall_time_s = entry.get("seed"), entry.get("metrics"), entry.get("wall_time_s")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{what} seed must be an integer (got {seed!r})")
    if not isinstance(metrics, dict):
        raise ValueError(f"{what} metrics must be an object (got {metrics!r})")
    if wall_time_s is not None and not _is_number(wall_time_s):
        raise ValueError(f"{what} wall_time_s must be a number or null (got {wall_time_s!r})")
    per_sequence = _per_sequence(entry.get("eval_per_sequence"), f"{what} eval_per_sequence")
    return {
        "seed": seed,
        "metrics": dict(metrics),
        "eval_per_sequence": per_sequence,
        "wall_time_s": wall_time_s,
    }


SweepDir = str | os.PathLike[str] | SweepStore
"""A sweep folder: a local path, or its `sweep.storage.SweepStore` (local or on object storage)."""


def trial_record_rel(arm: str, trial_id: str) -> str:
    """A trial record's path relative to the sweep folder: `trials/<arm>/<trial_id>.json`.

    Raises:
        ValueError: If `arm` or `trial_id` is empty, contains a path separator or starts
            with "." (such names would escape the folder or look like temp files).
    """
    for what, name in (("arm", arm), ("trial_id", trial_id)):
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"{what} must be a plain name without '/' or a leading '.' (got {name!r})")
    return f"{TRIALS_DIR}/{arm}/{trial_id}.json"


def trial_record_path(sweep_dir: SweepDir, arm: str, trial_id: str) -> Path:
    """The one place a trial record's local path is built (in a remote sweep's local mirror).

    Args:
        sweep_dir: The sweep's folder or store.
        arm: The arm (SAE type) the trial belongs to, e.g. "local" or "e2e".
        trial_id: The trial's id, e.g. "local_00003".

    Returns:
        `<sweep_dir>/trials/<arm>/<trial_id>.json`.

    Raises:
        ValueError: If `arm` or `trial_id` is empty, contains a path separator or starts
            with "." (such names would escape the folder or look like temp files).
    """
    return as_store(sweep_dir).local / trial_record_rel(arm, trial_id)


def write_trial_record(sweep_dir: SweepDir, record: TrialRecord | Mapping[str, Any]) -> Path:
    """Write one trial record atomically (temp file in the same folder, then `os.replace`; on
    object storage, then one whole object: `SweepStore.write_bytes`).

    A crash mid-write leaves at most a temp file (or temp object) whose name starts with ".",
    which `sweep.results.load_results` ignores; a reader never sees half a record.

    Args:
        sweep_dir: The sweep's folder or store.
        record: The record, or its JSON object (checked with `TrialRecord.from_json`).

    Returns:
        The record's path, from `trial_record_path`.

    Raises:
        ValueError: If the record is not valid (see `TrialRecord.from_json`) or its names are
            not plain names.
    """
    if not isinstance(record, TrialRecord):
        record = TrialRecord.from_json(record)
    # error messages may quote user input or exceptions: no secret reaches the sweep folder
    text = redact(json.dumps(record.to_json(), indent=2, sort_keys=True)) + "\n"
    return as_store(sweep_dir).write_bytes(trial_record_rel(record.arm, record.trial_id), text.encode())


def read_trial_record(sweep_dir: SweepDir, arm: str, trial_id: str) -> TrialRecord | None:
    """One trial's stored record, or None when it has none (or an unusable one, with a warning).

    Raises:
        ValueError: If `arm` or `trial_id` is not a plain name (see `trial_record_path`).
    """
    path = _pulled_record(sweep_dir, arm, trial_id)
    data = load_record_json(path)
    if data is None:
        return None
    try:
        return TrialRecord.from_json(data)
    except ValueError as exc:
        logger.warning("skipping trial record %s: %s", path, exc)
        return None


def _pulled_record(sweep_dir: SweepDir, arm: str, trial_id: str) -> Path:
    """The record's local path, after fetching the current one from object storage."""
    store = as_store(sweep_dir)
    store.pull(trial_record_rel(arm, trial_id))
    return trial_record_path(store, arm, trial_id)


def has_trial_record(sweep_dir: SweepDir, arm: str, trial_id: str) -> bool:
    """Whether the trial has a record file (readable or not: it ended, and said so)."""
    return _pulled_record(sweep_dir, arm, trial_id).exists()


def has_final_trial_record(sweep_dir: SweepDir, arm: str, trial_id: str) -> bool:
    """Whether the trial has a record file that says it ended: any record but an `interrupted`
    one (an unreadable file counts as final: something ended it, and it is not overwritten)."""
    path = _pulled_record(sweep_dir, arm, trial_id)
    if not path.exists():
        return False
    data = load_record_json(path)
    return data is None or data.get("status") != INTERRUPTED


def load_record_json(path: Path, what: str = "trial record") -> dict[str, Any] | None:
    """A record file's JSON object, or None: missing (silently), unreadable or not an object
    (with a warning that names the file as `what`)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("skipping unreadable %s %s: %s", what, path, exc)
        return None
    if not isinstance(record, dict):
        logger.warning("skipping %s %s: not a JSON object", what, path)
        return None
    return record
