"""Non-dominated sets, L0 at matched CE increase, hypervolume (docs/design.md §8).

Pure numpy/pandas over a results table (`sweep.results.load_results`): no Ray, no torch.
Both objectives are minimized throughout (eval L0 or alive dictionary elements on x, eval
CE-loss increase in nats/token on y).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from sparsify.metric_names import EVAL_CE_LOSS_INCREASE, EVAL_L0

RATIO_TARGET_COLUMN = "ce_loss_increase"
RATIO_COLUMN = "ratio"


def _finite_xy(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The rows whose x and y are finite numbers (NaN and infinities dropped)."""
    xs = pd.to_numeric(df[x], errors="coerce").to_numpy(dtype=float)
    ys = pd.to_numeric(df[y], errors="coerce").to_numpy(dtype=float)
    return df[np.isfinite(xs) & np.isfinite(ys)]


def non_dominated(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The non-dominated rows of `df`, minimizing both `x` and `y` (docs/design.md §8).

    A row is dominated if another row is <= on both columns and < on at least one. Of rows
    with exactly equal (x, y) the first is kept. Rows with a NaN or infinite x or y are
    dropped first.

    Args:
        df: Any table with numeric columns `x` and `y` (e.g. finished trials of one arm).
        x: Column on the horizontal axis, e.g. `EVAL_L0`.
        y: Column on the vertical axis, e.g. `EVAL_CE_LOSS_INCREASE`.

    Returns:
        The non-dominated rows (original index kept), sorted by x ascending; y is then
        strictly decreasing.

    Raises:
        KeyError: If `x` or `y` is not a column of `df`.
    """
    df = _finite_xy(df, x, y)
    # sort by x then y (stable, so the first of equal rows wins), then keep each row that
    # strictly improves on the best y seen so far: every earlier row has x <= this one's
    ordered = df.sort_values([x, y], kind="stable")
    ys = ordered[y].to_numpy(dtype=float)
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], ys]))[:-1]
    return ordered[ys < best_before]


def frontiers(df: pd.DataFrame, x: str, y: str, arm_col: str = "arm") -> dict[str, pd.DataFrame]:
    """The frontier of each arm: its non-dominated set, sorted by x (docs/design.md §8).

    Args:
        df: A results table (pass finished trials only: see `sweep.results.finished`).
        x: Column on the horizontal axis.
        y: Column on the vertical axis.
        arm_col: Column naming the arm of each row.

    Returns:
        Arm name -> its frontier (`non_dominated`), arms in sorted order.
    """
    return {str(arm): non_dominated(group, x, y) for arm, group in df.groupby(arm_col, sort=True)}


def frontier_arrays(
    xs: np.ndarray | Sequence[float], ys: np.ndarray | Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """`non_dominated` on plain arrays (the bootstrap refits frontiers thousands of times).

    Args:
        xs: Shape (n,), the minimized x values (e.g. L0).
        ys: Shape (n,), the minimized y values (e.g. CE increase, nats/token).

    Returns:
        (x, y) of the non-dominated finite points, sorted by x ascending (y strictly
        decreasing); of exactly equal points the first is kept, as in `non_dominated`.
    """
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    order = np.lexsort((ys, xs))  # by x, then y; stable
    xs, ys = xs[order], ys[order]
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], ys]))[:-1]
    return xs[ys < best_before], ys[ys < best_before]


def _log_x_points(xs: np.ndarray, ys: np.ndarray, log_x: bool) -> tuple[np.ndarray, np.ndarray]:
    """Frontier arrays with x <= 0 dropped when `log_x`: log L0 is undefined at L0 = 0 (a dead
    SAE), so such a point cannot anchor a segment."""
    if not log_x:
        return xs, ys
    keep = xs > 0
    return xs[keep], ys[keep]


def x_at_y(
    xs: np.ndarray, ys: np.ndarray, y_targets: Sequence[float] | np.ndarray, log_x: bool = True
) -> np.ndarray:
    """`interpolate_x_at_y` on frontier arrays (from `frontier_arrays`): NaN outside [min y, max y]."""
    targets = np.asarray(y_targets, dtype=float)
    xs, ys = _log_x_points(xs, ys, log_x)
    result = np.full(targets.shape, np.nan)
    if len(xs) == 0:
        return result
    xs, ys = xs[::-1], ys[::-1]  # y ascending for np.interp
    inside = (targets >= ys[0]) & (targets <= ys[-1])
    values = np.log(xs) if log_x else xs
    interpolated = np.interp(targets[inside], ys, values)
    result[inside] = np.exp(interpolated) if log_x else interpolated
    return result


def y_at_x(
    xs: np.ndarray, ys: np.ndarray, x_targets: Sequence[float] | np.ndarray, log_x: bool = True
) -> np.ndarray:
    """The y (e.g. CE increase) a frontier reaches at each target x (e.g. L0), docs/design.md §8.

    For a target x between consecutive frontier points x_i <= x <= x_j, linear in log x:
    `y(x) = y_i + (log x - log x_i) / (log x_j - log x_i) * (y_j - y_i)` (in x itself with
    `log_x=False`). Targets outside [min x, max x] give NaN: nothing is extrapolated.

    Args:
        xs: Frontier x values, ascending (from `frontier_arrays`).
        ys: Frontier y values, strictly decreasing.
        x_targets: The target x values.
        log_x: Interpolate linearly in log(x) (the default); x <= 0 is then left out.

    Returns:
        Float array, one y per target.
    """
    targets = np.asarray(x_targets, dtype=float)
    xs, ys = _log_x_points(xs, ys, log_x)
    result = np.full(targets.shape, np.nan)
    if len(xs) == 0:
        return result
    inside = (targets >= xs[0]) & (targets <= xs[-1])
    if log_x:
        result[inside] = np.interp(np.log(targets[inside]), np.log(xs), ys)
    else:
        result[inside] = np.interp(targets[inside], xs, ys)
    return result


def _df_arrays(df: pd.DataFrame, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """The frontier arrays of a table's columns `x` and `y`."""
    xs = pd.to_numeric(df[x], errors="coerce").to_numpy(dtype=float)
    ys = pd.to_numeric(df[y], errors="coerce").to_numpy(dtype=float)
    return frontier_arrays(xs, ys)


def interpolate_x_at_y(
    frontier: pd.DataFrame, x: str, y: str, y_targets: Sequence[float] | np.ndarray, log_x: bool = True
) -> np.ndarray:
    """The x (e.g. L0) a frontier needs to reach each target y (e.g. CE increase), docs/design.md §8.

    Along a frontier y decreases as x increases. For a target t between consecutive frontier
    points (x_i, y_i) and (x_j, y_j) with y_j <= t <= y_i, the segment is linear in log x:

        f = (y_i - t) / (y_i - y_j)
        x(t) = exp(log x_i + f * (log x_j - log x_i)) = x_i * (x_j / x_i) ** f

    (with `log_x=False`, x(t) = x_i + f * (x_j - x_i)). A target equal to a frontier point's
    y gives that point's x. Targets outside [min y, max y] of the frontier give NaN. With
    `log_x`, points with x <= 0 are left out (log undefined). The frontier is re-derived with
    `non_dominated`, so dominated rows passed in do not matter.

    Args:
        frontier: Table with columns `x` and `y` (normally one arm's frontier).
        x: Column interpolated, e.g. `EVAL_L0`.
        y: Column the targets are on, e.g. `EVAL_CE_LOSS_INCREASE` (nats/token).
        y_targets: The target y values.
        log_x: Interpolate linearly in log(x) (the default) rather than in x.

    Returns:
        Float array, one x per target, NaN where a target is outside the frontier's y range.
    """
    return x_at_y(*_df_arrays(frontier, x, y), y_targets, log_x=log_x)


def overlap(a: np.ndarray, b: np.ndarray) -> tuple[float, float] | None:
    """The range two sets of values both cover, [max of minima, min of maxima], or None when
    they do not overlap (or either is empty)."""
    if len(a) == 0 or len(b) == 0:
        return None
    low, high = max(float(np.min(a)), float(np.min(b))), min(float(np.max(a)), float(np.max(b)))
    return (low, high) if low <= high else None


def l0_ratio_at_matched_ce(
    frontiers: Mapping[str, pd.DataFrame],
    numerator: str = "local",
    denominator: str = "e2e",
    targets: Sequence[float] | np.ndarray | None = None,
    x: str = EVAL_L0,
    y: str = EVAL_CE_LOSS_INCREASE,
    n_targets: int = 5,
) -> pd.DataFrame:
    """L0 each arm needs at matched CE-loss increase, and their ratio (docs/design.md §8).

    L0 values come from `interpolate_x_at_y` (linear in log L0 along each frontier).

    Args:
        frontiers: Arm -> frontier, as from `frontiers`.
        numerator: Arm whose L0 is divided (the paper: "local").
        denominator: Arm divided by (the paper: "e2e").
        targets: CE-increase targets (nats/token). By default `n_targets` evenly spaced
            values from the larger of the two frontiers' minimum y to the smaller of their
            maximum y, i.e. spanning the overlap of their y ranges.
        x: The L0 column.
        y: The CE-increase column.
        n_targets: Number of default targets.

    Returns:
        Columns "ce_loss_increase" (the target), "L0_<numerator>", "L0_<denominator>",
        "ratio" (numerator L0 / denominator L0; NaN where either is NaN). Empty (same
        columns) when no targets are given and the frontiers' y ranges do not overlap.

    Raises:
        KeyError: If either arm is missing from `frontiers`.
    """
    for arm in (numerator, denominator):
        if arm not in frontiers:
            raise KeyError(f"arm {arm!r} has no frontier (arms: {', '.join(sorted(frontiers))})")
    num_col, den_col = f"L0_{numerator}", f"L0_{denominator}"
    if targets is None:
        _, y_num = _log_x_points(*_df_arrays(frontiers[numerator], x, y), log_x=True)
        _, y_den = _log_x_points(*_df_arrays(frontiers[denominator], x, y), log_x=True)
        shared = overlap(y_num, y_den)
        if shared is None:
            targets = np.array([])
        else:
            low, high = shared
            targets = np.linspace(low, high, n_targets if high > low else 1)
    targets = np.asarray(targets, dtype=float)
    l0_num = interpolate_x_at_y(frontiers[numerator], x, y, targets)
    l0_den = interpolate_x_at_y(frontiers[denominator], x, y, targets)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = l0_num / l0_den
    return pd.DataFrame({RATIO_TARGET_COLUMN: targets, num_col: l0_num, den_col: l0_den, RATIO_COLUMN: ratio})


def hypervolume_2d(frontier: pd.DataFrame, x: str, y: str, ref_point: tuple[float, float]) -> float:
    """Area dominated by a frontier and bounded by a reference point, minimizing both (docs/design.md §8).

    With the non-dominated points strictly inside the reference box sorted by x ascending
    (so y descending), (x_1, y_1) ... (x_n, y_n), and x_{n+1} = ref x:

        hypervolume = sum_i (x_{i+1} - x_i) * (ref_y - y_i)

    Points with x >= ref x or y >= ref y contribute nothing. Units: x units times y units
    (e.g. L0 x nats/token); compare arms only against one shared reference point.

    Args:
        frontier: Table with columns `x` and `y` (dominated rows are allowed and ignored).
        x: Column on the horizontal axis.
        y: Column on the vertical axis.
        ref_point: (ref x, ref y), e.g. from `shared_reference_point`.

    Returns:
        The area; 0.0 when no point lies inside the reference box.
    """
    ref_x, ref_y = float(ref_point[0]), float(ref_point[1])
    points = _finite_xy(frontier, x, y)
    points = points[(points[x].astype(float) < ref_x) & (points[y].astype(float) < ref_y)]
    points = non_dominated(points, x, y)
    xs = points[x].to_numpy(dtype=float)
    ys = points[y].to_numpy(dtype=float)
    widths = np.diff(np.append(xs, ref_x))
    return float(np.sum(widths * (ref_y - ys)))


def shared_reference_point(
    dfs: Mapping[str, pd.DataFrame] | Iterable[pd.DataFrame], x: str, y: str
) -> tuple[float, float]:
    """One hypervolume reference point for all arms (docs/design.md §8).

    On each axis: the maximum over all arms' finite points, times 1.1, so that every point,
    including each arm's extreme ones, dominates a box of nonzero area. (Computed as
    max + 0.1 * |max|, which equals 1.1 * max for the positive maxima real trials have and
    still lies beyond a negative maximum.)

    Args:
        dfs: Arm -> table, or an iterable of tables (pass all finished trials, not only the
            frontiers, so the point does not move when a frontier changes shape).
        x: Column on the horizontal axis.
        y: Column on the vertical axis.

    Returns:
        (ref x, ref y).

    Raises:
        ValueError: If no table has a finite (x, y) point.
    """
    tables = list(dfs.values()) if isinstance(dfs, Mapping) else list(dfs)
    points = [_finite_xy(df, x, y) for df in tables]
    points = [p for p in points if len(p)]
    if not points:
        raise ValueError(f"no finite ({x}, {y}) point to build a reference point from")
    max_x = max(float(p[x].astype(float).max()) for p in points)
    max_y = max(float(p[y].astype(float).max()) for p in points)
    return max_x + 0.1 * abs(max_x), max_y + 0.1 * abs(max_y)
