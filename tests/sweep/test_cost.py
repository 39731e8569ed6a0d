"""Tests for sweep.cost: per-arm costs, init_from chains and the compute view, on hand-made records."""

import json
import math
from dataclasses import dataclass
from typing import Any

import pytest

from sparsify.metric_names import (
    COST_DEVICE_SECONDS,
    COST_TRAIN_FLOPS,
    EVAL_CE_LOSS_INCREASE,
    EVAL_L0,
    TIME_FIT_END_S,
    TIME_FIT_START_S,
    TIME_TRAIN_STEPS_S,
    TIME_WORKER_FN_S,
    TIME_WORKER_PROCESS_S,
)
from sweep.cost import (
    TOTAL_FLOPS,
    TOTAL_SECONDS,
    CostView,
    arm_costs,
    matched_l0,
    train_time_fractions,
    trial_costs,
)
from sweep.pareto import frontiers
from sweep.records import Status, TrialRecord, write_trial_record
from sweep.report import build_report, markdown_table
from sweep.results import finished, results_table


@dataclass(frozen=True)
class FineTuned(TrialRecord):
    """A record with the fine-tuning arm's `init_from` (whether or not TrialRecord has it yet)."""

    init_from: dict[str, Any] | None = None


def _record(
    arm, trial_id, flops=None, seconds=None, l0=None, ce=None, status: Status = "finished", source=None
):
    metrics = {}
    if flops is not None:
        metrics |= {COST_TRAIN_FLOPS: flops, COST_DEVICE_SECONDS: seconds}
    if l0 is not None:
        metrics |= {EVAL_L0: l0, EVAL_CE_LOSS_INCREASE: ce}
    return FineTuned(arm, trial_id, status, metrics=metrics, init_from=source)


RECORDS = [
    _record("local", "l1", 100.0, 1.0, l0=10.0, ce=0.3),
    _record("local", "l2", 100.0, 1.0, l0=40.0, ce=0.1),
    _record("local", "l_err", status="error"),  # no metrics: counted as a trial, not in the sums
    _record("e2e", "e1", 300.0, 3.0, l0=10.0, ce=0.2),
    _record("e2e", "e2", 300.0, 3.0, l0=40.0, ce=0.05),
    # fine-tuned from local/l2; f2 from f1 (a chain); f3 from a trial with no record
    _record("ft", "f1", 20.0, 0.5, l0=20.0, ce=0.15, source={"arm": "local", "trial": "l2"}),
    _record("ft", "f2", 10.0, 0.5, l0=30.0, ce=0.12, source={"arm": "ft", "trial": "f1"}),
    _record("ft", "f3", 5.0, 0.25, l0=50.0, ce=0.08, source={"arm": "local", "trial": "gone"}),
]


def _by_trial(costs) -> dict[str, dict[str, Any]]:
    return {row["trial_id"]: row for row in costs.to_dict(orient="records")}


def test_fine_tuned_trial_cost_includes_its_source_chain():
    costs = _by_trial(trial_costs(RECORDS))
    assert costs["f1"][TOTAL_FLOPS] == 20.0 + 100.0  # own + local/l2
    assert costs["f2"][TOTAL_FLOPS] == 10.0 + 20.0 + 100.0  # own + f1's total
    assert costs["f2"][TOTAL_SECONDS] == 0.5 + 0.5 + 1.0
    assert costs["f3"][TOTAL_FLOPS] == 5.0 and "local/gone" in costs["f3"]["cost_note"]
    assert costs["l1"][TOTAL_FLOPS] == 100.0 and costs["l1"]["cost_note"] == ""
    assert math.isnan(costs["l_err"][TOTAL_FLOPS])


def test_records_without_init_from_cost_their_own():
    plain = [TrialRecord("local", "a", "finished", metrics={COST_TRAIN_FLOPS: 7.0, COST_DEVICE_SECONDS: 2.0})]
    costs = trial_costs(plain)
    assert costs[TOTAL_FLOPS].tolist() == [7.0] and costs["init_from"].tolist() == [""]


