"""The verdict's matched comparisons and their bootstrap intervals (sweep/verdict.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sweep.baseline import baseline_arm
from sweep.bootstrap import Point, Replicate, bootstrap_draws
from sweep.verdict import ALIVE_RATIO, CE_DIFFERENCE, L0_RATIO, compare

# a synthetic world where the truth is known: baseline CE increase(L0) = C0 - S ln L0, and the
# arm reaches the same CE increase with RATIO x fewer active elements: CE_arm(L0) = C0 - S ln(RATIO L0)
C0, S, RATIO = 1.2, 0.25, 2.5
TRUE_DIFFERENCE = S * math.log(RATIO)  # baseline CE - arm CE at any L0, nats/token


def _points(
    l0s: np.ndarray, ratio: float, rng: np.random.Generator, n_seq: int = 64, seeds: int = 1
) -> list[Point]:
    """Points on the true curve, each replicate with per-sequence noise (unbiased means) and a
    per-seed offset."""
    points = []
    for i, l0 in enumerate(l0s):
        reps = []
        for _ in range(seeds):
            seed_shift = rng.normal(0, 0.01) if seeds > 1 else 0.0
            ce = C0 - S * math.log(ratio * l0) + seed_shift
            seq_l0 = l0 * (1 + rng.normal(0, 0.15, n_seq))
            seq_ce = ce + rng.normal(0, 0.15, n_seq)
            reps.append(Replicate(seq_l0, seq_ce, alive=200.0 / ratio + l0))
        points.append(Point(f"t{i}", tuple(reps)))
    return points


def test_interval_covers_the_true_ratio_and_difference_in_at_least_85_of_100_replications():
    covered_ratio = covered_difference = 0
    for replication in range(100):
        rng = np.random.default_rng(replication)
        base = _points(np.geomspace(10, 100, 6), 1.0, rng)
        arm = _points(np.geomspace(5, 50, 6), RATIO, rng)
        result = compare("e2e", "local", arm, base, n_bootstrap=400, seed=replication)
        ratio, diff = result.estimates[L0_RATIO], result.estimates[CE_DIFFERENCE]
        covered_ratio += ratio.low <= RATIO <= ratio.high
        covered_difference += diff.low <= TRUE_DIFFERENCE <= diff.high
    print(
        f"coverage of the 90% intervals over 100 replications: ratio {covered_ratio}, difference {covered_difference}"
    )
    assert covered_ratio >= 85
    assert covered_difference >= 85


def test_overlapping_frontiers_give_the_verdict_sentence_with_numbers():
    rng = np.random.default_rng(0)
    base = _points(np.geomspace(10, 100, 6), 1.0, rng, n_seq=256)
    arm = _points(np.geomspace(5, 50, 6), RATIO, rng, n_seq=256)
    result = compare("e2e", "local", arm, base, n_bootstrap=500)
    ratio = result.estimates[L0_RATIO]
    assert result.conclusive and result.problems == []
    assert ratio.value == pytest.approx(RATIO, rel=0.15)
    assert ratio.low < ratio.value < ratio.high and ratio.low > 1
    assert (
        f"At a CE-loss increase of {ratio.at:.3g} nats/token, e2e needs {ratio.value:.2g}x (90% CI"
        in result.text
    )
    assert "fewer active dictionary elements per token than local" in result.text
    assert "nats/token lower" in result.text
    assert result.text.startswith("**e2e vs local: conclusive** (6 and 6 finished points, 1 seed each).")
    meaning = result.to_json()["estimates"][L0_RATIO]
    assert meaning["at_axis"] == "eval/ce_loss_increase (nats/token)" and meaning["value_is"].startswith(
        "baseline L0 / arm L0"
    )
    assert result.to_json()["points"] == {"local": 6, "e2e": 6}
    # the alive view: baseline alive = 200 + L0, arm 80 + L0 at the same CE increase
    assert result.estimates[ALIVE_RATIO].value > 1
    alive = result.estimates[ALIVE_RATIO]
    assert (
        f"fewer alive dictionary elements ({alive.arm_value:.3g} vs {alive.baseline_value:.3g})."
        in result.text
    )


def test_an_alive_ratio_whose_interval_includes_one_says_so_without_spoiling_the_verdict():
    rng = np.random.default_rng(7)
    base = _points(np.geomspace(10, 100, 6), 1.0, rng, n_seq=256)
    arm = _points(np.geomspace(5, 50, 6), RATIO, rng, n_seq=256)
    for points in (base, arm):  # alive the same function of CE increase on both sides: ratio 1
        points[:] = [
            Point(
                p.trial_id,
                tuple(
                    Replicate(r.l0, r.ce_increase, 300 * math.exp(-r.ce_increase.mean()))
                    for r in p.replicates
                ),
            )
            for p in points
        ]
    result = compare("e2e", "local", arm, base, n_bootstrap=300)
    assert result.estimates[ALIVE_RATIO].includes_no_difference and result.status == "conclusive"
    assert "; the interval includes no difference)." in result.text


def test_a_worse_arm_is_described_with_more_and_higher():
    rng = np.random.default_rng(1)
    base = _points(np.geomspace(10, 100, 6), 1.0, rng, n_seq=256)
    arm = _points(np.geomspace(20, 200, 6), 1 / RATIO, rng, n_seq=256)
    result = compare("e2e", "local", arm, base, n_bootstrap=500)
    assert result.estimates[L0_RATIO].value == pytest.approx(1 / RATIO, rel=0.15)
    assert "more active dictionary elements per token than local" in result.text
    assert "nats/token higher" in result.text


def test_frontiers_that_do_not_overlap_are_inconclusive_and_say_what_to_run():
    rng = np.random.default_rng(2)
    base = _points(np.geomspace(10, 20, 3), 1.0, rng)  # CE increase ~0.45-0.62
    arm = _points(np.geomspace(200, 400, 3), 1.0, rng)  # CE increase ~-0.3 - -0.12, L0 disjoint too
    result = compare("e2e", "local", arm, base, n_bootstrap=200)
    assert not result.conclusive
    assert L0_RATIO not in result.estimates and CE_DIFFERENCE not in result.estimates
    assert "inconclusive" in result.text
    assert "share no CE-loss increase" in result.text and "share no L0 range" in result.text
    assert result.text.count("frontier spans L0") == 1  # the ranges once, not for each axis
    # local's CE increase is the higher: local at higher L0 (above its max), or e2e at lower L0
    max_local = max(p.means()[0] for p in base)
    min_e2e, max_e2e = min(p.means()[0] for p in arm), max(p.means()[0] for p in arm)
    assert (
        f"aim local at higher L0 (targets above {max_local:.3g}) or e2e at lower L0 (targets below {min_e2e:.3g})"
        in result.text
    )
    assert f"add L0 targets between {max_local:.3g} and {min_e2e:.3g} for both arms" in result.text  # the gap
    assert max_e2e > min_e2e


def _plain(l0: float, ce: float, name: str = "p") -> Point:
    """A point as an older record gives it: one seed, eval means only."""
    return Point(name, (Replicate(np.array([l0]), np.array([ce]), alive=100.0),))


def test_the_advice_reads_the_frontiers_not_dominated_trials():
    # local's frontier (CE 0.1-0.2) lies below e2e's (0.3-0.4); a dominated local trial at
    # (200, 0.5) must not make local look like the worse arm
    base = [_plain(10, 0.2), _plain(100, 0.1), _plain(200, 0.5)]
    arm = [_plain(5, 0.4), _plain(50, 0.3)]
    result = compare("e2e", "local", arm, base, n_bootstrap=50)
    assert "aim e2e at higher L0 (targets above 50) or local at lower L0 (targets below 10)" in result.text
    assert "local's L0 10-100 at 0.1-0.2" in result.text


def test_records_without_per_sequence_values_give_no_zero_width_interval():
    rng = np.random.default_rng(5)
    base = [_plain(l0, C0 - S * math.log(l0)) for l0 in np.geomspace(10, 100, 4)]
    arm = _points(np.geomspace(5, 50, 4), RATIO, rng)
    result = compare("e2e", "local", arm, base, n_bootstrap=100)
    ratio = result.estimates[L0_RATIO]
    assert math.isnan(ratio.low) and math.isnan(ratio.high) and not result.conclusive
    assert result.status == "inconclusive"
    assert "4 of the 8 finished trials have one seed and no per-sequence eval values" in result.text
    assert "(90% CI" not in result.text and "undefined in" not in result.text


def test_one_conclusive_quantity_beside_a_missing_one_is_partly_conclusive():
    # e2e better everywhere: at matched L0 its CE increase is lower, but local never reaches
    # e2e's CE increases, so there is no L0 ratio at matched CE increase
    rng = np.random.default_rng(6)
    base = _points(np.geomspace(10, 30, 3), 1.0, rng, n_seq=128)  # CE 0.35-0.62
    arm = _points(np.geomspace(10, 30, 3), 20.0, rng, n_seq=128)  # CE -0.4 - -0.13
    result = compare("e2e", "local", arm, base, n_bootstrap=300)
    assert result.status == "partly conclusive" and L0_RATIO not in result.estimates
    assert result.text.startswith(
        "**e2e vs local: partly conclusive** (3 and 3 finished points, 1 seed each). At L0 17."
    )
    assert (
        "nats/token lower" in result.text
        and "Not stated because the frontiers share no CE-loss increase" in result.text
    )
    assert result.to_json()["status"] == "partly conclusive"


def test_an_interval_that_includes_no_difference_is_inconclusive():
    rng = np.random.default_rng(3)
    base = _points(np.geomspace(10, 100, 5), 1.0, rng, n_seq=8)
    arm = _points(np.geomspace(10, 100, 5), 1.0, rng, n_seq=8)  # the same curve
    result = compare("e2e", "local", arm, base, n_bootstrap=400)
    assert not result.conclusive
    assert "interval of the L0 ratio at matched CE-loss increase includes no difference" in result.text
    assert "`seeds: 3`" in result.text


def test_an_arm_without_finished_trials_is_inconclusive():
    rng = np.random.default_rng(4)
    result = compare("e2e", "local", [], _points(np.geomspace(10, 100, 3), 1.0, rng))
    assert result.text == (
        "**e2e vs local: inconclusive.** e2e has no finished trial; "
        "run e2e's trials to the end (see the trial counts below)."
    )


def test_bootstrap_resamples_sequences_within_and_seeds_across_replicates():
    # two replicates whose sequences are constant: every draw's value is the mean of a draw of
    # {1, 3} (replicates), so only 1, 2 and 3 can occur, in proportions 1:2:1
    reps = (
        Replicate(np.full(4, 1.0), np.full(4, 0.5), 10.0),
        Replicate(np.full(4, 3.0), np.full(4, 0.7), 30.0),
    )
    draws = bootstrap_draws([Point("p", reps)], 4000, np.random.default_rng(0))
    assert draws.shape == (4000, 1, 3)
    values, counts = np.unique(draws[:, 0, 0], return_counts=True)
    assert values.tolist() == [1.0, 2.0, 3.0]
    assert counts / 4000 == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    # paired: a draw's CE increase follows its L0 (replicate 1 always brings 0.5 and 10 alive)
    assert np.allclose(draws[:, 0, 1], 0.5 + (draws[:, 0, 0] - 1) * 0.1)
    assert np.allclose(draws[:, 0, 2], 10 + (draws[:, 0, 0] - 1) * 10)
    # one replicate: the mean over resampled sequences, whose spread is the standard error
    seqs = np.arange(100, dtype=float)
    one = bootstrap_draws([Point("q", (Replicate(seqs, seqs, 1.0),))], 4000, np.random.default_rng(1))
    assert one[:, 0, 0].mean() == pytest.approx(seqs.mean(), abs=0.2)
    assert one[:, 0, 0].std() == pytest.approx(seqs.std() / math.sqrt(100), rel=0.06)


def test_baseline_is_the_arm_without_kl_or_downstream_terms():
    losses = {
        "local": {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}},
        "e2e": {"sparsity": {"coeff": 1.0}, "logits_kl": {"coeff": 1.0}, "out_to_in": {"coeff": 0.0}},
        "ds": {"sparsity": {"coeff": 1.0}, "logits_kl": {"coeff": 0.5}, "in_to_orig": {"total_coeff": 1.0}},
    }
    assert baseline_arm(losses) == "local"
    assert baseline_arm(losses, named="e2e") == "e2e"
    assert baseline_arm({"only": losses["e2e"]}) is None
    # a logits_kl term with coeff 0 is absent; a searched one is present
    off = {**losses, "e2e": {**losses["e2e"], "logits_kl": {"coeff": 0.0}}}
    with pytest.raises(ValueError, match=r"arms local, e2e all qualify: .*; name it with `baseline: <arm>`"):
        baseline_arm(off)
    assert baseline_arm(off, searched={"e2e": ["loss.logits_kl.coeff"]}) == "local"
    # `set` values count as the arm's loss: a KL term switched on (or off) there
    plain = {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}}
    assert (
        baseline_arm({"local": plain, "e2e": plain}, fixed={"e2e": {"loss.logits_kl.coeff": 1.0}}) == "local"
    )
    assert (
        baseline_arm(
            off, fixed={"e2e": {"loss.logits_kl": None}, "local": {"loss.in_to_orig.total_coeff": 2}}
        )
        == "e2e"
    )
    with pytest.raises(ValueError, match="no arm qualifies"):
        baseline_arm({"a": losses["e2e"], "b": losses["ds"]})
    with pytest.raises(ValueError, match="baseline 'x' is not an arm; arms: local, e2e, ds"):
        baseline_arm(losses, named="x")
