"""Tests for sweep.results: records on disk -> one table."""

import logging

import numpy as np
import pytest

from sparsify.metric_names import EVAL_ALIVE, EVAL_CE_LOSS_INCREASE, EVAL_L0
from sweep.records import TrialRecord, read_trial_record, write_trial_record
from sweep.results import finished, load_records, load_results


def record(arm, trial_id, status="finished", l0=10.0, ce=0.2, coeff=1.0, **metrics):
    return {
        "arm": arm,
        "trial_id": trial_id,
        "status": status,
        "params": {"loss.sparsity.coeff": coeff},
        "metrics": {EVAL_L0: l0, EVAL_CE_LOSS_INCREASE: ce, **metrics},
        "error": None if status == "finished" else "loss is NaN at step 7",
        "wall_time_s": 12.5,
    }


@pytest.fixture
def sweep_dir(tmp_path):
    write_trial_record(tmp_path, record("local", "local_00001", status="diverged", l0=float("nan"), ce=None))
    write_trial_record(
        tmp_path, record("local", "local_00000", l0=12.0, ce=0.3, coeff=0.5, **{EVAL_ALIVE: 800})
    )
    write_trial_record(tmp_path, record("e2e", "e2e_00000", l0=4.0, ce=0.1, coeff=2.0))
    local = tmp_path / "trials" / "local"
    (local / ".local_00002.json.abc.tmp").write_text('{"arm": "local", "trial_id": "loc')
    (local / "local_00003.json").write_text("{not json")
    (local / "local_00004.json").write_text("[1, 2]")
    (local / "local_00005.json").write_text('{"arm": "local", "trial_id": "local_00005", "status": "done"}')
    return tmp_path


def test_load_gives_one_sorted_row_per_readable_record(sweep_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="sweep"):  # sweep.records reads the files
        df = load_results(sweep_dir)
    assert df["trial_id"].tolist() == ["e2e_00000", "local_00000", "local_00001"]
    assert list(df.columns) == [
        "arm", "trial_id", "status", "error", "wall_time_s", "n_seeds",
        EVAL_L0, EVAL_ALIVE, EVAL_CE_LOSS_INCREASE, "param:loss.sparsity.coeff",  # metrics sorted by name
    ]  # fmt: skip
    assert df["arm"].tolist() == ["e2e", "local", "local"]
    assert df["status"].tolist() == ["finished", "finished", "diverged"]
    assert df[EVAL_L0].tolist()[:2] == [4.0, 12.0] and np.isnan(df[EVAL_L0][2])
    assert df["param:loss.sparsity.coeff"].tolist() == [2.0, 0.5, 1.0]
    assert df[EVAL_ALIVE][1] == 800 and np.isnan(df[EVAL_ALIVE][0])
    assert df["error"][2] == "loss is NaN at step 7"
    assert df["wall_time_s"].tolist() == [12.5, 12.5, 12.5]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "local_00003.json" in warned and "local_00004.json" in warned
    assert "local_00005.json" in warned  # an unknown status: the table and read_trial_record agree
    assert read_trial_record(sweep_dir, "local", "local_00005") is None
    assert "local_00002" not in warned  # temp files are ignored silently


def test_finished_keeps_finished_trials_with_finite_objectives(sweep_dir):
    df = load_results(sweep_dir)
    assert finished(df)["trial_id"].tolist() == ["e2e_00000", "local_00000"]
    # a finished trial missing an objective value is left out too
    write_trial_record(sweep_dir, record("e2e", "e2e_00001", l0=float("inf")))
    assert finished(load_results(sweep_dir))["trial_id"].tolist() == ["e2e_00000", "local_00000"]
    assert finished(df, ["eval/not_logged"]).empty


def test_empty_sweep_gives_empty_table_with_fixed_columns(tmp_path):
    df = load_results(tmp_path)
    assert df.empty
    assert list(df.columns) == ["arm", "trial_id", "status", "error", "wall_time_s", "n_seeds"]
    assert load_records(tmp_path) == []
    assert finished(df).empty


def test_missing_sweep_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_results(tmp_path / "nope")


def test_load_records_reads_them_whole_and_the_table_counts_seeds(sweep_dir, caplog):
    replicated = record("e2e", "e2e_00002", l0=5.0, ce=0.15)
    replicated["replicates"] = [
        {
            "seed": 0,
            "metrics": {EVAL_L0: 4.0},
            "eval_per_sequence": {EVAL_L0: [3.0, 5.0]},
            "wall_time_s": 2.0,
        },
        {
            "seed": 1,
            "metrics": {EVAL_L0: 6.0},
            "eval_per_sequence": {EVAL_L0: [6.0, 6.0]},
            "wall_time_s": 3.0,
        },
    ]
    write_trial_record(sweep_dir, replicated)
    with caplog.at_level(logging.WARNING, logger="sweep"):
        records = load_records(sweep_dir)
    # the same records as the table, skipping the same files
    assert [(r.arm, r.trial_id) for r in records] == [
        ("e2e", "e2e_00000"), ("e2e", "e2e_00002"), ("local", "local_00000"), ("local", "local_00001")
    ]  # fmt: skip
    assert all(isinstance(r, TrialRecord) for r in records)
    assert "local_00003.json" in caplog.text and "local_00002" not in caplog.text
    assert [rep["seed"] for rep in records[1].replicates] == [0, 1]
    assert records[1].replicates[1]["eval_per_sequence"] == {EVAL_L0: [6.0, 6.0]}
    df = load_results(sweep_dir)
    assert df.set_index("trial_id")["n_seeds"].to_dict() == {
        "e2e_00000": 1, "e2e_00002": 2, "local_00000": 1, "local_00001": 1
    }  # fmt: skip
