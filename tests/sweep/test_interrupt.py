"""Ctrl-C (SIGINT) stops a sweep: Tune takes the signal itself and ends the arm's run gracefully,
`fit_arm` learns of it so that no further arm starts, the trial that was running is recorded
`interrupted` (not `stopped`, which only ASHA's stops are), that record does not keep a rerun
from training the trial on, and a second Ctrl-C exits at once. The unit tests here take seconds;
the two end-to-end ones (a real sweep, SIGINT from outside) are slow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import PROCESS_TAG, checkpointed_sweep_base, tagged_processes

import sweep.interrupt
import sweep.run
import sweep.trial
from sparsify.metric_names import EVAL_CE_LOSS_INCREASE, EVAL_L0
from sweep.progress import make_progress_callback, progress_line
from sweep.records import (
    ERROR,
    FINISHED,
    INTERRUPTED,
    INTERRUPTED_BY_USER,
    STATUSES,
    STOPPED,
    STOPPED_BY_ASHA,
    TrialRecord,
    read_trial_record,
    write_trial_record,
)
from sweep.results import load_results
from sweep.space import load_search_space
from sweep.storage import as_store

ARM = "local"
REPO = Path(__file__).resolve().parents[2]
LINE = "interrupted: finished trials are kept; rerun the same command to resume"  # README
ONE_COEFF = {"loss.sparsity.coeff": {"type": "categorical", "values": [1.0]}}
PARAMS = {"loss.sparsity.coeff": 1.0}


# --- the records ---------------------------------------------------------------------------


def test_interrupted_is_a_status_the_report_counts():
    assert INTERRUPTED == "interrupted" and INTERRUPTED in STATUSES


def test_a_trial_live_when_tune_ends_the_run_is_recorded_interrupted(tmp_path, make_trial):
    """What Tune does on Ctrl-C: the step ends, then its cleanup sets every live trial
    TERMINATED without a trial callback, then `on_experiment_end`."""
    from ray.tune.experiment import Trial

    from sweep.tuner import TrialRecordCallback

    sweep_dir = tmp_path / "sweep"
    callback = TrialRecordCallback(sweep_dir, ARM)
    done_before = make_trial("00000", lr=0.1)  # ended in an earlier run, restored TERMINATED
    done_before.update_last_result({EVAL_L0: 2.0, "status": FINISHED})
    done_before.set_status(Trial.TERMINATED)
    stopped, running, added = make_trial("00001", lr=1e-8), make_trial("00002", lr=0.01), make_trial("00003")
    for trial in (stopped, running):
        trial.set_status(Trial.RUNNING)
    callback.on_step_begin(iteration=0, trials=[done_before, stopped, running])
    callback.on_trial_start(iteration=0, trials=[done_before, stopped, running], trial=running)
    stopped.update_last_result({EVAL_L0: 40.0, EVAL_CE_LOSS_INCREASE: 3.5, "training_iteration": 1})
    stopped.set_status(Trial.TERMINATED)  # ASHA stops it: Tune calls on_trial_complete
    callback.on_trial_complete(iteration=1, trials=[done_before, stopped, running], trial=stopped)
    running.update_last_result({EVAL_L0: 12.0, EVAL_CE_LOSS_INCREASE: 0.2, "train/loss": 1.0})
    # the step that sees the Ctrl-C adds a trial (pending) and still ends
    callback.on_step_end(iteration=1, trials=[done_before, stopped, running, added])
    for trial in (running, added):  # Tune's cleanup
        trial.set_status(Trial.TERMINATED)
    callback.on_experiment_end(trials=[done_before, stopped, running, added])

    assert read_trial_record(sweep_dir, ARM, "00000") is None  # its own record: not written here
    assert read_trial_record(sweep_dir, ARM, "00001") == TrialRecord(
        ARM, "00001", STOPPED, {"lr": 1e-8}, {EVAL_L0: 40.0, EVAL_CE_LOSS_INCREASE: 3.5}, STOPPED_BY_ASHA
    )
    assert read_trial_record(sweep_dir, ARM, "00002") == TrialRecord(
        ARM,
        "00002",
        INTERRUPTED,
        {"lr": 0.01},
        {EVAL_L0: 12.0, EVAL_CE_LOSS_INCREASE: 0.2},
        INTERRUPTED_BY_USER,
    )
    interrupted_new = read_trial_record(sweep_dir, ARM, "00003")
    assert interrupted_new is not None and interrupted_new.status == INTERRUPTED


def test_an_interrupted_record_is_replaced_when_the_resumed_trial_ends(tmp_path, make_trial):
    from ray.tune.experiment import Trial

    from sweep.tuner import TrialRecordCallback

    sweep_dir = tmp_path / "sweep"
    callback = TrialRecordCallback(sweep_dir, ARM)
    for trial_id in ("00004", "00005"):
        write_trial_record(sweep_dir, TrialRecord(ARM, trial_id, INTERRUPTED, error=INTERRUPTED_BY_USER))
    stopped = make_trial("00004")
    stopped.update_last_result({EVAL_L0: 9.0})
    stopped.set_status(Trial.TERMINATED)
    callback.on_trial_complete(iteration=3, trials=[stopped], trial=stopped)
    record = read_trial_record(sweep_dir, ARM, "00004")
    assert record is not None and record.status == STOPPED
    failed = make_trial("00005")
    failed.set_status(Trial.ERROR)
    callback.on_trial_error(iteration=4, trials=[failed], trial=failed)
    record = read_trial_record(sweep_dir, ARM, "00005")
    assert record is not None and record.status == ERROR
    # a final record is never replaced by an interrupt (the trial had ended before Tune saw it)
    write_trial_record(sweep_dir, TrialRecord(ARM, "00006", FINISHED, metrics={EVAL_L0: 1.0}))
    late = make_trial("00006")
    late.set_status(Trial.RUNNING)
    callback.on_step_end(iteration=5, trials=[late])
    late.set_status(Trial.TERMINATED)
    callback.on_experiment_end(trials=[late])
    record = read_trial_record(sweep_dir, ARM, "00006")
    assert record is not None and record.status == FINISHED


class FakeTrainer:
    """Stands in for `TorchTrainer` in `run_trial`: counts fits, returns a finished outcome."""

    fits: list[str] = []

    def __init__(self, train_worker, *, train_loop_config, run_config, **kwargs) -> None:
        self.name = run_config.name

    def fit(self):
        FakeTrainer.fits.append(self.name)
        return SimpleNamespace(return_value={"status": FINISHED, "metrics": {EVAL_L0: 5.0, "eval/kl": 0.1}})


def test_run_trial_trains_a_trial_whose_record_says_interrupted(
    tiny_model_dir, corpus_dir, tmp_path, monkeypatch
):
    base = checkpointed_sweep_base(tiny_model_dir, corpus_dir, tmp_path)
    space = {
        "name": "resumed",
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": 1,
        "base_config": base,
        "arms": {
            ARM: {"loss": {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}}, "search": ONE_COEFF}
        },
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    loaded = load_search_space(path)
    sweep_dir = tmp_path / "sweeps" / "resumed"
    reported: list[dict] = []
    trial_id = ["t_finished"]
    fake_tune = SimpleNamespace(
        get_context=lambda: SimpleNamespace(get_trial_id=lambda: trial_id[0]), report=reported.append
    )
    monkeypatch.setattr(sweep.trial, "tune", fake_tune)
    monkeypatch.setattr(sweep.trial, "TorchTrainer", FakeTrainer)
    from ray.train import UserCallback

    monkeypatch.setattr(sweep.trial, "EvalReportCallback", UserCallback)  # the real one needs a Tune session
    FakeTrainer.fits = []
    write_trial_record(sweep_dir, TrialRecord(ARM, "t_finished", FINISHED, metrics={EVAL_L0: 3.0}))
    write_trial_record(sweep_dir, TrialRecord(ARM, "t_interrupted", INTERRUPTED, error=INTERRUPTED_BY_USER))

    sweep.trial.run_trial({"arm": ARM, **PARAMS}, space=loaded, sweep_dir=str(sweep_dir))
    assert FakeTrainer.fits == [] and reported[-1]["status"] == FINISHED  # kept, not trained

    trial_id[0] = "t_interrupted"
    sweep.trial.run_trial({"arm": ARM, **PARAMS}, space=loaded, sweep_dir=str(sweep_dir))
    assert FakeTrainer.fits == ["train_t_interrupted"]  # trained on (Ray Train resumes its checkpoint)
    record = read_trial_record(sweep_dir, ARM, "t_interrupted")
    assert record is not None and record.status == FINISHED and record.metrics[EVAL_L0] == 5.0


def test_progress_counts_interrupted_trials_apart_and_a_resumed_one_as_running(tmp_path, capsys):
    write_trial_record(
        tmp_path, TrialRecord("e2e", "a", FINISHED, metrics={EVAL_L0: 8.0, EVAL_CE_LOSS_INCREASE: 1.6})
    )
    write_trial_record(tmp_path, TrialRecord("e2e", "b", INTERRUPTED, error=INTERRUPTED_BY_USER))
    write_trial_record(tmp_path, TrialRecord("e2e", "c", INTERRUPTED, error=INTERRUPTED_BY_USER))
    table = load_results(tmp_path)
    frontier = " · frontier L0 @ CE increase: 8 @ +1.6"
    assert progress_line(table, "e2e", num_samples=4, running=0) == (
        "[e2e] 1/4 done (1 finished) · 2 interrupted · 0 running" + frontier
    )
    # a rerun: trial b runs again, trial a ends now
    trials = [
        SimpleNamespace(trial_id="a", status="RUNNING"),
        SimpleNamespace(trial_id="b", status="RUNNING"),
    ]
    make_progress_callback(tmp_path, "e2e", num_samples=4).on_trial_complete(
        iteration=1, trials=trials, trial=trials[0]
    )
    assert (
        capsys.readouterr().out.strip()
        == "[e2e] 1/4 done (1 finished) · 1 interrupted · 1 running" + frontier
    )


# --- the signal ----------------------------------------------------------------------------


class FakeTuner:
    """`fit()` does what `ray.tune.run` does with SIGINT: installs Tune's own handler (the real
    one), runs steps (callbacks' `on_step_begin`) until a step sees its stop event, or until
    `steps` steps (the run is done). `ctrl_c_at` sends this process a SIGINT at that step."""

    def __init__(self, callbacks: list, steps: int = 5, ctrl_c_at: int | None = None) -> None:
        self.callbacks, self.steps, self.ctrl_c_at = callbacks, steps, ctrl_c_at
        self.ended_by_event = False

    def fit(self) -> None:
        from ray.tune.tune import _setup_signal_catching

        stop = _setup_signal_catching()
        for step in range(self.steps):
            for callback in self.callbacks:
                callback.on_step_begin(iteration=step, trials=[])
            if step == self.ctrl_c_at:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the handler runs in the main thread, between bytecodes
            if stop.is_set():
                self.ended_by_event = True
                return


@pytest.fixture
def sweep_handler():
    """The SIGINT handler a sweep has outside Tune's runs (`sweep.run.main`), put back after."""
    previous = signal.signal(signal.SIGINT, sweep.interrupt.stop_on_ctrl_c)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("relay", [True, False], ids=["relay", "restored-tuner-without-relay"])
def test_fit_arm_learns_of_a_ctrl_c_that_tune_took(sweep_handler, relay):
    from sweep.interrupt import fit_arm
    from sweep.tuner import CtrlCRelay

    calls = []

    def on_ctrl_c() -> None:
        calls.append(signal.getsignal(signal.SIGINT))
        sweep.interrupt.second_ctrl_c_exits_at_once()

    tuner = FakeTuner([CtrlCRelay()] if relay else [], ctrl_c_at=2)
    assert fit_arm(tuner, on_ctrl_c=on_ctrl_c) is True
    assert tuner.ended_by_event  # Tune took it (graceful end), no KeyboardInterrupt
    # called once, after Tune's handler had put back the one from before the fit
    assert calls == [sweep.interrupt.stop_on_ctrl_c]
    assert signal.getsignal(signal.SIGINT) is sweep.interrupt.exit_at_once  # the next Ctrl-C exits at once


def test_fit_arm_without_ctrl_c_puts_back_the_sweep_handler(sweep_handler):
    from sweep.interrupt import fit_arm
    from sweep.tuner import CtrlCRelay

    calls = []
    tuner = FakeTuner([CtrlCRelay()])
    assert fit_arm(tuner, on_ctrl_c=lambda: calls.append(1)) is False
    assert not tuner.ended_by_event and calls == []
    # not Tune's idle handler, which would swallow a Ctrl-C between arms
    assert signal.getsignal(signal.SIGINT) is sweep.interrupt.stop_on_ctrl_c


def test_a_relay_left_behind_by_a_plain_fit_lets_ctrl_c_raise(sweep_handler):
    """`Tuner.fit()` called directly (not through `fit_arm`) leaves the relay installed."""
    from sweep.interrupt import CTRL_C, relay_ctrl_c
    from sweep.tuner import CtrlCRelay

    FakeTuner([CtrlCRelay()]).fit()
    assert signal.getsignal(signal.SIGINT) is relay_ctrl_c
    CTRL_C.tune_handler = None  # as after the relay's first use
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)


