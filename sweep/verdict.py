"""The verdict: each arm against the baseline arm, with bootstrap intervals (docs/design.md §8, §14).

For every arm other than the baseline, three matched comparisons, each inside the range both
frontiers cover (never extrapolated):

- L0 ratio at matched CE-loss increase: baseline L0 / arm L0 at one CE-loss increase t
  (> 1: the arm needs fewer active dictionary elements per token);
- CE-loss increase difference at matched L0: baseline CE increase - arm CE increase at one L0
  (> 0: the arm's CE-loss increase is lower), nats/token;
- alive-dictionary-elements ratio at matched CE-loss increase: baseline alive / arm alive.

The matched point is the middle of the two frontiers' overlap (arithmetic in CE-loss increase,
geometric in L0, the axis frontiers are interpolated in, §8). The interval is a percentile
bootstrap (`sweep.bootstrap`): eval sequences are resampled (paired across trials), replicates
(seeds) within each point, and the frontiers refit in each resample. Pure numpy: no Ray, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sweep.bootstrap import Point, bootstrap_draws, sequence_draws
from sweep.pareto import frontier_arrays, overlap, x_at_y, y_at_x

CONFIDENCE = 0.90
"""Two-sided coverage of every interval."""
N_BOOTSTRAP = 2000
"""Resamples per report; the percentile ends of 2,000 draws move by ~1% between seeds."""
MIN_DEFINED = 0.5
"""A matched quantity whose point falls outside a frontier in more than half the resamples has
no interval worth stating: the comparison sits at an edge of a frontier."""

RATIO, DIFFERENCE = "ratio", "difference"
L0_RATIO = "l0_ratio_at_matched_ce_increase"
CE_DIFFERENCE = "ce_increase_difference_at_matched_l0"
ALIVE_RATIO = "alive_ratio_at_matched_ce_increase"


@dataclass(frozen=True)
class Estimate:
    """One matched quantity with its interval.

    Attributes:
        name: `L0_RATIO`, `CE_DIFFERENCE` or `ALIVE_RATIO`.
        kind: `RATIO` (no difference = 1) or `DIFFERENCE` (no difference = 0).
        at: The matched value: a CE-loss increase (nats/token) or an L0.
        value: The quantity on the observed frontiers.
        low: Lower end of the `CONFIDENCE` interval (NaN when too few resamples define it).
        high: Upper end.
        baseline_value: The baseline's L0 / CE increase / alive at `at`.
        arm_value: The arm's.
        defined_fraction: Share of resamples in which `at` lay inside both frontiers.
    """

    name: str
    kind: str
    at: float
    value: float
    low: float
    high: float
    baseline_value: float
    arm_value: float
    defined_fraction: float

    @property
    def stable(self) -> bool:
        return self.defined_fraction >= MIN_DEFINED and math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def includes_no_difference(self) -> bool:
        null = 1.0 if self.kind == RATIO else 0.0
        return self.low <= null <= self.high

    @property
    def conclusive(self) -> bool:
        return self.stable and not self.includes_no_difference


@dataclass
class Comparison:
    """One arm against the baseline: the estimates, the verdict sentence, and what to run next."""

    arm: str
    baseline: str
    estimates: dict[str, Estimate] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """Why a quantity could not be stated (no overlap, interval includes no difference)."""
    next_steps: list[str] = field(default_factory=list)
    text: str = ""
    n_points: tuple[int, int] = (0, 0)
    """Finished points of the baseline and of the arm."""
    max_seeds: int = 1
    """The most replicates (seeds) any of those points has."""

    @property
    def conclusive(self) -> bool:
        return bool(self.estimates) and not self.problems

    @property
    def status(self) -> str:
        """`conclusive` (every quantity stated, none includes no difference), `partly conclusive`
        (some quantity excludes no difference, something else could not be stated) or
        `inconclusive`."""
        if self.conclusive:
            return "conclusive"
        if any(est.conclusive for est in self.estimates.values()):
            return "partly conclusive"
        return "inconclusive"

    def to_json(self) -> dict[str, Any]:
        return {
            "arm": self.arm,
            "baseline": self.baseline,
            "status": self.status,
            "conclusive": self.conclusive,
            "verdict": self.text,
            "points": {self.baseline: self.n_points[0], self.arm: self.n_points[1]},
            "max_seeds_per_point": self.max_seeds,
            "estimates": {name: {**asdict(est), **MEANING[name]} for name, est in self.estimates.items()},
            "problems": self.problems,
            "next_steps": self.next_steps,
        }


MEANING = {
    L0_RATIO: {
        "value_is": "baseline L0 / arm L0; > 1: the arm needs fewer",
        "at_axis": "eval/ce_loss_increase (nats/token)",
    },
    CE_DIFFERENCE: {
        "value_is": "baseline - arm CE-loss increase (nats/token); > 0: the arm's is lower",
        "at_axis": "eval/L0",
    },
    ALIVE_RATIO: {
        "value_is": "baseline alive / arm alive; > 1: the arm uses fewer",
        "at_axis": "eval/ce_loss_increase (nats/token)",
    },
}
"""How to read each estimate in `verdict.json`."""

Statistic = Callable[[np.ndarray, np.ndarray], float]
"""(baseline points, arm points), each shape (n_points, 3) -> one matched quantity."""


def _ratio_at(t: float, column: int) -> Statistic:
    """Baseline / arm value of `column` (0: L0, 2: alive) on the frontiers against CE-loss
    increase, at CE-loss increase `t`."""

    def stat(base: np.ndarray, arm: np.ndarray) -> float:
        b = x_at_y(*frontier_arrays(base[:, column], base[:, 1]), [t])[0]
        a = x_at_y(*frontier_arrays(arm[:, column], arm[:, 1]), [t])[0]
        return b / a if a > 0 else math.nan

    return stat


def _ce_difference_at(l0: float) -> Statistic:
    def stat(base: np.ndarray, arm: np.ndarray) -> float:
        b = y_at_x(*frontier_arrays(base[:, 0], base[:, 1]), [l0])[0]
        a = y_at_x(*frontier_arrays(arm[:, 0], arm[:, 1]), [l0])[0]
        return b - a

    return stat


def _interval(stat: Statistic, base_draws: np.ndarray, arm_draws: np.ndarray) -> tuple[float, float, float]:
    """(low, high, defined fraction) of `stat` over paired resamples."""
    values = np.array([stat(b, a) for b, a in zip(base_draws, arm_draws, strict=True)])
    finite = values[np.isfinite(values)]
    defined = len(finite) / max(len(values), 1)
    if defined < MIN_DEFINED or len(finite) < 2:
        return math.nan, math.nan, defined
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high), defined


def _mid(shared: tuple[float, float], geometric: bool) -> float:
    low, high = shared
    return math.sqrt(low * high) if geometric else (low + high) / 2


def _frontier_points(points: np.ndarray) -> np.ndarray:
    """The (L0, CE increase) frontier of an arm's point means, shape (k, 2), L0 > 0."""
    xs, ys = frontier_arrays(points[:, 0], points[:, 1])
    return np.column_stack([xs, ys])[xs > 0]


