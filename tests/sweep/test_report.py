"""Tests for sweep.report: a report built from hand-made records of two arms."""

import json

import pytest

import sweep.report
from sparsify.metric_names import EVAL_ALIVE, EVAL_CE_LOSS_INCREASE, EVAL_L0, se_name
from sweep.bootstrap import points_from_records
from sweep.records import write_trial_record
from sweep.report import ReportError, build_report, main, report_text
from sweep.results import load_records
from sweep.space import SPACE_RECORD
from sweep.verdict import compare

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


LOSSES = {
    "local": {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}},
    "e2e": {"sparsity": {"coeff": 1.0}, "logits_kl": {"coeff": 1.0}},
}


def record_space(sweep, losses=LOSSES, baseline=None):
    """The search_space.json `sweep.run` writes: the report reads the arms' losses from it."""
    arms = {
        arm: {"loss": loss, "search": {"loss.sparsity.coeff": {"type": "loguniform"}}}
        for arm, loss in losses.items()
    }
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / SPACE_RECORD).write_text(json.dumps({"space": {"arms": arms, "baseline": baseline}, "base": {}}))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("sweeps") / "my_sweep"
    record_space(sweep)
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


def test_report_opens_with_the_verdict_against_the_recorded_baseline(sweep_dir, report_md):
    text = report_md.read_text()
    expected = compare(
        "e2e", "local", *(points_from_records(load_records(sweep_dir))[a] for a in ("e2e", "local"))
    )
    verdict = text.index("## Verdict")
    assert verdict < text.index("## Trials per arm")
    assert "Baseline: **local** (the arm without logits_kl and in_to_orig terms)." in text
    assert expected.text in text and "Method: 90% intervals are percentile bootstrap intervals" in text

    def strict(constant):
        raise AssertionError(f"verdict.json holds {constant}: not strict JSON")

    stored = json.loads((sweep_dir / "report" / "verdict.json").read_text(), parse_constant=strict)
    assert stored["baseline"] == "local"
    assert stored["comparisons"] == [sweep.report._finite_or_null(expected.to_json())]
    # these records keep eval means only: no interval, said plainly, and null (not NaN) in the JSON
    ratio = stored["comparisons"][0]["estimates"]["l0_ratio_at_matched_ce_increase"]
    assert ratio["low"] is None and stored["comparisons"][0]["status"] == "inconclusive"
    assert "have one seed and no per-sequence eval values" in text
    # CE overlap of local [0.2, 0.4] and e2e [0.1, 0.3]: matched at 0.25, where local's segment
    # (10, 0.4)-(100, 0.2) gives f = 0.75 and L0 = 10 * 10^0.75 (linear in log L0)
    ratio = stored["comparisons"][0]["estimates"]["l0_ratio_at_matched_ce_increase"]
    assert ratio["at"] == pytest.approx(0.25) and ratio["baseline_value"] == pytest.approx(10 * 10**0.75)


def test_report_baseline_from_the_command_line_or_none(tmp_path, sweep_dir, no_plots):
    bare = tmp_path / "bare"
    (bare / "trials").mkdir(parents=True)
    for path in (sweep_dir / "trials").rglob("*.json"):
        (bare / "trials" / path.parent.name).mkdir(exist_ok=True)
        (bare / "trials" / path.parent.name / path.name).write_text(path.read_text())
    text = report_text(bare)
    assert (
        "No verdict: no readable search_space.json in the sweep folder; name the baseline with --baseline ARM."
        in text
    )
    assert "Baseline: **e2e** (named with --baseline)." in report_text(bare, baseline="e2e")
    assert "**local vs e2e:" in report_text(bare, baseline="e2e")
    with pytest.raises(ReportError, match="--baseline 'x' is not an arm of this sweep"):
        report_text(bare, baseline="x")
    record_space(bare, {**LOSSES, "local": LOSSES["e2e"]})  # both have a KL term
    assert "No verdict: cannot tell the baseline arm (no arm qualifies" in report_text(bare)


def test_report_says_plainly_when_the_run_is_toy_scale(tmp_path, no_plots):
    record_space(tmp_path)
    for arm, trial_id, l0, ce, tokens in [("local", "l0", 10.0, 1.5, 8192), ("e2e", "e0", 5.0, 1.6, 8192)]:
        metrics = {EVAL_L0: l0, EVAL_CE_LOSS_INCREASE: ce, "train/tokens_seen": tokens}
        write_trial_record(
            tmp_path, {"arm": arm, "trial_id": trial_id, "status": "finished", "metrics": metrics}
        )
    text = report_text(tmp_path)
    assert "**Toy-scale run.** Each SAE trained on at most 8,192 tokens" in text
    assert "CE-loss increases (1.5-1.6 nats/token)" in text and "search_spaces/e2e_gpt2.yaml" in text
    stored = json.loads((build_report(tmp_path).parent / "verdict.json").read_text())
    assert stored["toy_scale"] is True and stored["max_train_tokens_per_sae"] == 8192
    big = {EVAL_L0: 5.0, EVAL_CE_LOSS_INCREASE: 0.1, "train/tokens_seen": 400_000 * 1024}
    for arm, trial_id in [("local", "l0"), ("e2e", "e0")]:
        write_trial_record(tmp_path, {"arm": arm, "trial_id": trial_id, "status": "finished", "metrics": big})
    assert "Toy-scale" not in report_text(tmp_path)


def test_plot_error_bars_are_the_recorded_standard_errors():
    import pandas as pd

    points = pd.DataFrame({EVAL_L0: [1.0, 2.0], se_name(EVAL_L0): [0.5, float("nan")]})
    assert sweep.report._errors(points, EVAL_L0).tolist() == [0.5, 0.0]
    assert sweep.report._errors(points, EVAL_CE_LOSS_INCREASE) is None


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
    record_space(tmp_path)
    text = build_report(tmp_path).read_text()
    assert "The two frontiers' CE loss increase ranges do not overlap." in text
    assert (
        "**e2e vs local: inconclusive** (1 and 1 finished points" in text
        and "the frontiers share no CE-loss increase" in text
    )


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