def test_a_record_callback_pickled_before_it_tracked_live_trials_still_works(tmp_path):
    """A resumed sweep's Tuner unpickles the callbacks its first run pickled."""
    import pickle

    from sweep.tuner import TrialRecordCallback

    old = TrialRecordCallback(tmp_path, ARM)
    del old.live
    restored = pickle.loads(pickle.dumps(old))
    assert restored.live == set() and restored.arm == ARM and restored.sweep_dir == as_store(tmp_path)


def test_main_prints_the_line_and_exits_130_when_a_sweep_is_interrupted(
    tiny_model_dir, corpus_dir, tmp_path, monkeypatch, capsys
):
    def interrupted_sweep(*args):
        os.kill(os.getpid(), signal.SIGINT)  # main's handler: KeyboardInterrupt
        time.sleep(5)
        raise AssertionError("Ctrl-C did not stop the sweep")

    monkeypatch.setattr(sweep.run, "run_sweep", interrupted_sweep)
    space = {
        "name": "x",
        "num_samples": 1,
        "storage_path": str(tmp_path / "sweeps"),
        "base_config": checkpointed_sweep_base(tiny_model_dir, corpus_dir, tmp_path),
        "arms": {
            ARM: {"loss": {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}}, "search": ONE_COEFF}
        },
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    previous = signal.getsignal(signal.SIGINT)
    try:
        assert sweep.run.main([str(path)]) == 130
        assert signal.getsignal(signal.SIGINT) is sweep.interrupt.exit_at_once
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err.strip().splitlines()[-1] == LINE


