"""Tests for sweep.pareto: expected values worked out by hand (docs/design.md §8)."""

import math

import numpy as np
import pandas as pd
import pytest

from sweep.pareto import (
    frontiers,
    hypervolume_2d,
    interpolate_x_at_y,
    l0_ratio_at_matched_ce,
    non_dominated,
    shared_reference_point,
)


def points(xy, **extra):
    return pd.DataFrame({"x": [p[0] for p in xy], "y": [p[1] for p in xy], **extra})


def as_tuples(df):
    return list(zip(df["x"].tolist(), df["y"].tolist(), strict=False))


def test_frontier_drops_dominated_trial():
    # (3,4) is dominated by (2,3); (2,3.5) by (2,3): equal x, larger y
    df = points([(3, 4), (1, 5), (4, 1), (2, 3.5), (2, 3)])
    assert as_tuples(non_dominated(df, "x", "y")) == [(1, 5), (2, 3), (4, 1)]


def test_frontier_drops_equal_y_at_larger_x():
    df = points([(1, 2), (3, 2)])
    assert as_tuples(non_dominated(df, "x", "y")) == [(1, 2)]


def test_frontier_keeps_one_of_exact_duplicates():
    df = points([(2, 3), (1, 5), (2, 3)], trial_id=["a", "b", "c"])
    front = non_dominated(df, "x", "y")
    assert as_tuples(front) == [(1, 5), (2, 3)]
    assert front["trial_id"].tolist() == ["b", "a"]  # the first of the duplicates


def test_frontier_drops_nan_rows():
    df = points([(np.nan, 0.0), (1, 5), (0.5, np.nan), (2, 3)])
    assert as_tuples(non_dominated(df, "x", "y")) == [(1, 5), (2, 3)]


def test_frontiers_split_by_arm():
    df = points([(1, 5), (2, 6), (3, 1), (4, 0.5)], arm=["a", "a", "b", "b"])
    fronts = frontiers(df, "x", "y")
    assert list(fronts) == ["a", "b"]
    assert as_tuples(fronts["a"]) == [(1, 5)]
    assert as_tuples(fronts["b"]) == [(3, 1), (4, 0.5)]


def test_interpolation_is_linear_in_log_x():
    front = points([(1, 5), (100, 1)])
    # y=3 is halfway from 5 to 1: log x = 0.5*log 100 -> x = 10; y=4: 100**0.25 = 3.1623
    got = interpolate_x_at_y(front, "x", "y", [3, 4, 5, 1, 6, 0.5])
    np.testing.assert_allclose(got[:4], [10.0, math.sqrt(10), 1.0, 100.0])
    assert np.isnan(got[4]) and np.isnan(got[5])


def test_interpolation_linear_in_x_when_asked():
    front = points([(1, 5), (100, 1)])
    np.testing.assert_allclose(interpolate_x_at_y(front, "x", "y", [3], log_x=False), [50.5])


def test_interpolation_picks_the_right_segment():
    front = points([(1, 4), (10, 2), (1000, 1)])
    # y=1.5: halfway between (10,2) and (1000,1) in log10 x: 1 + 0.5*2 = 2 -> x = 100
    np.testing.assert_allclose(interpolate_x_at_y(front, "x", "y", [1.5]), [100.0])


def test_ratio_table_on_hand_made_frontiers():
    fronts = {"local": points([(10, 0.4), (100, 0.2)]), "e2e": points([(5, 0.3), (20, 0.1)])}
    table = l0_ratio_at_matched_ce(fronts, targets=[0.3, 0.25, 0.2, 0.5], x="x", y="y")
    assert list(table.columns) == ["ce_loss_increase", "L0_local", "L0_e2e", "ratio"]
    # local at 0.3: halfway in log -> sqrt(10*100); at 0.25: 10**1.75; e2e at 0.25: 5*4**0.25
    np.testing.assert_allclose(table["L0_local"][:3], [math.sqrt(1000), 10**1.75, 100.0])
    np.testing.assert_allclose(table["L0_e2e"][:3], [5.0, 5 * math.sqrt(2), 10.0])
    np.testing.assert_allclose(table["ratio"][:3], [math.sqrt(1000) / 5, 10**1.75 / (5 * math.sqrt(2)), 10.0])
    assert table.iloc[3][["L0_local", "L0_e2e", "ratio"]].isna().all()


def test_ratio_default_targets_span_the_overlap():
    fronts = {"local": points([(10, 0.4), (100, 0.2)]), "e2e": points([(5, 0.3), (20, 0.1)])}
    table = l0_ratio_at_matched_ce(fronts, x="x", y="y")
    # overlap of [0.2, 0.4] and [0.1, 0.3] is [0.2, 0.3]
    np.testing.assert_allclose(table["ce_loss_increase"], [0.2, 0.225, 0.25, 0.275, 0.3])
    assert table["ratio"].iloc[0] == pytest.approx(10.0)
    assert table["ratio"].iloc[-1] == pytest.approx(math.sqrt(1000) / 5)


def test_ratio_table_empty_without_overlap():
    fronts = {"local": points([(10, 0.9), (100, 0.5)]), "e2e": points([(5, 0.3), (20, 0.1)])}
    table = l0_ratio_at_matched_ce(fronts, x="x", y="y")
    assert table.empty
    assert list(table.columns) == ["ce_loss_increase", "L0_local", "L0_e2e", "ratio"]


def test_ratio_names_a_missing_arm():
    with pytest.raises(KeyError, match="e2e"):
        l0_ratio_at_matched_ce({"local": points([(1, 1)])}, x="x", y="y")


def test_hypervolume_of_three_point_frontier():
    front = points([(1, 5), (2, 3), (4, 1)])
    # (2-1)*(6-5) + (4-2)*(6-3) + (5-4)*(6-1) = 1 + 6 + 5
    assert hypervolume_2d(front, "x", "y", (5, 6)) == pytest.approx(12.0)


def test_hypervolume_ignores_points_beyond_reference_and_dominated_ones():
    front = points([(1, 5), (2, 3), (4, 1), (6, 0.5), (3, 4)])
    # (6, 0.5) is beyond ref x; (3, 4) is dominated
    assert hypervolume_2d(front, "x", "y", (5, 6)) == pytest.approx(12.0)
    # ref (3, 6): only (1,5),(2,3) inside: 1*1 + 1*3
    assert hypervolume_2d(front, "x", "y", (3, 6)) == pytest.approx(4.0)
    assert hypervolume_2d(front, "x", "y", (0.5, 6)) == 0.0


def test_shared_reference_point_is_1_1_times_max_over_arms():
    dfs = {"a": points([(1, 5), (2, 3)]), "b": points([(10, 1), (np.nan, 100)])}
    assert shared_reference_point(dfs, "x", "y") == pytest.approx((11.0, 5.5))
    with pytest.raises(ValueError):
        shared_reference_point([points([(np.nan, 1)])], "x", "y")
