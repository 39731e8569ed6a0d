"""The live per-arm progress line, from a known results table."""

import math

import pandas as pd

from sparsify.metric_names import EVAL_CE_LOSS_INCREASE, EVAL_L0
from sweep.progress import progress_line


def _table():
    rows = [
        ("e2e", "a", "finished", 8.0, 1.6),
        ("e2e", "b", "finished", 14.0, 1.5),
        ("e2e", "c", "finished", 20.0, 1.7),  # dominated by b
        ("e2e", "d", "diverged", math.nan, math.nan),
        ("e2e", "e", "stopped", 3.0, 0.1),  # half-trained: never on the frontier
        ("local", "f", "finished", 1.0, 0.01),
    ]
    return pd.DataFrame(rows, columns=["arm", "trial_id", "status", EVAL_L0, EVAL_CE_LOSS_INCREASE])


def test_progress_line_counts_statuses_and_shows_the_finished_frontier():
    line = progress_line(_table(), "e2e", num_samples=8, running=1, unrecorded={"error": 1})
    assert line == (
        "[e2e] 6/8 done (3 finished, 1 diverged, 1 stopped, 1 error) · 1 running · "
        "frontier L0 @ CE increase: 8 @ +1.6, 14 @ +1.5"
    )


def test_progress_line_before_any_trial_ends():
    empty = pd.DataFrame(columns=["arm", "trial_id", "status"])
    assert progress_line(empty, "local", num_samples=3, running=1) == "[local] 0/3 done · 1 running"