def _span(points: np.ndarray, column: int) -> str:
    return f"{points[:, column].min():.3g}-{points[:, column].max():.3g}"


def compare(
    arm: str,
    baseline: str,
    arm_points: Sequence[Point],
    baseline_points: Sequence[Point],
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = 0,
) -> Comparison:
    """One arm against the baseline: the three matched quantities with intervals, the verdict
    sentence, and what to run next when something cannot be stated.

    Args:
        arm: The arm compared.
        baseline: The baseline arm.
        arm_points: The arm's finished points (`points_from_records`).
        baseline_points: The baseline's.
        n_bootstrap: Resamples (`bootstrap_draws`).
        seed: Seeds the resampling, so a report is reproducible.

    Returns:
        The comparison; `text` is its verdict paragraph.
    """
    result = Comparison(arm=arm, baseline=baseline, n_points=(len(baseline_points), len(arm_points)))
    result.max_seeds = max((len(p.replicates) for p in [*baseline_points, *arm_points]), default=1)
    if not arm_points or not baseline_points:
        missing = arm if not arm_points else baseline
        result.problems.append(f"{missing} has no finished trial")
        result.next_steps.append(f"run {missing}'s trials to the end (see the trial counts below)")
        result.text = f"**{arm} vs {baseline}: inconclusive.** {result.problems[0]}; {result.next_steps[0]}."
        return result
    base = np.array([p.means() for p in baseline_points])
    mine = np.array([p.means() for p in arm_points])
    rng = np.random.default_rng(seed)
    sequences = sequence_draws([*baseline_points, *arm_points], n_bootstrap, rng)
    base_draws = bootstrap_draws(baseline_points, n_bootstrap, rng, sequences)
    arm_draws = bootstrap_draws(arm_points, n_bootstrap, rng, sequences)
    fixed = [p.trial_id for p in [*baseline_points, *arm_points] if not p.resamplable]
    if fixed:
        # nothing to resample: every draw would equal the estimate, a zero-width "interval"
        result.problems.append(
            f"{len(fixed)} of the {len(baseline_points) + len(arm_points)} finished trials have one seed and "
            "no per-sequence eval values (records of an older version), so no interval can be given"
        )
        result.next_steps.append("rerun those trials (or the sweep) with this version")

    def estimate(name: str, kind: str, at: float, stat: Statistic, values: tuple[float, float]) -> Estimate:
        low, high, defined = (
            _interval(stat, base_draws, arm_draws) if not fixed else (math.nan, math.nan, 1.0)
        )
        est = Estimate(name, kind, at, stat(base, mine), low, high, values[0], values[1], defined)
        result.estimates[name] = est
        return est

    fb, fa = frontier_arrays(base[:, 0], base[:, 1]), frontier_arrays(mine[:, 0], mine[:, 1])
    ce_shared = overlap(fb[1][fb[0] > 0], fa[1][fa[0] > 0])
    l0_shared = overlap(fb[0][fb[0] > 0], fa[0][fa[0] > 0])
    ab, aa = frontier_arrays(base[:, 2], base[:, 1]), frontier_arrays(mine[:, 2], mine[:, 1])
    alive_shared = overlap(ab[1][ab[0] > 0], aa[1][aa[0] > 0])
    if ce_shared is not None:
        t = _mid(ce_shared, geometric=False)
        estimate(L0_RATIO, RATIO, t, _ratio_at(t, 0), (x_at_y(*fb, [t])[0], x_at_y(*fa, [t])[0]))
    if l0_shared is not None:
        x = _mid(l0_shared, geometric=True)
        estimate(
            CE_DIFFERENCE, DIFFERENCE, x, _ce_difference_at(x), (y_at_x(*fb, [x])[0], y_at_x(*fa, [x])[0])
        )
    if alive_shared is not None:
        t = _mid(alive_shared, geometric=False)
        estimate(ALIVE_RATIO, RATIO, t, _ratio_at(t, 2), (x_at_y(*ab, [t])[0], x_at_y(*aa, [t])[0]))
    _explain(result, base, mine, ce_shared, l0_shared)
    result.text = verdict_text(result)
    return result


