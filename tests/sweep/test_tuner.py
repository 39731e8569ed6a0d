"""The record callback of an arm's Tuner, on Tune `Trial` objects built and failed the way Tune
builds and fails them, without a Ray cluster: an errored or early-stopped trial gets its record
the moment Tune ends it (not after `Tuner.fit()` returns), and a trial's own record is kept."""

from __future__ import annotations

import traceback

from ray.exceptions import RayTaskError
from ray.tune.experiment import Trial

from sparsify import redact
from sparsify.metric_names import EVAL_CE_LOSS_INCREASE, EVAL_L0
from sweep.records import (
    ERROR,
    FINISHED,
    STOPPED,
    STOPPED_BY_ASHA,
    TrialRecord,
    read_trial_record,
    write_trial_record,
)
from sweep.trial import TrialFailedError
from sweep.tuner import TrialRecordCallback

ARM = "local"
FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"


def fail(trial: Trial, message: str) -> None:
    """What Tune does when a trial's function raises, up to calling `on_trial_error`."""
    try:
        raise TrialFailedError(message)
    except TrialFailedError as exc:
        error = RayTaskError("run_trial", traceback.format_exc(), exc)
    trial.handle_error(error)
    trial.set_status(Trial.ERROR)


def test_errored_trial_is_recorded_when_tune_reports_the_error(tmp_path, make_trial, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    sweep_dir = tmp_path / "sweep"
    trial = make_trial("00000", lr=0.01)
    fail(trial, f"wandb: bad key {FAKE_WANDB_KEY}")
    TrialRecordCallback(sweep_dir, ARM).on_trial_error(iteration=5, trials=[trial], trial=trial)
    recorded = read_trial_record(sweep_dir, ARM, "00000")
    assert recorded is not None and recorded.error is not None
    assert recorded.error == f"sweep.trial.TrialFailedError: {redact(f'wandb: bad key {FAKE_WANDB_KEY}')}"
    assert recorded == TrialRecord(ARM, "00000", ERROR, {"lr": 0.01}, {}, recorded.error, None)
    assert FAKE_WANDB_KEY not in (sweep_dir / "trials" / ARM / "00000.json").read_text()


def test_errored_trial_record_is_the_last_line_of_its_error(tmp_path, make_trial):
    sweep_dir = tmp_path / "sweep"
    trial = make_trial("00001", lr=0.01)
    fail(trial, "first line\ntrain_data.files: 'x' matches no file")
    TrialRecordCallback(sweep_dir, ARM).on_trial_error(iteration=1, trials=[trial], trial=trial)
    recorded = read_trial_record(sweep_dir, ARM, "00001")
    assert recorded is not None and recorded.status == ERROR
    assert recorded.error is not None and recorded.error.endswith("train_data.files: 'x' matches no file")
    assert "first line" not in recorded.error


def test_trial_stopped_by_the_scheduler_keeps_its_last_eval_metrics(tmp_path, make_trial):
    sweep_dir = tmp_path / "sweep"
    trial = make_trial("00002", lr=1e-8)
    trial.update_last_result(
        {EVAL_L0: 40.0, EVAL_CE_LOSS_INCREASE: 3.5, "train/loss": 9.0, "training_iteration": 1}
    )
    trial.set_status(Trial.TERMINATED)
    TrialRecordCallback(sweep_dir, ARM).on_trial_complete(iteration=9, trials=[trial], trial=trial)
    assert read_trial_record(sweep_dir, ARM, "00002") == TrialRecord(
        ARM, "00002", STOPPED, {"lr": 1e-8}, {EVAL_L0: 40.0, EVAL_CE_LOSS_INCREASE: 3.5}, STOPPED_BY_ASHA
    )


def test_a_trial_that_wrote_its_own_record_keeps_it(tmp_path, make_trial):
    sweep_dir = tmp_path / "sweep"
    callback = TrialRecordCallback(sweep_dir, ARM)
    own = TrialRecord(ARM, "00003", FINISHED, {"lr": 0.01}, {EVAL_L0: 5.0}, wall_time_s=3.0)
    write_trial_record(sweep_dir, own)
    trial = make_trial("00003", lr=0.01)
    trial.update_last_result({EVAL_L0: 5.0, "status": FINISHED})
    trial.set_status(Trial.TERMINATED)
    callback.on_trial_complete(iteration=2, trials=[trial], trial=trial)
    callback.on_experiment_end(trials=[trial])
    assert read_trial_record(sweep_dir, ARM, "00003") == own
    # its status says it recorded itself, even where the shared filesystem shows no file yet
    late = make_trial("00004", lr=0.02)
    late.update_last_result({EVAL_L0: 6.0, "status": FINISHED})
    late.set_status(Trial.TERMINATED)
    callback.on_trial_complete(iteration=3, trials=[late], trial=late)
    assert read_trial_record(sweep_dir, ARM, "00004") is None


def test_trials_that_ended_without_a_callback_are_recorded_at_the_end(tmp_path, make_trial):
    sweep_dir = tmp_path / "sweep"
    errored, stopped, running = make_trial("00005"), make_trial("00006"), make_trial("00007")
    fail(errored, "out of memory")
    stopped.update_last_result({EVAL_L0: 1.0})
    stopped.set_status(Trial.TERMINATED)
    running.set_status(Trial.RUNNING)
    TrialRecordCallback(sweep_dir, ARM).on_experiment_end(trials=[errored, stopped, running])
    errored_record = read_trial_record(sweep_dir, ARM, "00005")
    assert errored_record is not None and errored_record.status == ERROR
    assert errored_record.error is not None and errored_record.error.endswith("out of memory")
    stopped_record = read_trial_record(sweep_dir, ARM, "00006")
    assert stopped_record is not None and stopped_record.status == STOPPED
    assert read_trial_record(sweep_dir, ARM, "00007") is None
