"""What each trial and arm cost, and the compute view (docs/design.md §8, §14).

Each finished training run records `cost/train_flops` (counted from shapes: `sparsify.flops`)
and `cost/device_seconds` (wall seconds of its training loop x devices); a point of `seeds: N`
replicates records their sum (`sweep.trial.replicate_means`). A fine-tuned trial (a record with
`init_from = {"arm": ..., "trial": ...}`) started from another trial's SAEs, so its cost includes
its source's: a trial's total cost = its own + its source's total, following the chain. A missing
source record (or one without a recorded cost) leaves the total at the own cost, and the
`cost_note` says so.

The report's "Cost" section (`CostView.section`): per arm, the trials and their summed total costs,
and the fraction of the finished trials' wall time spent in training steps (`train_time_fractions`);
the compute view (`plot_compute`, `report/compute.png`): each finished point's CE-loss increase
against its total training FLOPs, L0 annotated; and each arm's CE-loss increase at one L0
matched across arms (interpolated on every arm's frontier, linear in log L0, inside the L0 range
all frontiers cover: `sweep.pareto.y_at_x`) next to its mean training FLOPs per trial.
Torch-free and Ray-free, like `sweep.report`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sparsify import atomic_write_with
from sparsify.metric_names import (
    COST_DEVICE_SECONDS,
    COST_TRAIN_FLOPS,
    EVAL_CE_LOSS_INCREASE,
    EVAL_L0,
    TIME_TRAIN_STEPS_S,
)
from sweep.pareto import frontier_arrays, y_at_x
from sweep.records import FINISHED, TrialRecord

COMPUTE_PLOT = "compute.png"
OWN_FLOPS, OWN_SECONDS = "own_train_flops", "own_device_seconds"
TOTAL_FLOPS, TOTAL_SECONDS = "total_train_flops", "total_device_seconds"
"""A trial's own cost and its total (own + its `init_from` source's total)."""
COST_COLUMNS = (
    "arm",
    "trial_id",
    "status",
    OWN_FLOPS,
    OWN_SECONDS,
    TOTAL_FLOPS,
    TOTAL_SECONDS,
    "init_from",
    "cost_note",
)
SOURCE_MISSING = "source record {} missing: own cost only"
SOURCE_WITHOUT_COST = "source {} recorded no cost: own cost only"


def init_from(record: TrialRecord) -> tuple[str, str] | None:
    """The (arm, trial id) a trial's SAEs started from (`init_from` of a fine-tuning arm's
    record), or None (every record without it)."""
    source = getattr(record, "init_from", None)
    if not isinstance(source, Mapping) or "arm" not in source or "trial" not in source:
        return None
    return str(source["arm"]), str(source["trial"])


def _number(metrics: Mapping[str, Any], name: str) -> float:
    value = metrics.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return math.nan


def trial_costs(records: Sequence[TrialRecord]) -> pd.DataFrame:
    """Each trial's own and total cost.

    Args:
        records: every trial record of a sweep (`sweep.results.load_records`).

    Returns:
        One row per record, columns `COST_COLUMNS`: own FLOPs and device-seconds (NaN when not
        recorded: errored, stopped or diverged trials, older records), totals = own + the
        `init_from` source's total (followed through chains; a missing or cost-less source adds
        nothing and `cost_note` says so), `init_from` as "arm/trial" ("" without one).
    """
    by_key = {(r.arm, r.trial_id): r for r in records}
    totals: dict[tuple[str, str], tuple[float, float, str]] = {}

    def total(key: tuple[str, str], seen: frozenset[tuple[str, str]]) -> tuple[float, float, str]:
        if key in totals:
            return totals[key]
        record = by_key[key]
        flops, seconds = (
            _number(record.metrics, COST_TRAIN_FLOPS),
            _number(record.metrics, COST_DEVICE_SECONDS),
        )
        source, note = init_from(record), ""
        if source is not None:
            name = "/".join(source)
            if source not in by_key or source in seen:
                note = SOURCE_MISSING.format(name)
            else:
                source_flops, source_seconds, source_note = total(source, seen | {key})
                if math.isnan(source_flops):
                    note = SOURCE_WITHOUT_COST.format(name)
                else:
                    flops, seconds = flops + source_flops, seconds + source_seconds
                    note = source_note
        totals[key] = (flops, seconds, note)
        return totals[key]

    rows = []
    for record in records:
        key = (record.arm, record.trial_id)
        flops, seconds, note = total(key, frozenset({key}))
        source = init_from(record)
        rows.append({
            "arm": record.arm, "trial_id": record.trial_id, "status": record.status,
            OWN_FLOPS: _number(record.metrics, COST_TRAIN_FLOPS),
            OWN_SECONDS: _number(record.metrics, COST_DEVICE_SECONDS),
            TOTAL_FLOPS: flops, TOTAL_SECONDS: seconds,
            "init_from": "/".join(source) if source else "", "cost_note": note,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=list(COST_COLUMNS))


def arm_costs(costs: pd.DataFrame) -> pd.DataFrame:
    """Per arm: `trials` (records), `trials_with_cost`, and the sums of the trials' total
    training FLOPs and device-seconds (a source shared by several fine-tuned trials counts once
    per trial that started from it), from a `trial_costs` table."""
    rows = []
    for arm, group in costs.groupby("arm", sort=True):
        recorded = group[group[TOTAL_FLOPS].notna()]
        rows.append({
            "arm": arm, "trials": len(group), "trials_with_cost": len(recorded),
            TOTAL_FLOPS: float(recorded[TOTAL_FLOPS].sum()) if len(recorded) else math.nan,
            TOTAL_SECONDS: float(recorded[TOTAL_SECONDS].sum()) if len(recorded) else math.nan,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=["arm", "trials", "trials_with_cost", TOTAL_FLOPS, TOTAL_SECONDS])


TRAIN_TIME_COLUMNS = (
    "arm",
    "trials",
    "train_steps_s",
    "wall_time_s",
    "train_fraction",
    "from_device_seconds",
)


def train_time_fractions(records: Sequence[TrialRecord]) -> pd.DataFrame:
    """Per arm, how much of its finished trials' wall time went into training steps.

    A trial's training seconds are its `time/train_steps_s` (rank 0's wall seconds of the
    training loop without its evals, alive counts and checkpoints; summed over replicates and
    resumes); a record without it (written before it existed) counts its `cost/device_seconds`
    instead (the loop's wall seconds x ranks, in-loop evals included). Its wall time is the
    record's `wall_time_s` (the trial function's clock: Ray Train's start and end, model
    loading, data, training, evals, saving; not the Tune actor's start). A fine-tuned trial
    counts its own time only, not its source's.

    Returns:
        One row per arm with a finished trial, columns `TRAIN_TIME_COLUMNS`: `trials` (finished
        ones with both times), the sums of their training and wall seconds, `train_fraction`
        (their ratio) and `from_device_seconds` (how many of them counted `cost/device_seconds`).
    """
    rows = []
    for arm in sorted({r.arm for r in records}):
        steps = wall = 0.0
        trials = from_device = 0
        for record in records:
            wall_s = record.wall_time_s
            if record.arm != arm or record.status != FINISHED or not _positive(wall_s):
                continue
            seconds = _number(record.metrics, TIME_TRAIN_STEPS_S)
            if math.isnan(seconds):
                seconds = _number(record.metrics, COST_DEVICE_SECONDS)
                from_device += not math.isnan(seconds)
            if math.isnan(seconds):
                continue
            steps, wall, trials = steps + seconds, wall + float(wall_s or 0.0), trials + 1
        if trials:
            rows.append({
                "arm": arm, "trials": trials, "train_steps_s": steps, "wall_time_s": wall,
                "train_fraction": steps / wall, "from_device_seconds": from_device,
            })  # fmt: skip
    return pd.DataFrame(rows, columns=list(TRAIN_TIME_COLUMNS))


def _positive(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def compute_points(done: pd.DataFrame, costs: pd.DataFrame) -> pd.DataFrame:
    """The finished trials (`sweep.results.finished`) with their total training FLOPs and
    device-seconds (`trial_costs`) joined on arm and trial id; trials without a cost dropped."""
    if done.empty or costs.empty:
        return done.iloc[0:0].assign(**{TOTAL_FLOPS: [], TOTAL_SECONDS: []})
    joined = done.merge(costs[["arm", "trial_id", TOTAL_FLOPS, TOTAL_SECONDS]], on=["arm", "trial_id"])
    return joined[joined[TOTAL_FLOPS].notna() & (joined[TOTAL_FLOPS] > 0)]


def matched_l0(
    fronts: Mapping[str, pd.DataFrame], x: str = EVAL_L0, y: str = EVAL_CE_LOSS_INCREASE
) -> float | None:
    """One L0 every arm's frontier reaches: the geometric mean of the L0 range all frontiers
    cover (L0 > 0), or None when an arm has no frontier or the ranges do not overlap."""
    low, high = 0.0, math.inf
    for front in fronts.values():
        xs, _ = _frontier(front, x, y)
        if len(xs) == 0:
            return None
        low, high = max(low, float(xs[0])), min(high, float(xs[-1]))
    if not fronts or low > high:
        return None
    return math.sqrt(low * high)


def _frontier(front: pd.DataFrame, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    xs = pd.to_numeric(front[x], errors="coerce").to_numpy(dtype=float)
    ys = pd.to_numeric(front[y], errors="coerce").to_numpy(dtype=float)
    xs, ys = frontier_arrays(xs, ys)
    positive = xs > 0  # log L0
    return xs[positive], ys[positive]


def matched_table(
    points: pd.DataFrame, fronts: Mapping[str, pd.DataFrame], arms: Sequence[str]
) -> pd.DataFrame:
    """Per arm: the matched L0 (`matched_l0` over the arms that have a frontier), the CE-loss
    increase its frontier reaches there (nats/token, linear in log L0; NaN when no L0 is
    matched), and its mean total training FLOPs per finished trial (`compute_points`)."""
    with_front = {arm: fronts[arm] for arm in arms if arm in fronts and not fronts[arm].empty}
    target = matched_l0(with_front)
    rows = []
    for arm in arms:
        ce = math.nan
        if target is not None and arm in with_front:
            xs, ys = _frontier(with_front[arm], EVAL_L0, EVAL_CE_LOSS_INCREASE)
            ce = float(y_at_x(xs, ys, [target])[0])
        flops = points.loc[points["arm"] == arm, TOTAL_FLOPS] if not points.empty else pd.Series(dtype=float)
        rows.append({
            "arm": arm, "matched_L0": math.nan if target is None else target, "ce_loss_increase": ce,
            "mean_train_flops_per_trial": float(flops.mean()) if len(flops) else math.nan,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=["arm", "matched_L0", "ce_loss_increase", "mean_train_flops_per_trial"])


def plot_compute(path: Path, points: pd.DataFrame, arms: Sequence[str]) -> None:
    """`compute.png`: each arm's finished points, CE-loss increase against total training FLOPs
    (log x), each point labelled with its L0."""
    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, arm in enumerate(arms):
        own = points[points["arm"] == arm] if not points.empty else points
        if own.empty:
            continue
        ax.scatter(own[TOTAL_FLOPS], own[EVAL_CE_LOSS_INCREASE], color=f"C{i % 10}", s=28, label=arm)
        for flops, ce, l0 in zip(own[TOTAL_FLOPS], own[EVAL_CE_LOSS_INCREASE], own[EVAL_L0], strict=True):
            ax.annotate(f"L0 {l0:.3g}", (flops, ce), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if not points.empty:
        ax.set_xscale("log")
        ax.legend()
    ax.set_xlabel("training FLOPs per point (incl. the source of a fine-tuned trial)")
    ax.set_ylabel("eval CE loss increase (nats/token)")
    ax.grid(True, alpha=0.3)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.11, top=0.97)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


@dataclass(frozen=True)
class CostView:
    """A sweep's costs as the report shows them: each trial's (`trial_costs`), the finished
    points with their total FLOPs (`compute_points`) and the matched-L0 table (`matched_table`)."""

    costs: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(COST_COLUMNS)))
    train_time: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(TRAIN_TIME_COLUMNS)))
    """Per arm, the fraction of its trials' wall time spent in training steps (`train_time_fractions`)."""
    points: pd.DataFrame = field(default_factory=pd.DataFrame)
    matched: pd.DataFrame = field(default_factory=pd.DataFrame)
    arms: list[str] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        records: Sequence[TrialRecord],
        done: pd.DataFrame,
        fronts: Mapping[str, pd.DataFrame],
        arms: Sequence[str],
    ) -> CostView:
        """The view of a sweep's `records`, its finished trials `done` and L0 frontiers `fronts`."""
        costs = trial_costs(records)
        points = compute_points(done, costs)
        return cls(
            costs, train_time_fractions(records), points, matched_table(points, fronts, arms), list(arms)
        )

    def plot(self, path: Path) -> None:
        """Write the compute view's plot (`plot_compute`)."""
        plot_compute(path, self.points, self.arms)

    def to_json(self) -> dict[str, Any]:
        """The `cost` entry of `verdict.json`: per-arm totals, the matched-L0 table, and the
        notes of trials whose source's cost is missing."""
        notes = self.costs[self.costs["cost_note"] != ""]
        return {
            "per_arm": arm_costs(self.costs).to_dict(orient="records"),
            "train_time": self.train_time.to_dict(orient="records"),
            "matched": self.matched.to_dict(orient="records"),
            "notes": [f"{r.arm}/{r.trial_id}: {r.cost_note}" for r in notes.itertuples()],
        }

    def section(self, table: Callable[[pd.DataFrame, Sequence[str]], str], plots: bool, no_plot: str) -> str:
        """The report's "Cost" section; `table` is `sweep.report.markdown_table`, `plots`: the
        report sits beside `compute.png` (else `no_plot` stands in its place)."""
        lines = [
            "## Cost\n\n",
            "Training FLOPs are counted from shapes (`sparsify.flops`: model forwards and the frozen "
            "model's backward where run, SAE forward and backward; no eval). A cached local run counts "
            "the model forward it read from the cache, as a fresh run pays it. Device-seconds: wall "
            "seconds of the training loop x devices. A point of several seeds costs their sum; a "
            "fine-tuned trial's cost includes its source trial's.\n\n",
        ]
        if self.costs.empty or self.costs[TOTAL_FLOPS].isna().all():
            return "".join(lines) + "No trial recorded its cost.\n"
        headers = ["arm", "trials", "trials with cost", "total training FLOPs", "total device-seconds"]
        lines.append(table(arm_costs(self.costs), headers))
        lines += [f"\n- {note}" for note in self.to_json()["notes"]]
        lines.append(self._train_time_text(table))
        lines.append("\n\n### Compute view\n\n")
        lines.append(
            f"![CE loss increase vs training FLOPs]({COMPUTE_PLOT})\n\n" if plots else no_plot + "\n"
        )
        target = self.matched["matched_L0"].dropna() if not self.matched.empty else pd.Series(dtype=float)
        if target.empty:
            return "".join(lines) + "No L0 that every arm's frontier reaches: no matched comparison.\n"
        lines.append(
            f"CE loss increase at L0 = {target.iloc[0]:.4g}, interpolated on each arm's frontier (linear in "
            "log L0, inside the L0 range all frontiers cover), and the arm's mean training FLOPs per trial.\n\n"
        )
        headers = ["arm", "L0", "CE increase (nats/token)", "mean training FLOPs per trial"]
        return "".join(lines) + table(self.matched, headers)

    def _train_time_text(self, table: Callable[[pd.DataFrame, Sequence[str]], str]) -> str:
        """The "Time in training steps" part of the section (`train_time_fractions`)."""
        if self.train_time.empty:
            return ""
        older = int(self.train_time["from_device_seconds"].sum())
        text = (
            "\n\n### Time in training steps\n\n"
            "Per arm, the sum of its finished trials' `time/train_steps_s` (wall seconds of the training "
            "loop without its evals, alive counts and checkpoints) over the sum of their records' "
            "`wall_time_s` (the trial function's clock: Ray Train's start and end, model loading, data, "
            "training, evals, saving). The rest is the fixed cost of a trial.\n\n"
        )
        if older:
            text += (
                f"{older} older trial(s) recorded no `time/train_steps_s`: they count `cost/device_seconds` "
                "(the loop's wall seconds x ranks, in-loop evals included).\n\n"
            )
        shown = self.train_time.drop(columns=["from_device_seconds"])
        headers = [
            "arm",
            "finished trials",
            "training-step seconds",
            "wall seconds",
            "fraction in training steps",
        ]
        return text + table(shown, headers).rstrip("\n")