def _explain(
    result: Comparison,
    base: np.ndarray,
    mine: np.ndarray,
    ce_shared: tuple[float, float] | None,
    l0_shared: tuple[float, float] | None,
) -> None:
    """Fill `problems` and `next_steps`: why a headline quantity cannot be stated, and the
    trials that would settle it."""
    arm, baseline = result.arm, result.baseline
    # every range and hint is the frontiers' (a dominated trial says nothing about the gap)
    fa, fb = _frontier_points(mine), _frontier_points(base)
    ranges = (
        f"{arm}'s frontier spans L0 {_span(fa, 0)} at CE-loss increase {_span(fa, 1)} nats/token, "
        f"{baseline}'s L0 {_span(fb, 0)} at {_span(fb, 1)}"
    )
    if ce_shared is None and len(fa) and len(fb):
        result.problems.append(f"the frontiers share no CE-loss increase ({ranges})")
        worse, better = (arm, baseline) if fa[:, 1].min() > fb[:, 1].max() else (baseline, arm)
        worse_pts, better_pts = (fa, fb) if worse == arm else (fb, fa)
        result.next_steps.append(
            # arm-neutral: a ReLU arm moves its sparsity coefficient, a TopK arm its k, a fine-tune its sources
            f"aim {worse} at higher L0 (targets above {worse_pts[:, 0].max():.3g}) or "
            f"{better} at lower L0 (targets below {better_pts[:, 0].min():.3g}) until their CE-loss increases overlap"
        )
    if l0_shared is None and len(fa) and len(fb):
        said = ce_shared is None  # the ranges are in the sentence before
        result.problems.append(f"the frontiers share no L0 range{'' if said else f' ({ranges})'}")
        low, high = (fa, fb) if fa[:, 0].max() < fb[:, 0].min() else (fb, fa)
        result.next_steps.append(
            f"add L0 targets between {low[:, 0].max():.3g} and {high[:, 0].min():.3g} for both arms"
        )
    for est in result.estimates.values():
        label = _LABELS[est.name]
        if est.defined_fraction >= MIN_DEFINED and not est.stable:
            continue  # no interval at all (nothing to resample): said once, above
        if not est.stable:
            result.problems.append(
                f"{label} is undefined in {1 - est.defined_fraction:.0%} of resamples (the matched point "
                "sits at the edge of a frontier)"
            )
            result.next_steps.append(f"add trials on both sides of {_at_text(est)} for both arms")
        elif est.includes_no_difference and est.name != ALIVE_RATIO:
            result.problems.append(f"the {CONFIDENCE:.0%} interval of the {label} includes no difference")
            result.next_steps.append(
                f"more trials near {_at_text(est)}, `seeds: 3`, or a larger eval_n_samples narrow it"
            )