# --- a real sweep, SIGINT from outside -------------------------------------------------------


def kill_tagged(tag: str) -> None:
    for pid in tagged_processes(tag):  # only what this test started
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def write_space(tmp_path: Path, tiny_model_dir: Path, corpus_dir: Path) -> tuple[Path, Path]:
    """Two arms, `long` first: 64 optimizer steps with a resume checkpoint every 2 (long
    enough to be stopped mid-run), then `short`: 4 steps."""
    base = checkpointed_sweep_base(tiny_model_dir, corpus_dir, tmp_path)
    base["n_samples"] = 1024
    search = {"loss.sparsity.coeff": {"type": "loguniform", "low": 0.01, "high": 1.0}}
    space = {
        "name": "ctrl_c",
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": 1,
        "sampler": "random",
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "base_config": base,
        "arms": {
            "long": {"loss": {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}}, "search": search},
            "short": {
                "loss": {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}},
                "search": search,
                "set": {"n_samples": 64},
            },
        },
    }
    path = tmp_path / "ctrl_c.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path, tmp_path / "sweeps" / "ctrl_c"


def start_sweep(space_file: Path, log: Path, tag: str, *extra: str) -> subprocess.Popen:
    # its own local Ray (no RAY_ADDRESS), a short temp dir (unix socket paths <= 107 bytes)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"), **{PROCESS_TAG: tag},
        PYTHONUNBUFFERED="1", PYTHONPATH=f"{REPO}:{REPO / 'tests'}",
    )  # fmt: skip
    with log.open("w") as out:
        # a session of its own, as a terminal's foreground job is; SIGINT goes to the driver only
        return subprocess.Popen(
            [sys.executable, "-m", "sweep.run", str(space_file), *extra],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def wait_for_checkpoint(driver: subprocess.Popen, sweep_dir: Path, log: Path, timeout_s: float = 600) -> str:
    """The id of the first trial with a Ray Train checkpoint, once it has one."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = sorted((sweep_dir / "ray_train").glob("train_*/checkpoint_*"))
        if found:
            return found[0].parent.name.removeprefix("train_")
        assert driver.poll() is None, f"the sweep ended before a checkpoint:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.1)


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_records_the_trial_interrupted_and_a_rerun_resumes_it(
    tiny_model_dir, corpus_dir, tmp_path
):
    space_file, sweep_dir = write_space(tmp_path, tiny_model_dir, corpus_dir)
    tag = uuid.uuid4().hex
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    try:
        driver = start_sweep(space_file, first_log, tag)
        trial_id = wait_for_checkpoint(driver, sweep_dir, first_log)
        driver.send_signal(signal.SIGINT)  # `kill -INT <driver>`, as Ctrl-C in its terminal
        sent = time.monotonic()
        try:
            code = driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"Ctrl-C did not stop the sweep:\n{first_log.read_text()[-3000:]}") from None
        stopped_in = time.monotonic() - sent
        first = first_log.read_text()
        print(
            f"\nexit code {code} {stopped_in:.1f} s after SIGINT; last lines:\n"
            + "\n".join(first.splitlines()[-3:])
        )
        assert code == 130, first[-3000:]
        assert LINE in first
        assert "=== arm short" not in first  # no further arm started
        record = read_trial_record(sweep_dir, "long", trial_id)
        assert record is not None, first[-3000:]
        print("record:", record)
        assert record.status == INTERRUPTED and record.error == INTERRUPTED_BY_USER
        assert not (sweep_dir / "trials" / "short").exists()
        assert not (sweep_dir / "runs" / "long" / trial_id / "train_state.json").exists()  # mid-run

        resumed = start_sweep(space_file, second_log, tag)
        assert resumed.wait(timeout=900) == 0, second_log.read_text()[-5000:]
    finally:
        kill_tagged(tag)
    second = second_log.read_text()
    resumed_lines = [line for line in second.splitlines() if f"train_{trial_id}" in line and "resum" in line]
    print("\n".join(resumed_lines))
    assert any("resuming from checkpoint" in line for line in resumed_lines), second[-5000:]
    table = load_results(sweep_dir).set_index("trial_id")
    print(table[["arm", "status"]])
    assert table.loc[trial_id, "status"] == FINISHED
    assert sorted(table["arm"]) == ["long", "short"] and (table["status"] == FINISHED).all()
    assert (sweep_dir / "report" / "report.md").exists()


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tiny_model_dir, corpus_dir, tmp_path):
    space_file, sweep_dir = write_space(tmp_path, tiny_model_dir, corpus_dir)
    tag = uuid.uuid4().hex
    log = tmp_path / "driver.log"
    try:
        driver = start_sweep(space_file, log, tag)
        wait_for_checkpoint(driver, sweep_dir, log)
        driver.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        while "Stop signal received" not in log.read_text():  # Tune took the first one
            assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        driver.send_signal(signal.SIGINT)
        sent = time.monotonic()
        code = driver.wait(timeout=30)
        exited_in = time.monotonic() - sent
        print(f"\nexit code {code} {exited_in:.2f} s after the second SIGINT")
        assert code == 130 and exited_in < 5, log.read_text()[-3000:]  # Tune blocks signals up to 1 s
        assert LINE in log.read_text()
        # Ray's processes end with the driver
        deadline = time.monotonic() + 60
        while (left := tagged_processes(tag)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"Ray processes left behind: {left}"
    finally:
        kill_tagged(tag)
