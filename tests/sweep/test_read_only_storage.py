"""Sweeps on read-only storage (a real read-only bind mount: root ignores `chmod -w`).

`sweep.run` refuses it in one line before the model loads (a dry run needs no writable
storage); a finished sweep copied there can still be read: `sweep.report --out DIR` writes the
report elsewhere and `--out -` prints it, writing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from storage_limits import read_only_view
from test_bad_inputs import assert_one_line_error, search_space, write_yaml

import sweep.report
import sweep.run
from sparsify.metric_names import EVAL_ALIVE, EVAL_CE_LOSS_INCREASE, EVAL_L0
from sweep.records import write_trial_record
from sweep.report import main as report_main
from sweep.run import main as sweep_main

TRIALS = [("local", "local_00000", 10.0, 0.4), ("local", "local_00001", 100.0, 0.2),
          ("e2e", "e2e_00000", 5.0, 0.3), ("e2e", "e2e_00001", 20.0, 0.1)]  # fmt: skip


@pytest.fixture
def no_sweep(monkeypatch):
    """Nothing heavy may run: the storage check comes before the model is loaded."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("run_sweep started on storage it cannot write")

    monkeypatch.setattr(sweep.run, "run_sweep", must_not_run)


@pytest.fixture
def space_yaml(tiny_model_dir, corpus_dir, tmp_path) -> Path:
    return write_yaml(tmp_path / "space.yaml", search_space(tiny_model_dir, corpus_dir, tmp_path))


def finished_sweep(storage: Path, space_yaml: Path) -> Path:
    """A finished sweep's folder as `sweep.run` leaves it: its search space and trial records."""
    from sweep.space import load_search_space

    loaded = load_search_space(space_yaml)
    folder = storage / loaded.space.name
    folder.mkdir(parents=True)
    sweep.run.check_same_space(loaded, folder)  # writes search_space.json, as a first run does
    for arm, trial_id, l0, ce in TRIALS:
        write_trial_record(folder, {
            "arm": arm, "trial_id": trial_id, "status": "finished", "params": {"loss.sparsity.coeff": 1.0},
            "metrics": {EVAL_L0: l0, EVAL_CE_LOSS_INCREASE: ce, EVAL_ALIVE: 100.0},
        })  # fmt: skip
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("given", ["--storage", "storage_path"])
def test_sweep_on_read_only_storage_is_one_line_before_the_model_loads(
    given, space_yaml, tmp_path, no_sweep, capsys
):
    (tmp_path / "empty").mkdir()
    with read_only_view(tmp_path / "empty", tmp_path / "ro") as ro:
        if given == "--storage":
            code = sweep_main([str(space_yaml), "--storage", str(ro)])
        else:
            text = space_yaml.read_text().replace(str(tmp_path / "sweeps"), str(ro))
            space_yaml.write_text(text)
            code = sweep_main([str(space_yaml)])
        line = assert_one_line_error(
            capsys, code, space_yaml, [f"{given}: {ro} is not writable (Read-only file system)"]
        )
        assert list(ro.iterdir()) == []
    print(line)


def test_dry_run_needs_no_writable_storage(space_yaml, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with read_only_view(tmp_path / "empty", tmp_path / "ro") as ro:
        assert sweep_main([str(space_yaml), "--storage", str(ro), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "arm local" in captured.out and captured.err == ""


def test_rerunning_a_finished_sweep_on_read_only_storage_points_to_the_report(
    space_yaml, tmp_path, no_sweep, capsys
):
    folder = finished_sweep(tmp_path / "storage", space_yaml)
    before = tree(folder)
    with read_only_view(tmp_path / "storage", tmp_path / "ro") as ro:
        code = sweep_main([str(space_yaml), "--storage", str(ro)])
        ro_sweep = ro / folder.name
        line = assert_one_line_error(
            capsys, code, space_yaml,
            [f"--storage: {ro_sweep} is not writable (Read-only file system)",
             f"python -m sweep.report {ro_sweep} --out DIR"],
        )  # fmt: skip
        code = sweep_main([str(space_yaml), "--storage", str(ro), "--resume"])
        assert_one_line_error(capsys, code, space_yaml, [f"{ro_sweep} is not writable"])
    assert tree(folder) == before
    print(line)


def test_report_of_a_read_only_sweep_is_written_where_out_says(space_yaml, tmp_path, capsys):
    folder = finished_sweep(tmp_path / "storage", space_yaml)
    out = tmp_path / "elsewhere" / "report"
    with read_only_view(tmp_path / "storage", tmp_path / "ro") as ro:
        assert report_main([str(ro / folder.name), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    names = {p.name for p in out.iterdir()}
    assert names == {"report.md", "verdict.json", "trials.csv", "frontier_local.csv", "frontier_e2e.csv",
                     "frontier_l0.png", "frontier_alive.png", "compute.png"}  # fmt: skip
    assert "| e2e_00001 |" in (out / "report.md").read_text()
    assert not (folder / "report").exists()


def test_report_to_stdout_writes_nothing(space_yaml, tmp_path, capsys, monkeypatch):
    folder = finished_sweep(tmp_path / "storage", space_yaml)
    with read_only_view(tmp_path / "storage", tmp_path / "ro") as ro:
        assert report_main([str(ro / folder.name), "--out", "-"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"# Sweep report: {folder.name}\n") and "| e2e_00001 |" in text
    assert "--out DIR" in text  # says where the plots are when it has none to show
    # and on writable storage too: not a file is created
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    assert report_main([str(folder), "--out", "-"]) == 0
    assert capsys.readouterr().out == text.replace(str(ro / folder.name), str(folder))
    assert sorted(tmp_path.rglob("*")) == before


def test_report_into_a_read_only_sweep_folder_says_to_use_out(space_yaml, tmp_path, capsys):
    folder = finished_sweep(tmp_path / "storage", space_yaml)
    with read_only_view(tmp_path / "storage", tmp_path / "ro") as ro:
        assert report_main([str(ro / folder.name)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1, captured.err
    assert lines[0] == (
        f"error: {ro / folder.name / 'report'} is not writable (Read-only file system); "
        "write the report elsewhere with --out DIR, or print it with --out -"
    )
    print(lines[0])


def test_report_folder_that_cannot_be_created_is_one_line(space_yaml, tmp_path, capsys):
    folder = finished_sweep(tmp_path / "storage", space_yaml)
    (tmp_path / "afile").write_text("x")
    assert report_main([str(folder), "--out", str(tmp_path / "afile" / "report")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert str(tmp_path / "afile") in captured.err and "Traceback" not in captured.err


def test_build_report_takes_an_out_folder(space_yaml, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep.report, "_plot_view", lambda *args, **kwargs: None)
    folder = finished_sweep(tmp_path / "storage", space_yaml)
    assert sweep.report.build_report(folder, tmp_path / "out") == tmp_path / "out" / "report.md"
    assert sweep.report.build_report(folder) == folder / "report" / "report.md"
