"""Matched-point search (`strategy: match`, docs/design.md §7, §13, §14): an Optuna sampler that
aims one parameter of each arm (by default its sparsity coefficient) at given values of one
metric (eval L0, or the eval CE-loss increase), so that every arm puts its trials at the same
points and the frontiers overlap where they are compared.

It is an Optuna `BaseSampler`, plugged into the arm's `OptunaSearch` (`sweep.tuner.arm_tuner`)
like any other sampler: Tune keeps scheduling, concurrency, failures and resume, and the
sampler keeps no state of its own: every decision is read from the study (its COMPLETE trials,
the targets RUNNING trials aim at, the targets found unreachable), which lives in the arm's
journal file, so a resumed sweep, or a new sampler on the same study, proposes what an
uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial, TrialState

from sparsify import metric_names as names

if TYPE_CHECKING:
    from optuna.study import Study

    from sweep.space import SearchSpace

HIT_TOLERANCE = 0.15
"""A target is hit by a trial whose metric m has |m / target - 1| <= this."""
SLOPE_RANGE = (0.2, 4.0)
"""Magnitude bounds of a measured slope d log(metric) / d log(parameter)."""
PRIOR_SLOPE = 1.0
"""Magnitude of the slope assumed with one usable trial (L0 ∝ 1/c, CE increase ∝ c)."""
BRACKET_MARGIN = 0.1
"""A bracketed target's proposal stays this fraction (of the bracket, in log parameter) inside
the bracketing trials, so that it never repeats one of them."""
REPEAT_TOLERANCE = 1e-3
"""Parameter values closer than this in log are one point: the sampler never proposes one again."""
METRIC_DIRECTION = {names.EVAL_L0: -1, names.EVAL_CE_LOSS_INCREASE: 1}
"""How each target metric moves as the sparsity coefficient grows: L0 falls, the CE increase
rises."""

TARGET_ATTR = "match:target"
"""Trial system attribute: the metric value the trial's parameter was aimed at."""
MODE_ATTR = "match:mode"
"""Trial system attribute: `target` (aimed at an unhit target), `densify` (every target hit or
being aimed at: aimed at the target or midpoint between targets farthest from every trial) or
`random` (no reachable target left: the fallback sampler drew it)."""
UNREACHABLE_ATTR = "match:unreachable"
"""Trial system attribute: targets found unreachable while proposing this trial (the proposal
was clipped to a bound that a complete trial already sits at); no later trial aims at them."""


@dataclass(frozen=True)
class Observation:
    """One trial as the sampler sees it: parameter value `c`, metric value `m`."""

    c: float
    m: float


@dataclass(frozen=True)
class ParamRange:
    """The searched range of the matched parameter."""

    low: float
    high: float
    log: bool
    """Loguniform (True) or uniform (False)."""

    @property
    def floor(self) -> float:
        """The smallest positive value the secant works with (it works in log parameter): `low`,
        or for a uniform range from 0 or below, 1e-4 of the range (a proposal below it goes to
        `low`)."""
        return self.low if self.low > 0 else (self.high - self.low) * 1e-4

    def midpoint(self, a: float, b: float) -> float:
        """Geometric midpoint for a loguniform range, arithmetic for a uniform one."""
        if self.log:
            return math.sqrt(a * b)
        return (a + b) / 2

    def same(self, a: float, b: float) -> bool:
        """Whether two parameter values are one point: within `REPEAT_TOLERANCE` in log (above
        the floor), so proposing `a` would repeat the trial at `b`."""
        return abs(math.log(max(a, self.floor)) - math.log(max(b, self.floor))) < REPEAT_TOLERANCE

    def at_bound(self, value: float) -> float | None:
        """The bound `value` sits at, or None."""
        tolerance = 1e-9 * (self.high - self.low)
        for bound in (self.low, self.high):
            if math.isclose(value, bound, rel_tol=1e-9, abs_tol=tolerance):
                return bound
        return None


def is_hit(observations: Iterable[Observation], target: float, tolerance: float = HIT_TOLERANCE) -> bool:
    """Whether some trial's metric lies within `tolerance` (relative) of `target`."""
    return any(abs(o.m / target - 1) <= tolerance for o in observations)


def log_distance(values: Iterable[float], target: float) -> float:
    """min |log m - log target| over the positive values m; inf if there is none (a value <= 0,
    a CE increase at a near-zero coefficient, counts as the lower end, infinitely far)."""
    return min((abs(math.log(m / target)) for m in values if m > 0), default=math.inf)