def test_per_arm_sums_of_total_costs():
    per_arm = {row[0]: list(row[1:]) for row in arm_costs(trial_costs(RECORDS)).itertuples(index=False)}
    assert per_arm["local"] == [3, 2, 200.0, 2.0]
    assert per_arm["e2e"] == [2, 2, 600.0, 6.0]
    # 120 + 130 + 5 FLOPs; 1.5 + 2.0 + 0.25 device-seconds
    assert per_arm["ft"] == [3, 3, 255.0, 3.75]


def _view(records=RECORDS):
    done = finished(results_table(records))
    fronts = frontiers(done, EVAL_L0, EVAL_CE_LOSS_INCREASE)
    return CostView.of(records, done, fronts, sorted(fronts)), fronts


def test_compute_view_table_at_a_common_matched_l0():
    view, fronts = _view()
    # L0 ranges: local [10, 40], e2e [10, 40], ft [20, 50]: all cover [20, 40]; geometric middle
    target = math.sqrt(20.0 * 40.0)
    assert matched_l0(fronts) == pytest.approx(target)
    table = view.matched.set_index("arm")
    # linear in log L0: local and e2e between L0 10 and 40, where log(target/10)/log(4) = 0.75
    assert table.loc["local", "ce_loss_increase"] == pytest.approx(0.3 + 0.75 * (0.1 - 0.3))
    assert table.loc["e2e", "ce_loss_increase"] == pytest.approx(0.2 + 0.75 * (0.05 - 0.2))
    # ft between L0 20 and 30
    frac = math.log(target / 20.0) / math.log(30.0 / 20.0)
    assert table.loc["ft", "ce_loss_increase"] == pytest.approx(0.15 + frac * (0.12 - 0.15))
    # mean total FLOPs per finished trial
    assert table["mean_train_flops_per_trial"].to_dict() == {"e2e": 300.0, "ft": 85.0, "local": 100.0}
    assert set(view.points["trial_id"]) == {"l1", "l2", "e1", "e2", "f1", "f2", "f3"}


def test_no_overlap_gives_no_matched_l0_and_says_so():
    records = [_record("a", "a1", 1.0, 1.0, l0=1.0, ce=0.5), _record("b", "b1", 1.0, 1.0, l0=100.0, ce=0.1)]
    view, _ = _view(records)
    assert view.matched["ce_loss_increase"].isna().all()
    assert "No L0 that every arm's frontier reaches" in view.section(markdown_table, plots=False, no_plot="-")


def test_section_and_json_name_the_totals_and_the_missing_source():
    view, _ = _view()
    text = view.section(markdown_table, plots=True, no_plot="")
    assert "## Cost" in text and "![CE loss increase vs training FLOPs](compute.png)" in text
    assert "| ft | 3 | 3 | 255 | 3.75 |" in text
    assert "ft/f3: source record local/gone missing" in text
    stored = view.to_json()
    assert stored["per_arm"][0] == {
        "arm": "e2e", "trials": 2, "trials_with_cost": 2, TOTAL_FLOPS: 600.0, TOTAL_SECONDS: 6.0,
    }  # fmt: skip
    assert len(stored["matched"]) == 3 and stored["notes"] == [
        "ft/f3: source record local/gone missing: own cost only"
    ]


def test_report_writes_the_compute_plot_and_verdict_cost(tmp_path):
    sweep = tmp_path / "sweep"
    for record in RECORDS[:5]:  # records as stored today: no init_from
        write_trial_record(
            sweep, TrialRecord(record.arm, record.trial_id, record.status, metrics=record.metrics)
        )
    report = build_report(sweep)
    assert (report.parent / "compute.png").read_bytes().startswith(b"\x89PNG")
    cost = json.loads((report.parent / "verdict.json").read_text())["cost"]
    assert {row["arm"]: row[TOTAL_FLOPS] for row in cost["per_arm"]} == {"e2e": 600.0, "local": 200.0}
    assert "## Cost" in report.read_text()


