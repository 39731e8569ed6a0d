"""The live per-arm progress line, from a known results table or the sweep's records alone."""

import math
from types import SimpleNamespace

import pandas as pd

from sparsify.metric_names import EVAL_CE_LOSS_INCREASE, EVAL_L0
from sweep.progress import make_progress_callback, progress_line
from sweep.records import DIVERGED, ERROR, FINISHED, TrialRecord, write_trial_record
from sweep.results import load_results


def _table():
    rows = [
        ("e2e", "a", "finished", 8.0, 1.6),
        ("e2e", "b", "finished", 14.0, 1.5),
        ("e2e", "c", "finished", 20.0, 1.7),  # dominated by b
        ("e2e", "d", "diverged", math.nan, math.nan),
        ("e2e", "e", "stopped", 3.0, 0.1),  # half-trained: never on the frontier
        ("e2e", "g", "error", math.nan, math.nan),
        ("local", "f", "finished", 1.0, 0.01),
    ]
    return pd.DataFrame(rows, columns=["arm", "trial_id", "status", EVAL_L0, EVAL_CE_LOSS_INCREASE])


def test_progress_line_counts_statuses_and_shows_the_finished_frontier():
    line = progress_line(_table(), "e2e", num_samples=8, running=1)
    assert line == (
        "[e2e] 6/8 done (3 finished, 1 diverged, 1 stopped, 1 error) · 1 running · "
        "frontier L0 @ CE increase: 8 @ +1.6, 14 @ +1.5"
    )


def test_progress_line_before_any_trial_ends():
    empty = pd.DataFrame(columns=["arm", "trial_id", "status"])
    assert progress_line(empty, "local", num_samples=3, running=1) == "[local] 0/3 done · 1 running"


def test_progress_counts_recorded_trials_only(tmp_path, capsys):
    """Tune's trial states are not counted: every ended trial has its record by the time the
    progress callback runs (the record callback runs first)."""
    for trial_id, status, l0 in [("e2e_1", FINISHED, 8.0), ("e2e_2", ERROR, None), ("e2e_3", DIVERGED, None)]:
        metrics = {} if l0 is None else {EVAL_L0: l0, EVAL_CE_LOSS_INCREASE: 1.6}
        write_trial_record(tmp_path, TrialRecord("e2e", trial_id, status, metrics=metrics))
    write_trial_record(tmp_path, TrialRecord("local", "local_1", FINISHED, metrics={EVAL_L0: 1.0}))
    expected = (
        "[e2e] 3/6 done (1 finished, 1 diverged, 1 error) · 1 running · frontier L0 @ CE increase: 8 @ +1.6"
    )
    assert progress_line(load_results(tmp_path), "e2e", num_samples=6, running=1) == expected

    # Tune's view disagrees: an errored and a terminated trial without records, one running
    trials = [
        SimpleNamespace(trial_id="e2e_1", status="TERMINATED"),
        SimpleNamespace(trial_id="e2e_4", status="ERROR"),
        SimpleNamespace(trial_id="e2e_5", status="TERMINATED"),
        SimpleNamespace(trial_id="e2e_6", status="RUNNING"),
        SimpleNamespace(trial_id="e2e_2", status="RUNNING"),  # ending now: not counted as running
    ]
    callback = make_progress_callback(tmp_path, "e2e", num_samples=6)
    callback.on_trial_error(iteration=3, trials=trials, trial=trials[-1])
    callback.on_trial_complete(iteration=4, trials=trials, trial=trials[0])
    assert capsys.readouterr().out.splitlines() == [expected, expected.replace("1 running", "2 running")]