def densify_candidates(targets: Sequence[float]) -> list[float]:
    """The targets and the geometric midpoints between consecutive ones, ascending."""
    ordered = sorted(targets)
    middles = [math.sqrt(a * b) for a, b in zip(ordered, ordered[1:], strict=False)]
    return sorted(ordered + middles)


def secant_slope(a: Observation, b: Observation, floor: float) -> float:
    """d log m / d log c between two trials (m > 0 both)."""
    return math.log(a.m / b.m) / (math.log(max(a.c, floor)) - math.log(max(b.c, floor)))


def propose(observations: Sequence[Observation], target: float, space: ParamRange, direction: int) -> float:
    """The parameter value aimed at `target`, from the trials so far (see `MatchSampler`).

    Args:
        observations: Complete trials (and the running trials' aims).
        target: The metric value to aim at (> 0).
        space: The parameter's range.
        direction: -1 if the metric falls as the parameter grows (L0), +1 if it rises (CE increase).

    Returns:
        A value in [space.low, space.high].
    """
    if not observations:
        return space.midpoint(space.low, space.high)
    positive = [o for o in observations if o.m > 0]
    if not positive:
        # every trial is at the metric's lower end (a CE increase <= 0, an L0 of 0): the targets
        # lie where the metric rises, beyond the trial nearest that side: bisect toward the bound
        if direction > 0:
            return space.midpoint(max(o.c for o in observations), space.high)
        return space.midpoint(space.low, min(o.c for o in observations))

    def x(c: float) -> float:
        return math.log(max(c, space.floor))

    def dist(o: Observation) -> float:
        return abs(math.log(o.m / target)) if o.m > 0 else math.inf

    nearest = min(positive, key=lambda o: (dist(o), o.c))
    above = [o for o in positive if o.m > target]
    below = [o for o in observations if o.m <= target]
    a = min(above, key=lambda o: (dist(o), o.c)) if above else None
    # of the trials at the lower end (m <= 0), the one nearest the others in c
    b = min(below, key=lambda o: (dist(o), -direction * o.c)) if below else None

    # the slope: of the bracketing pair when the target is bracketed, else of the two trials
    # nearest the target in log m (with different parameter values), else the prior
    pair: tuple[Observation, Observation] | None = None
    if a is not None and b is not None and b.m > 0 and x(a.c) != x(b.c):
        pair = (a, b)
    else:
        ranked = sorted(positive, key=lambda o: (dist(o), o.c))
        second = next((o for o in ranked[1:] if abs(x(o.c) - x(nearest.c)) > 1e-12), None)
        pair = (nearest, second) if second is not None else None
    slope = direction * PRIOR_SLOPE
    if pair is not None:
        measured = secant_slope(*pair, space.floor)
        if math.isfinite(measured) and measured * direction > 0:  # a wrong sign is noise: prior
            slope = direction * min(max(abs(measured), SLOPE_RANGE[0]), SLOPE_RANGE[1])
    new_x = x(nearest.c) + math.log(target / nearest.m) / slope

    # bracketed (and the bracket ordered as the metric's direction says): stay inside it
    if a is not None and b is not None and direction * (x(a.c) - x(b.c)) > 0:
        lo, hi = sorted((x(a.c), x(b.c)))
        margin = BRACKET_MARGIN * (hi - lo)
        new_x = min(max(new_x, lo + margin), hi - margin)

    value = math.exp(new_x)
    if value < space.floor:
        return space.low
    return min(max(value, space.low), space.high)


@dataclass(frozen=True)
class Plan:
    """What the sampler proposes for one trial."""

    value: float | None
    """The parameter value, or None: the fallback sampler draws it."""
    target: float | None
    mode: str
    """`target`, `densify` or `random` (`MODE_ATTR`)."""
    unreachable: list[float]
    """Targets found unreachable on the way (`UNREACHABLE_ATTR`)."""


