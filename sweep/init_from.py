"""Fine-tune arms (docs/design.md §7, "Fine-tune arms"): an arm with `init_from` starts each of
its trials from the saved SAEs of one finished trial of another arm (its source), and trains
them on with its own loss and its own budget, e.g. a local SAE fine-tuned with KL + MSE on a
few percent more tokens.

- `arm_order`: the order the sweep runs its arms in (every source arm before its fine-tunes).
- `select_sources`: which of the source arm's trials the fine-tune arm starts from, chosen from
  the records once the source arm has run, in order of eval L0.
- `fine_tune_start` / `fine_tune_config`: one fine-tune trial's source, its parameters (the
  source's searched values) and its training config (pretrained SAEs = the source's run folder).

Ray- and torch-free: `sweep.run` uses it before Ray starts, `sweep.tuner` and `sweep.trial` in
the trials. The run folder layout itself is `sweep.trial`'s, which passes the folder in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsify import SparsifyError, TrainConfig, validate_config
from sparsify.metric_names import EVAL_CE_LOSS_INCREASE, EVAL_L0
from sweep.pareto import non_dominated
from sweep.records import FINISHED, SweepDir, TrialRecord, read_trial_record
from sweep.results import finished, load_records, results_table
from sweep.space import LoadedSpace, SearchSpace

INIT_FROM_KEY = "init_from"
"""Tune config key of a fine-tune trial: its source trial's id (the trial's one parameter; it
names no training-config field)."""


def arm_order(space: SearchSpace) -> list[str]:
    """The arms in the order the sweep runs them: file order, except that a fine-tune arm runs
    after its source arm (its trials start from the source's finished trials)."""
    order = [name for name in space.arms if space.arms[name].init_from is None]
    return order + space.fine_tune_arms


@dataclass(frozen=True)
class FineTuneStart:
    """Where one fine-tune trial starts.

    Attributes:
        arm: The source arm.
        trial: The source trial's id (its record's `trial_id`).
        params: The source trial's searched values, which the fine-tune trial keeps (and records
            as its own `params`).
    """

    arm: str
    trial: str
    params: dict[str, Any]

    @property
    def record(self) -> dict[str, str]:
        """The fine-tune trial record's `init_from`: `{"arm": <source arm>, "trial": <source
        trial_id>}`."""
        return {"arm": self.arm, "trial": self.trial}


def select_sources(
    space: SearchSpace, sweep_dir: SweepDir, arm_name: str, num_samples: int
) -> list[TrialRecord]:
    """The source trials a fine-tune arm starts from (one trial each), read from the records.

    `finished` source trials with finite eval L0 and CE increase (`sweep.results.finished`: no
    diverged, stopped, errored or interrupted one), with `select: frontier` only those on the
    source arm's eval L0 / eval CE-increase frontier, sorted by eval L0 (then trial id). With
    more than `num_samples`, `num_samples` of them evenly spaced in that order (both ends
    included from 2 on; the middle one for 1).

    Raises:
        FileNotFoundError: `sweep_dir` does not exist.
    """
    init_from = space.arms[arm_name].init_from
    if init_from is None:
        raise ValueError(f"arm {arm_name} has no init_from")
    records = {r.trial_id: r for r in load_records(sweep_dir) if r.arm == init_from.arm}
    table = finished(results_table(list(records.values())))
    if init_from.select == "frontier" and len(table):
        table = non_dominated(table, EVAL_L0, EVAL_CE_LOSS_INCREASE)
    table = table.sort_values([EVAL_L0, "trial_id"], kind="stable") if len(table) else table
    ids = [str(trial_id) for trial_id in table["trial_id"]]
    return [records[ids[i]] for i in spread(len(ids), num_samples)]


def spread(n: int, k: int) -> list[int]:
    """`min(n, k)` distinct indices into n sorted items, evenly spaced: all of them when k >= n,
    else both ends and k - 2 between (the middle one for k = 1)."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [(n - 1) // 2]
    return [math.floor(i * (n - 1) / (k - 1) + 0.5) for i in range(k)]


def fine_tune_start(
    sweep_dir: SweepDir, arm: str, source_arm: str, source_trial: str, strict: bool = True
) -> FineTuneStart:
    """The start of a fine-tune trial of `arm` whose source is `source_trial` of `source_arm`.

    Args:
        strict: Raise when the source is not a finished trial; else (recording a trial that
            ended) give its start with no params.

    Raises:
        SparsifyError: the source has no record, or one that is not `finished` (it is never
            used then).
    """
    record = read_trial_record(sweep_dir, source_arm, source_trial) if source_trial else None
    if not strict and (record is None or record.status != FINISHED):
        return FineTuneStart(arm=source_arm, trial=source_trial, params={})
    if record is None or record.status != FINISHED:
        got = "no record" if record is None else f"status {record.status}"
        raise SparsifyError(
            f"arms.{arm}.init_from: source trial {source_arm}/{source_trial} has {got}; only finished "
            "trials are started from"
        )
    return FineTuneStart(arm=source_arm, trial=source_trial, params=dict(record.params))


def fine_tune_config(loaded: LoadedSpace, arm: str, start: FineTuneStart, source_run: Path) -> TrainConfig:
    """A fine-tune trial's training config: its source trial's config with the arm's loss and
    `set` on top (`LoadedSpace.trial_config` of the source's params), starting from the SAEs
    saved in `source_run` (the source trial's run folder) and training them on
    (`saes.retrain_saes: true`).

    Raises:
        ConfigError: naming the file and the arm.
    """
    tree = loaded.trial_config(arm, start.params).model_dump(mode="json")
    tree["saes"]["pretrained_sae_paths"] = [str(source_run)]
    tree["saes"]["retrain_saes"] = True
    return validate_config(tree, source=f"{loaded.source}: arms.{arm}")
