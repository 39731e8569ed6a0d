"""The sweep driver (`python -m sweep.run`) SIGKILLed mid-sweep, then rerun with --resume: it
leaves no Ray process behind, and the rerun keeps the trials that had ended (same params, same
metrics, not trained again), keeps the Optuna study, restarts the unfinished trial from its
last checkpoint and completes the budget. Several minutes on 2 CPU cores (two driver starts,
a local Ray cluster each, three trials)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import PROCESS_TAG, checkpointed_sweep_base, tagged_processes

from sparsify import metric_names as names
from sweep.results import load_results

pytestmark = pytest.mark.slow

NUM_SAMPLES = 3
SHOWN_COLUMNS = (
    "trial_id",
    "status",
    "param:loss.sparsity.coeff",
    names.EVAL_L0,
    names.EVAL_CE_LOSS_INCREASE,
)
REPO = Path(__file__).parents[2]


def format_trials(table: pd.DataFrame, title: str) -> str:
    """A results table as aligned text, one trial a line: id, status, the searched sparsity
    coefficient and the two objectives (eval L0; eval CE-loss increase, nats/token)."""
    lines = [title]
    if not len(table):
        return "\n".join([*lines, "  (no trial records)"])
    columns = [c for c in SHOWN_COLUMNS if c in table.columns]

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.6g}"
        return str(value)

    rows = [[cell(row[c]) for c in columns] for _, row in table.iterrows()]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def checkpointed_unrecorded_trials(sweep_dir: Path) -> list[str]:
    """Trials that have a Ray Train checkpoint but no record yet: killed now, they are mid-run."""
    recorded = {p.stem for p in (sweep_dir / "trials").glob("*/*.json")}
    runs = (sweep_dir / "ray_train").glob("train_*")
    return [
        r.name.removeprefix("train_")
        for r in runs
        if any(r.glob("checkpoint_*")) and r.name.removeprefix("train_") not in recorded
    ]


def wait_for_no_processes(tag: str, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_killed_sweep_resumes_keeping_ended_trials(tiny_model_dir, corpus_dir, tmp_path):
    base = checkpointed_sweep_base(tiny_model_dir, corpus_dir, tmp_path)
    space = {
        "name": "resumable",
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": NUM_SAMPLES,
        "sampler": "random",
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "base_config": base,
        "arms": {
            "local": {
                "loss": {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}},
                "search": {"loss.sparsity.coeff": {"type": "loguniform", "low": 0.01, "high": 1.0}},
            }
        },
    }
    space_file = tmp_path / "resumable.yaml"
    space_file.write_text(yaml.safe_dump(space))
    sweep_dir = tmp_path / "sweeps" / "resumable"
    tag = uuid.uuid4().hex
    # its own local Ray: no RAY_ADDRESS, a short temp dir of its own (unix socket paths are
    # limited to 107 bytes), and a tag in the environment to find every process it starts
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, **{PROCESS_TAG: tag}, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "sweep.run", str(space_file)]
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    start = time.monotonic()
    try:
        with first_log.open("w") as log:
            driver = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        records = sweep_dir / "trials" / "local"
        deadline = time.monotonic() + 900
        while not [p for p in records.glob("*.json") if not p.name.startswith(".")]:
            assert driver.poll() is None, (
                f"the sweep ended before its first trial:\n{first_log.read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, "no trial record after 15 minutes"
            time.sleep(0.5)
        # kill it when the next trial has reported its mid-run checkpoint (or after 5 minutes)
        deadline = time.monotonic() + 300
        while not (unfinished := checkpointed_unrecorded_trials(sweep_dir)) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything in its process group
        driver.wait()
        killed_at = time.monotonic() - start
        before = load_results(sweep_dir)
        left = wait_for_no_processes(tag, timeout_s=60)
        assert not left, f"Ray processes left behind after the driver was killed: {left}"

        with second_log.open("w") as log:
            resumed = subprocess.run(
                [*command, "--resume"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                timeout=1200, start_new_session=True,
            )  # fmt: skip
        assert resumed.returncode == 0, second_log.read_text()[-5000:]
        assert not wait_for_no_processes(tag, timeout_s=60), "Ray processes left behind after the sweep"
    finally:
        for pid in tagged_processes(tag):  # only what this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    after = load_results(sweep_dir)
    print(f"\nkilled after {killed_at:.0f} s; whole test {time.monotonic() - start:.0f} s")
    print(format_trials(before, f"before the kill ({len(before)} trial records):"))
    print(format_trials(after, f"after the resume ({len(after)} trial records):"))

    print("killed mid-run, with a checkpoint:", unfinished or "none seen")
    # Ray Train's controller says so when a rerun of a Train run finds the run's checkpoints
    snapshot_lines = [
        line for line in second_log.read_text().splitlines() if "run snapshot was found" in line
    ]
    print("\n".join(snapshot_lines) or "no Train run snapshot found on resume")
    for trial_id in unfinished:
        assert any(f"train_{trial_id}" in line for line in snapshot_lines), trial_id
    assert 1 <= len(before) < NUM_SAMPLES
    assert len(after) == NUM_SAMPLES and after["trial_id"].is_unique
    assert (after["status"] == "finished").all()
    # the trials that had ended are unchanged (records not rewritten: same wall time too)
    kept = after.set_index("trial_id").loc[before["trial_id"]].reset_index()[list(before.columns)]
    pd.testing.assert_frame_equal(kept, before.reset_index(drop=True), check_dtype=False)

    # the Optuna study holds each trial's result once. (Tune saves its experiment state, the
    # searcher's included, at most every 10 s: a trial asked for in the last seconds before a
    # kill may stay RUNNING in the study, unknown to the restored searcher; none is COMPLETE twice.)
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(sweep_dir / "optuna" / "local.journal")))
    study = optuna.load_study(study_name="local", storage=storage)
    print("optuna trials:", [(t.number, t.state.name, t.values) for t in study.trials])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.values[0] for t in complete) == sorted(after[names.EVAL_L0])
