"""A compact live view of a sweep: one line per arm each time a trial ends, e.g.

    [e2e] 5/8 done (4 finished, 1 diverged) · 1 running · frontier: L0 8.3 @ +1.62, 14.4 @ +1.53

read from the trial records (`sweep.results`), so it shows exactly what the report will use.
`progress_line` is torch- and Ray-free; `ArmProgress` is the Ray Tune callback that prints it.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from sparsify.metric_names import EVAL_CE_LOSS_INCREASE, EVAL_L0
from sweep.pareto import non_dominated
from sweep.records import ENDED_STATUSES, INTERRUPTED, SweepDir
from sweep.results import finished, load_results

FRONTIER_POINTS_SHOWN = 4


def progress_line(table: pd.DataFrame, arm: str, num_samples: int, running: int) -> str:
    """One arm's progress: trials ended out of `num_samples` by status, trials interrupted by
    an earlier Ctrl-C and not resumed yet (not ended: a rerun resumes them), trials running now,
    and the L0 vs CE-loss-increase (nats) frontier of its finished trials so far (lowest L0 first).

    Args:
        table: a results table (`sweep.results.load_results`), any arms.
        arm: the arm to summarize.
        num_samples: the arm's trial budget.
        running: trials of the arm running now.

    Returns:
        The line, e.g. "[e2e] 5/8 done (4 finished, 1 diverged) · 1 interrupted · 1 running · frontier ...".
    """
    rows = table[table["arm"] == arm] if len(table) else table
    counts = rows["status"].value_counts().to_dict() if len(rows) else {}
    by_status = ", ".join(f"{int(counts[s])} {s}" for s in ENDED_STATUSES if counts.get(s, 0))
    line = f"[{arm}] {sum(int(counts.get(s, 0)) for s in ENDED_STATUSES)}/{num_samples} done"
    if by_status:
        line += f" ({by_status})"
    if counts.get(INTERRUPTED, 0):
        line += f" · {int(counts[INTERRUPTED])} {INTERRUPTED}"
    line += f" · {running} running"
    done = finished(rows) if len(rows) else rows
    if len(done):
        front = non_dominated(done, EVAL_L0, EVAL_CE_LOSS_INCREASE)
        points = [f"{r[EVAL_L0]:.3g} @ {r[EVAL_CE_LOSS_INCREASE]:+.3g}" for _, r in front.iterrows()]
        more = len(points) - FRONTIER_POINTS_SHOWN
        shown = ", ".join(points[:FRONTIER_POINTS_SHOWN]) + (f" (+{more} more)" if more > 0 else "")
        line += f" · frontier L0 @ CE increase: {shown}"
    return line


def make_progress_callback(sweep_dir: SweepDir, arm: str, num_samples: int) -> Any:
    """The Ray Tune callback printing `progress_line` whenever a trial of `arm` ends.

    Every ended trial has a record by then: Tune calls `sweep.tuner.TrialRecordCallback`
    first, so the line is read from the records alone, except that a trial interrupted in an
    earlier run that runs again now counts as running, not interrupted.
    """
    from ray import tune

    class ArmProgress(tune.Callback):
        def _print(self, trials: list[Any], ended: Any) -> None:
            # the trial that just ended may still read RUNNING while its callbacks run
            running = sum(1 for t in trials if t.status == "RUNNING" and t is not ended)
            table = load_results(sweep_dir)
            live = {t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR") and t is not ended}
            if len(table) and live:  # an interrupted trial that runs again
                table = table[~((table["status"] == INTERRUPTED) & table["trial_id"].isin(live))]
            print(progress_line(table, arm, num_samples, running), flush=True)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._print(trials, trial)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._print(trials, trial)

    return ArmProgress()