_LABELS = {
    L0_RATIO: "L0 ratio at matched CE-loss increase",
    CE_DIFFERENCE: "CE-loss increase difference at matched L0",
    ALIVE_RATIO: "alive-elements ratio at matched CE-loss increase",
}


def _at_text(est: Estimate) -> str:
    if est.name == CE_DIFFERENCE:
        return f"L0 {est.at:.3g}"
    return f"CE-loss increase {est.at:.3g}"


def _ratio_phrase(est: Estimate, what: str) -> str:
    """'2.4x (90% CI 1.9-3.1) fewer <what>' or, below 1, the inverse as 'more'."""
    if est.value >= 1:
        return f"{est.value:.3g}x ({CONFIDENCE:.0%} CI {est.low:.3g}-{est.high:.3g}) fewer {what}"
    return f"{1 / est.value:.3g}x ({CONFIDENCE:.0%} CI {1 / est.high:.3g}-{1 / est.low:.3g}) more {what}"


def verdict_text(result: Comparison) -> str:
    """The verdict paragraph of one comparison, e.g. "At a CE-loss increase of 0.15
    nats/token, e2e needs 2.4x (90% CI 1.9-3.1) fewer active dictionary elements per token
    than local (L0 27 vs 66); at L0 30 its CE-loss increase is 0.09 nats lower (90% CI
    0.06-0.12)." Quantities that cannot be stated are left out, and the paragraph then says
    "inconclusive", why, and what to run next."""
    arm, baseline = result.arm, result.baseline
    est = result.estimates
    sentences = []
    ratio, diff, alive = est.get(L0_RATIO), est.get(CE_DIFFERENCE), est.get(ALIVE_RATIO)
    if ratio is not None and ratio.stable:
        sentences.append(
            f"At a CE-loss increase of {ratio.at:.3g} nats/token, {arm} needs "
            f"{_ratio_phrase(ratio, 'active dictionary elements per token')} than {baseline} "
            f"(L0 {ratio.arm_value:.3g} vs {ratio.baseline_value:.3g})"
        )
    if diff is not None and diff.stable:
        direction = "lower" if diff.value >= 0 else "higher"
        low, high = (diff.low, diff.high) if diff.value >= 0 else (-diff.high, -diff.low)
        sentences.append(
            f"at L0 {diff.at:.3g} its CE-loss increase is {abs(diff.value):.3g} nats/token {direction} "
            f"({CONFIDENCE:.0%} CI {low:.3g} to {high:.3g}; {diff.arm_value:.3g} vs {diff.baseline_value:.3g})"
        )
    if alive is not None and alive.stable:
        sentences.append(
            f"at a CE-loss increase of {alive.at:.3g} it uses {_ratio_phrase(alive, 'alive dictionary elements')} "
            f"({alive.arm_value:.3g} vs {alive.baseline_value:.3g}"
            + ("; the interval includes no difference)" if alive.includes_no_difference else ")")
        )
    body = "; ".join(sentences)
    if body:
        body = body[0].upper() + body[1:] + "."
    seeds = "1 seed each" if result.max_seeds == 1 else f"up to {result.max_seeds} seeds each"
    head = (
        f"**{arm} vs {baseline}: {result.status}** ({result.n_points[1]} and {result.n_points[0]} finished "
        f"points, {seeds})."
    )
    parts = [head, body]
    if result.problems:
        parts.append(
            ("Not stated" if body else "Inconclusive") + " because " + "; ".join(result.problems) + "."
        )
        parts.append("Next: " + "; ".join(dict.fromkeys(result.next_steps)) + ".")
    return " ".join(p for p in parts if p)


METHOD = (
    f"{CONFIDENCE:.0%} intervals are percentile bootstrap intervals ({N_BOOTSTRAP} resamples, "
    "seed 0). Each resample draws the eval sequences with replacement, once for all trials (they "
    "are evaluated on the same sequences, so the draw is paired; a sequence's L0 and CE-loss "
    "increase stay together), and for every finished point its replicate seeds with replacement; "
    "the point is the mean over its drawn replicates; the "
    "frontiers are refit and the matched quantities recomputed. Matched points are the middle of the "
    "two frontiers' overlap (CE-loss increase: arithmetic; L0: geometric), interpolated linearly in "
    "log L0 and never extrapolated; resamples in which the matched point leaves a frontier are left "
    "out (a quantity undefined in over half of them is not stated). Alive counts have no per-sequence "
    "values: they vary across seeds only. With one seed per point the intervals cover eval noise, "
    "not seed-to-seed variation (`seeds: N` adds it)."
)