class MatchSampler(BaseSampler):
    """Aims one parameter (a sparsity coefficient) at metric targets (L0 or CE increase).

    The relation it relies on: L0 falls monotonically as the sparsity coefficient c grows (the
    CE increase rises), up to noise, roughly linearly in log-log (log m ≈ a + s·log c).

    Each proposal reads the study: its COMPLETE trials with a finite metric (c_i, m_i), the
    targets its RUNNING trials aim at (`TARGET_ATTR`, set when proposed) and the targets marked
    unreachable (`UNREACHABLE_ATTR`). Then:

    1. Which target. A target t is hit when some complete trial has |m/t - 1| <= 15%. The
       emptiest target is aimed at: of the unhit ones that no running trial aims at (and not
       unreachable), the one farthest in |log m - log t| from its nearest trial (ties, e.g. with
       no trial yet: the one nearest the middle of the targets in log). When there is none, the
       sampler densifies: of the targets and the geometric midpoints between consecutive ones,
       not aimed at by a running trial, the one farthest from every trial and running aim.
    2. Which value. The running trials count as trials at their aims (a "constant liar", so
       that concurrent trials spread out even before any completes). With two or more trials,
       a local secant in (log c, log m): its slope from the pair bracketing t (the nearest
       above and below in log m), else from the two trials nearest t in log m; a slope of the
       wrong sign becomes the prior, and its magnitude is clamped to [0.2, 4]. The step starts
       at the trial nearest t: log c = log c_n + (log t - log m_n) / slope, which interpolates
       when t is bracketed (kept 10% inside the bracket) and extrapolates otherwise. With one
       trial the slope is the prior, -1 for L0 (L0 ∝ 1/c) and +1 for the CE increase. With
       none, the midpoint of the range (geometric for loguniform, arithmetic for uniform).
       The value is clipped to the range; when it is clipped to a bound that a complete trial
       already sits at, the target is beyond the range: it is marked unreachable and the next
       target is taken. With no reachable target left, the fallback sampler draws the value.
    3. log m is used only where m > 0: a metric <= 0 (a CE increase at a near-zero
       coefficient) counts as the lower end, below every target.

    Trials with a fixed value of the parameter (`initial_points`, enqueued) are not aimed; they
    count once complete. Other parameters are drawn by the fallback sampler.

    Args:
        param: The matched parameter's name in the study (its dotted path).
        low: Its lower bound.
        high: Its upper bound.
        log: Whether it is searched loguniform (else uniform).
        metric: The target metric, a key of `METRIC_DIRECTION`.
        objective_index: The metric's index in the study's values (its objectives).
        targets: The metric values to aim at (> 0).
        seed: Seeds the default fallback sampler.
        fallback: The sampler of every other parameter, and of this one when no target is
            reachable; by default `RandomSampler(seed)`.
        tolerance: Relative distance at which a trial hits a target.
        integer: The parameter is an integer (`int` in the search space, e.g. a TopK SAE's k):
            searched as an Optuna `IntDistribution`, interpolated in log like a loguniform
            one, each proposal rounded to the nearest whole value.
        denser: The parameter moves the metric the other way from a sparsity coefficient:
            raising it raises L0 and lowers the CE increase (`DENSER_PARAMS`, e.g. `saes.k`).
    """

    def __init__(
        self,
        param: str,
        low: float,
        high: float,
        log: bool,
        metric: str,
        objective_index: int,
        targets: Sequence[float],
        seed: int | None = None,
        fallback: BaseSampler | None = None,
        tolerance: float = HIT_TOLERANCE,
        integer: bool = False,
        denser: bool = False,
    ) -> None:
        if metric not in METRIC_DIRECTION:
            raise ValueError(f"cannot match {metric!r}; matchable metrics: {', '.join(METRIC_DIRECTION)}")
        if not targets or any(not (t > 0 and math.isfinite(t)) for t in targets):
            raise ValueError(f"targets must be positive and finite (got {list(targets)})")
        if log and low <= 0:
            raise ValueError(f"a loguniform range needs low > 0 (got {low:g})")
        self.param = param
        self.space = ParamRange(float(low), float(high), log)
        self.metric = metric
        self.direction = -METRIC_DIRECTION[metric] if denser else METRIC_DIRECTION[metric]
        self.objective_index = objective_index
        self.targets = sorted(set(float(t) for t in targets))
        self.tolerance = tolerance
        self.fallback = fallback if fallback is not None else RandomSampler(seed=seed)
        self.integer = integer
        self._distribution: BaseDistribution = (
            IntDistribution(int(low), int(high))
            if integer
            else FloatDistribution(float(low), float(high), log=log)
        )

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if self.param in trial.system_attrs.get("fixed_params", {}):
            return {}  # an enqueued point (initial_points) sets it
        return {self.param: self._distribution}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if self.param not in search_space:
            return {}
        plan = self.plan(study.get_trials(deepcopy=False), trial.number)
        storage, trial_id = study._storage, trial._trial_id
        if plan.unreachable:
            storage.set_trial_system_attr(trial_id, UNREACHABLE_ATTR, plan.unreachable)
        storage.set_trial_system_attr(trial_id, MODE_ATTR, plan.mode)
        if plan.value is None:
            return {}  # sample_independent: the fallback draws it
        storage.set_trial_system_attr(trial_id, TARGET_ATTR, plan.target)
        return {self.param: int(plan.value) if self.integer else plan.value}

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.fallback.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.fallback.before_trial(study, trial)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.fallback.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.fallback.reseed_rng()

    def observations(self, trials: Iterable[FrozenTrial]) -> list[Observation]:
        """(parameter, metric) of the complete trials with a finite metric."""
        found = []
        for t in trials:
            if t.state != TrialState.COMPLETE or self.param not in t.params or t.values is None:
                continue
            if len(t.values) <= self.objective_index:
                continue
            m = t.values[self.objective_index]
            if m is not None and math.isfinite(m):
                found.append(Observation(float(t.params[self.param]), float(m)))
        return found

    def plan(self, trials: Sequence[FrozenTrial], current: int) -> Plan:
        """The proposal for trial number `current`, from the study's `trials` (see the class
        docstring)."""
        observed = self.observations(trials)
        running = [
            t
            for t in trials
            if t.state in (TrialState.RUNNING, TrialState.WAITING)
            and t.number != current
            and TARGET_ATTR in t.system_attrs
        ]
        aims = [float(t.system_attrs[TARGET_ATTR]) for t in running]
        liars = [
            Observation(float(t.params[self.param]), float(t.system_attrs[TARGET_ATTR]))
            for t in running
            if self.param in t.params
        ]
        unreachable = {float(v) for t in trials for v in t.system_attrs.get(UNREACHABLE_ATTR, [])}
        center = math.log(min(self.targets) * max(self.targets)) / 2

        def order(candidates: Iterable[float], near: Sequence[float]) -> list[float]:
            return sorted(candidates, key=lambda t: (-log_distance(near, t), abs(math.log(t) - center), t))

        observed_m = [o.m for o in observed]
        unhit = [
            t
            for t in self.targets
            if not is_hit(observed, t, self.tolerance) and t not in aims and t not in unreachable
        ]
        choices = [(t, "target") for t in order(unhit, observed_m)]
        spare = [t for t in densify_candidates(self.targets) if t not in aims and t not in unreachable]
        choices += [(t, "densify") for t in order(spare, observed_m + aims)]

        marked: list[float] = []
        for target, mode in choices:
            if target in marked:
                continue
            value = propose(observed + liars, target, self.space, self.direction)
            if self.integer:  # e.g. a TopK SAE's k: the nearest whole value in the range
                value = float(min(max(round(value), self.space.low), self.space.high))
            bound = self.space.at_bound(value)
            if bound is not None and any(self.space.at_bound(o.c) == bound for o in observed):
                marked.append(target)  # beyond the range: the bound's trial already missed it
                continue
            if any(self.space.same(value, o.c) for o in observed + liars):
                # a trial (or a running one) already sits there: training is deterministic in
                # the seed, so it would train the same SAE again (noise that breaks the
                # monotone fit, or a densify point already hit): try the next target instead
                continue
            return Plan(value, target, mode, marked)
        return Plan(None, None, "random", marked)


DENSER_PARAMS = ("saes.k",)
"""Parameters that raise L0 (and lower the CE increase) as they grow: a TopK/BatchTopK SAE's k
is its L0."""


def match_sampler(space: SearchSpace, arm_name: str) -> MatchSampler:
    """The `MatchSampler` of one arm of a `strategy: match` search space, seeded by its `seed`."""
    match = space.match_targets
    if match is None:
        raise ValueError("the search space's strategy is not match")
    metric, targets = match
    arm = space.arms[arm_name]
    dist = arm.search[arm.match_param]
    assert dist.low is not None and dist.high is not None  # the schema requires them
    return MatchSampler(
        param=arm.match_param,
        low=dist.low,
        high=dist.high,
        log=dist.type in ("loguniform", "int"),
        metric=metric,
        objective_index=space.metrics.index(metric),
        targets=targets,
        seed=space.seed,
        integer=dist.type == "int",
        denser=arm.match_param in DENSER_PARAMS,
    )