def test_a_point_costs_the_sum_of_its_replicates():
    from sweep.trial import replicate_means  # imports Ray: here, not at collection

    outcomes = [
        {"metrics": {COST_TRAIN_FLOPS: 100.0, COST_DEVICE_SECONDS: 2.0, EVAL_L0: 10.0}},
        {"metrics": {COST_TRAIN_FLOPS: 100.0, COST_DEVICE_SECONDS: 3.0, EVAL_L0: 20.0}},
    ]
    means = replicate_means(outcomes)
    assert (means[COST_TRAIN_FLOPS], means[COST_DEVICE_SECONDS], means[EVAL_L0]) == (200.0, 5.0, 15.0)


def _timed(arm, trial_id, wall, steps=None, device=None, status: Status = "finished"):
    metrics = {}
    if steps is not None:
        metrics[TIME_TRAIN_STEPS_S] = steps
    if device is not None:
        metrics[COST_DEVICE_SECONDS] = device
    return TrialRecord(arm, trial_id, status, metrics=metrics, wall_time_s=wall)


def test_fraction_of_wall_time_in_training_steps_per_arm():
    records = [
        _timed("local", "l1", wall=10.0, steps=2.0, device=9.0),  # time/train_steps_s wins
        _timed("local", "l2", wall=30.0, steps=6.0),
        _timed("local", "l_err", wall=50.0, steps=50.0, status="error"),  # not finished: left out
        _timed("local", "l_nowall", wall=None, steps=5.0),  # no wall time: left out
        _timed("e2e", "e1", wall=20.0, device=5.0),  # an older record: device-seconds instead
        _timed("e2e", "e2", wall=60.0, steps=45.0),
        _timed("stopped_only", "s1", wall=10.0, steps=1.0, status="stopped"),
    ]
    rows = {row["arm"]: row for row in train_time_fractions(records).to_dict(orient="records")}
    assert set(rows) == {"local", "e2e"}
    # local: (2 + 6) / (10 + 30) = 0.2; e2e: (5 + 45) / (20 + 60) = 0.625
    assert rows["local"] == {"arm": "local", "trials": 2, "train_steps_s": 8.0, "wall_time_s": 40.0,
                             "train_fraction": 0.2, "from_device_seconds": 0}  # fmt: skip
    assert rows["e2e"]["train_fraction"] == 0.625 and rows["e2e"]["from_device_seconds"] == 1


def test_section_and_json_show_the_training_fraction_and_name_its_source():
    records = [
        FineTuned("local", "l1", "finished", metrics={COST_TRAIN_FLOPS: 100.0, COST_DEVICE_SECONDS: 9.0,
                  TIME_TRAIN_STEPS_S: 2.0, EVAL_L0: 10.0, EVAL_CE_LOSS_INCREASE: 0.3}, wall_time_s=10.0),
        FineTuned("e2e", "e1", "finished", metrics={COST_TRAIN_FLOPS: 300.0, COST_DEVICE_SECONDS: 5.0,
                  EVAL_L0: 10.0, EVAL_CE_LOSS_INCREASE: 0.2}, wall_time_s=20.0),
    ]  # fmt: skip
    view, _ = _view(records)
    text = view.section(markdown_table, plots=False, no_plot="-")
    assert "### Time in training steps" in text and "`time/train_steps_s`" in text
    assert "| local | 1 | 2 | 10 | 0.2 |" in text and "| e2e | 1 | 5 | 20 | 0.25 |" in text
    assert "1 older trial(s) recorded no `time/train_steps_s`: they count `cost/device_seconds`" in text
    assert [row["train_fraction"] for row in view.to_json()["train_time"]] == [0.25, 0.2]  # e2e, local


def test_fit_times_from_wall_clock_stamps():
    from sweep.timing import fit_times

    worker = {"process_started_at": 95.0, "entered_at": 104.0, "returned_at": 150.5}
    assert fit_times(100.0, 152.0, worker) == {
        TIME_FIT_START_S: 4.0, TIME_WORKER_PROCESS_S: 9.0, TIME_WORKER_FN_S: 46.5, TIME_FIT_END_S: 1.5,
    }  # fmt: skip
