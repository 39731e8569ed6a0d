"""Tests for sweep.report: a report built from hand-made records of two arms."""

import pytest

import sweep.report
from sparsify.metric_names import EVAL_ALIVE, EVAL_CE_LOSS_INCREASE, EVAL_L0
from sweep.records import write_trial_record
from sweep.report import ReportError, build_report, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (arm, trial_id, status, L0, CE increase, alive)
TRIALS = [
    ("local", "local_00000", "finished", 10.0, 0.4, 500),
    ("local", "local_00001", "finished", 100.0, 0.2, 900),
    ("local", "local_00002", "finished", 50.0, 0.5, 950),  # dominated by local_00000
    ("local", "local_00003", "diverged", None, None, None),
    ("e2e", "e2e_00000", "finished", 5.0, 0.3, 400),
    ("e2e", "e2e_00001", "finished", 20.0, 0.1, 700),
    ("e2e", "e2e_00002", "stopped", 3.0, 0.05, 100),  # half-trained: must not enter a frontier
]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("sweeps") / "my_sweep"
    for arm, trial_id, status, l0, ce, alive in TRIALS:
        metrics = {} if l0 is None else {EVAL_L0: l0, EVAL_CE_LOSS_INCREASE: ce, EVAL_ALIVE: alive}
        write_trial_record(sweep, {
            "arm": arm, "trial_id": trial_id, "status": status, "metrics": metrics,
            "params": {"loss.sparsity.coeff": 1.0}, "error": None, "wall_time_s": 1.0,
        })  # fmt: skip
    return sweep


@pytest.fixture(scope="module")
def report_md(sweep_dir):
    """Built once: rendering the two PNGs is most of this file's run time."""
    return build_report(sweep_dir)


@pytest.fixture
def no_plots(monkeypatch):
    """Skip PNG rendering in tests about the markdown or the entry point only."""
    monkeypatch.setattr(sweep.report, "_plot_view", lambda *args, **kwargs: None)


def test_report_writes_tables_and_plots(sweep_dir, report_md):
    out = sweep_dir / "report"
    assert report_md == out / "report.md"
    for name in ("trials.csv", "frontier_local.csv", "frontier_e2e.csv"):
        assert (out / name).is_file()
    for name in ("frontier_l0.png", "frontier_alive.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    assert len((out / "trials.csv").read_text().splitlines()) == 1 + len(TRIALS)
    assert (out / "frontier_local.csv").read_text().count("local_000") == 2


def test_report_markdown_shows_frontiers_counts_ratio_and_hypervolume(report_md):
    text = report_md.read_text()
    assert text.startswith("# Sweep report: my_sweep\n")
    for trial_id in ("local_00000", "local_00001", "e2e_00000", "e2e_00001"):
        assert f"| {trial_id} |" in text
    assert "local_00002" not in text and "e2e_00002" not in text
    assert (
        "| local | 3 | 1 | 0 | 0 | 0 | 4 |" in text
    )  # finished, diverged, stopped, error, interrupted, total
    assert "| e2e | 2 | 0 | 1 | 0 | 0 | 3 |" in text
    # at CE increase 0.2: local needs L0 100 (its point), e2e sqrt(5*20) = 10 -> ratio 10
    assert "| 0.2 | 100 | 10 | 10 |" in text
    # L0 view reference (110, 0.55): local 90*0.15 + 10*0.35 = 17; e2e 15*0.25 + 90*0.45 = 44.25
    assert "| local | 17 |" in text and "| e2e | 44.25 |" in text
    assert "![L0 vs CE loss increase](frontier_l0.png)" in text
    assert "frontier_alive.png" in text


def test_report_says_when_frontiers_do_not_overlap(tmp_path, no_plots):
    for arm, trial_id, l0, ce in [("local", "l0", 10.0, 0.9), ("e2e", "e0", 10.0, 0.1)]:
        write_trial_record(
            tmp_path,
            {
                "arm": arm,
                "trial_id": trial_id,
                "status": "finished",
                "metrics": {EVAL_L0: l0, EVAL_CE_LOSS_INCREASE: ce},
            },
        )
    text = build_report(tmp_path).read_text()
    assert "do not overlap" in text


def test_report_on_folder_without_trials_raises(tmp_path):
    with pytest.raises(ReportError, match="no trial records"):
        build_report(tmp_path)


def test_main_prints_report_path(sweep_dir, no_plots, capsys):
    assert main([str(sweep_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(sweep_dir / "report" / "report.md")


def test_main_on_missing_folder_exits_2_with_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: sweep folder not found") and captured.err.count("\n") == 1
