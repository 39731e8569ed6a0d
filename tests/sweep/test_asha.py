"""ASHA early stopping: a sweep with the Ray dashboard on (as `start_ray` starts it) stops the
bad trials, records them as `stopped`, keeps them out of the frontier, and does not hang on a
leaked placement group (ray#54305: each trial here needs both CPUs, so one leak would block
every later trial)."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from conftest import asha_space

from sparsify import metric_names as names
from sweep.results import load_results

ROOT = Path(__file__).resolve().parents[2]


def test_asha_stops_bad_trials_and_the_sweep_finishes(tiny_model_dir, corpus_dir, tmp_path):
    path = asha_space(tmp_path, "asha", tiny_model_dir, corpus_dir, n_samples=128)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    env.pop("RAY_ADDRESS", None)  # a Ray of its own, with the dashboard, as `start_ray` starts it
    # a hang (leaked placement group) fails here instead of blocking the test run
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sweep.run", str(path)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,  # about 5 minutes on an idle 2-core machine
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise AssertionError(
            f"the sweep hung (a leaked placement group?); its last output:\n{out[-3000:]}"
        ) from None
    assert done.returncode == 0, done.stderr[-3000:]
    table = load_results(tmp_path / "sweeps" / "asha")
    assert len(table) == 3
    by_lr = table.set_index("param:lr")
    assert by_lr.loc[1e-2, "status"] == "finished"  # the first trial sets the bar
    stopped = table[table["status"] == "stopped"]
    assert set(stopped["param:lr"]) == {1e-8, 2e-8}
    assert stopped["error"].str.contains("ASHA").all()
    # stopped trials keep their half-trained values, but the report's frontier leaves them out
    assert stopped[names.EVAL_CE_LOSS_INCREASE].notna().all()
    front = pd.read_csv(tmp_path / "sweeps" / "asha" / "report" / "frontier_local.csv")
    assert len(front) >= 1 and set(front["status"]) == {"finished"}
    assert not set(front["trial_id"]) & set(stopped["trial_id"])
