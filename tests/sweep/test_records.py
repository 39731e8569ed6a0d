"""Trial records: the on-disk JSON format (unchanged), atomic writes, and a torch-free import."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparsify.metric_names import EVAL_CE_LOSS_INCREASE, EVAL_L0
from sweep.records import (
    DIVERGED,
    ERROR,
    FINISHED,
    INTERRUPTED,
    STATUSES,
    STOPPED,
    STOPPED_BY_ASHA,
    TrialRecord,
    read_trial_record,
    trial_record_path,
    write_trial_record,
)

ROOT = Path(__file__).resolve().parents[2]


def record(arm, trial_id, status="finished", l0=10.0, ce=0.2, coeff=1.0):
    return {
        "arm": arm,
        "trial_id": trial_id,
        "status": status,
        "params": {"loss.sparsity.coeff": coeff},
        "metrics": {EVAL_L0: l0, EVAL_CE_LOSS_INCREASE: ce},
        "error": None if status == "finished" else "loss is NaN at step 7",
        "wall_time_s": 12.5,
    }


def test_record_path_is_arm_folder_and_trial_id(tmp_path):
    assert trial_record_path(tmp_path, "e2e", "e2e_00007") == tmp_path / "trials" / "e2e" / "e2e_00007.json"
    with pytest.raises(ValueError, match="trial_id"):
        trial_record_path(tmp_path, "e2e", "../escape")


def test_write_is_atomic_and_round_trips(tmp_path):
    path = write_trial_record(tmp_path, record("local", "local_00000"))
    assert path == trial_record_path(tmp_path, "local", "local_00000")
    assert [p.name for p in path.parent.iterdir()] == ["local_00000.json"]  # no temp file left
    assert json.loads(path.read_text())["metrics"][EVAL_L0] == 10.0


def test_write_rejects_record_without_status(tmp_path):
    with pytest.raises(ValueError, match="status"):
        write_trial_record(tmp_path, {"arm": "local", "trial_id": "x"})


def test_statuses_in_report_order():
    assert (
        STATUSES
        == (FINISHED, DIVERGED, STOPPED, ERROR, INTERRUPTED)
        == ("finished", "diverged", "stopped", "error", "interrupted")
    )


def test_record_file_is_todays_json_exactly(tmp_path):
    stopped = TrialRecord(
        arm="e2e", trial_id="e2e_00003", status=STOPPED, params={"lr": 1e-8, "loss.sparsity.coeff": 0.5},
        metrics={EVAL_L0: 12.5, EVAL_CE_LOSS_INCREASE: 3.25}, error=STOPPED_BY_ASHA,
    )  # fmt: skip
    path = write_trial_record(tmp_path, stopped)
    expected = {
        "arm": "e2e",
        "trial_id": "e2e_00003",
        "status": "stopped",
        "params": {"lr": 1e-8, "loss.sparsity.coeff": 0.5},
        "metrics": {"eval/L0": 12.5, "eval/ce_loss_increase": 3.25},
        "error": "stopped early by ASHA",
        "wall_time_s": None,
    }
    assert json.loads(path.read_text()) == expected
    # byte for byte what the writer has always written: sorted keys, 2-space indent, newline
    assert path.read_text() == json.dumps(expected, indent=2, sort_keys=True) + "\n"
    assert read_trial_record(tmp_path, "e2e", "e2e_00003") == stopped
    assert TrialRecord.from_json(stopped.to_json()) == stopped


def test_a_record_written_before_trial_record_existed_still_loads(tmp_path):
    old = record("local", "local_00001", status="diverged", l0=float("nan"), ce=None)
    old["metrics"] = {}
    path = trial_record_path(tmp_path, "local", "local_00001")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    loaded = read_trial_record(tmp_path, "local", "local_00001")
    assert loaded == TrialRecord(
        "local", "local_00001", DIVERGED, {"loss.sparsity.coeff": 1.0}, {}, "loss is NaN at step 7", 12.5
    )
    assert loaded is not None and loaded.to_json() == old


def test_a_record_with_per_sequence_values_and_replicates_round_trips(tmp_path):
    per_sequence = {EVAL_L0: [11.0, 13.5], EVAL_CE_LOSS_INCREASE: [0.25, 0.5], "eval/kl": [0.1, 0.2]}
    single = TrialRecord(
        arm="e2e", trial_id="e2e_00001", status=FINISHED, params={"lr": 0.01},
        metrics={EVAL_L0: 12.25, "eval_se/L0": 1.25}, wall_time_s=3.5, eval_per_sequence=per_sequence,
    )  # fmt: skip
    replicated = TrialRecord(
        arm="e2e", trial_id="e2e_00002", status=FINISHED, params={"lr": 0.01},
        metrics={EVAL_L0: 12.5, "eval_se/L0": 0.5}, wall_time_s=7.0,
        replicates=[
            {"seed": 0, "metrics": {EVAL_L0: 12.0}, "eval_per_sequence": per_sequence, "wall_time_s": 3.5},
            {"seed": 1, "metrics": {EVAL_L0: 13.0}, "eval_per_sequence": {}, "wall_time_s": 3.5},
        ],
    )  # fmt: skip
    for rec in (single, replicated):
        path = write_trial_record(tmp_path, rec)
        assert read_trial_record(tmp_path, rec.arm, rec.trial_id) == rec
        assert TrialRecord.from_json(json.loads(path.read_text())) == rec
    stored = json.loads(trial_record_path(tmp_path, "e2e", "e2e_00001").read_text())
    assert stored["eval_per_sequence"] == per_sequence and "replicates" not in stored  # empty: not written
    stored = json.loads(trial_record_path(tmp_path, "e2e", "e2e_00002").read_text())
    assert [r["seed"] for r in stored["replicates"]] == [0, 1] and "eval_per_sequence" not in stored
    # an older record has neither key: both read as empty
    old = record("local", "local_00001")
    assert "replicates" not in old and "eval_per_sequence" not in old
    loaded = TrialRecord.from_json(old)
    assert loaded.eval_per_sequence == {} and loaded.replicates == []
    assert TrialRecord.from_json({**old, "eval_per_sequence": None, "replicates": None}) == loaded
    # a replicate without wall time or per-sequence values reads with them empty
    short = TrialRecord.from_json({**old, "replicates": [{"seed": 3, "metrics": {}}]})
    assert short.replicates == [{"seed": 3, "metrics": {}, "eval_per_sequence": {}, "wall_time_s": None}]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"eval_per_sequence": [1.0]}, "eval_per_sequence must be an object"),
        ({"eval_per_sequence": {EVAL_L0: [1.0, "x"]}}, "must be a list of numbers"),
        ({"eval_per_sequence": {EVAL_L0: 1.0}}, "must be a list of numbers"),
        ({"replicates": {"seed": 0}}, "replicates must be a list"),
        ({"replicates": [7]}, r"replicates\[0\] must be an object"),
        ({"replicates": [{"seed": "0", "metrics": {}}]}, "seed must be an integer"),
        ({"replicates": [{"seed": True, "metrics": {}}]}, "seed must be an integer"),
        ({"replicates": [{"seed": 0}]}, "metrics must be an object"),
        ({"replicates": [{"seed": 0, "metrics": {}, "wall_time_s": "1 s"}]}, "wall_time_s"),
        ({"replicates": [{"seed": 0, "metrics": {}, "color": 1}]}, "unknown keys color"),
        ({"replicates": [{"seed": 0, "metrics": {}, "eval_per_sequence": {"a": [None]}}]}, "list of numbers"),
    ],
)
def test_invalid_per_sequence_values_and_replicates_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        TrialRecord.from_json({**record("local", "x"), **change})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"status": "crashed"}, "status must be one of finished, diverged, stopped, error"),
        ({"extra": 1}, "unknown keys extra"),
        ({"metrics": [1.0]}, "must be objects"),
        ({"wall_time_s": "12 s"}, "wall_time_s"),
        ({"error": 7}, "error must be"),
    ],
)
def test_invalid_records_are_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        TrialRecord.from_json({**record("local", "x"), **change})
    path = trial_record_path(tmp_path, "local", "x")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**record("local", "x"), **change}))
    assert read_trial_record(tmp_path, "local", "x") is None  # unusable: the trial trains again
    assert read_trial_record(tmp_path, "local", "missing") is None


def test_table_modules_import_without_torch_or_ray():
    code = (
        "import sys; import sweep.pareto, sweep.progress, sweep.records, sweep.report, sweep.results; "
        "print(sorted(m for m in ('torch', 'ray', 'optuna') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
