"""Search-space files (docs/design.md §7): schema, validation, and expansion into trial configs.

A search space names a base training config, one or more SAE types ("arms") each with its own
loss terms and searched parameters (dotted paths into the training config), the objectives,
the trial budget per arm, the resources per trial, and where results are stored. Every arm's
configs are validated as `TrainConfig`s before any trial starts, so a typo fails at load time.
`load_search_space` also reads the reference library's W&B sweep files (`sweep.wandb_sweep`).
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import random
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from sparsify import (
    SAFE_NAME,
    ConfigError,
    Seed,
    StrictModel,
    TrainConfig,
    read_yaml,
    validate_config,
    validate_model,
)
from sparsify import metric_names as names
from sweep.baseline import baseline_arm


class Distribution(StrictModel):
    type: Literal["loguniform", "uniform", "int", "categorical"]
    """loguniform / uniform over [low, high]; int over [low, high] inclusive; categorical over values."""
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None
    """Choices of a categorical parameter."""

    @model_validator(mode="after")
    def _well_formed(self) -> Distribution:
        if self.type == "categorical":
            if not self.values:
                raise ValueError("categorical needs a non-empty `values` list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs `low` and `high`")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError(f"int needs whole-number low and high (got {self.low:g}, {self.high:g})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low:g})")
        return self

    def corners(self) -> list[Any]:
        """Extreme values, for validating an arm before it runs."""
        if self.type == "categorical":
            return list(self.values or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]  # type: ignore[arg-type]
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":  # True == 1 in Python: a boolean matches only a boolean
            return any(
                v == value and isinstance(v, bool) == isinstance(value, bool) for v in self.values or []
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and not float(value).is_integer():
            return False
        return (self.low or 0.0) <= value <= (self.high or 0.0)

    def sample(self, rng: random.Random) -> Any:
        """One value (dry runs; real sweeps sample with Optuna)."""
        low, high = self.low or 0.0, self.high or 0.0
        if self.type == "categorical":
            return rng.choice(self.values or [])
        if self.type == "int":
            return rng.randint(int(low), int(high))
        if self.type == "loguniform":
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        return rng.uniform(low, high)


class InitFrom(StrictModel):
    """Where a fine-tune arm's trials start (docs/design.md §7, "Fine-tune arms")."""

    arm: str
    """The source arm: each trial of the fine-tune arm starts from the saved SAEs of one of its
    finished trials. Not itself an `init_from` arm (no chains)."""
    select: Literal["frontier", "all"] = "frontier"
    """Which source trials: `frontier`, those on the source arm's eval L0 / eval CE-increase
    frontier (`sweep.pareto.non_dominated`), or `all`; either way only `finished` trials with
    finite objectives (never a diverged, ASHA-stopped, errored or interrupted one). The arm runs
    one trial per selected source in order of eval L0 (lowest first); with more sources than
    `num_samples`, `num_samples` of them evenly spaced in that order, both ends included."""


INIT_FROM_FIXED = ("saes.sae_positions", "saes.dict_size_to_input_ratio", "saes.pretrained_sae_paths",
                   "saes.retrain_saes", "saes.architecture", "saes.k")  # fmt: skip
"""Paths a fine-tune arm may not `set`: its SAEs are its source trial's (positions, size,
architecture) and are loaded and trained on by `init_from` itself."""


class Arm(StrictModel):
    loss: dict[str, Any]
    """This SAE type's loss terms (the `loss` section of a training config)."""
    init_from: InitFrom | None = None
    """Fine-tune arm: start every trial from the SAEs of a finished trial of another arm
    (`{arm: local, select: frontier}`), instead of searching. A trial's config is its source
    trial's (base, the source arm's `set`, the source's searched values: e.g. its sparsity
    coefficient; a source value under `loss.<term>` only for terms this arm's `loss` has), with
    this arm's `loss` and then its `set` on top (e.g. its own `n_samples`), and
    `saes.pretrained_sae_paths` = the source trial's run folder with `saes.retrain_saes: true`.
    Its record's `init_from` names the source (`{"arm": ..., "trial": <trial_id>}`). It has no
    `search` or `initial_points`, ignores `strategy: match` and is never the default baseline."""
    set: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    """Fixed values by dotted path, e.g. `saes.dict_size_to_input_ratio: 4`."""
    search: dict[str, Distribution] = Field(default_factory=dict, validate_default=True)
    """Searched values by dotted path, e.g. `loss.sparsity.coeff: {type: loguniform, ...}` (at
    least one: Optuna needs something to search; for repeats, search `seed`). None in an
    `init_from` arm: its trials follow their sources."""
    initial_points: list[dict[str, Any]] = Field(default_factory=list, validate_default=True)
    """Parameter sets tried first (each names every searched path), before the sampler's own."""
    match_param: str = "loss.sparsity.coeff"
    """With `strategy: match`, the searched parameter (dotted path, `loguniform` or `uniform`)
    whose value the sampler aims at the targets: one the target metric moves monotonically with,
    as L0 falls and the CE increase rises with the sparsity coefficient."""

    @field_validator("set")
    @classmethod
    def _fine_tune_keeps_its_sources_saes(cls, fixed: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if info.data.get("init_from") is not None:
            taken = [p for p in fixed if p in INIT_FROM_FIXED or p == "saes"]
            if taken:
                raise ValueError(
                    f"{taken[0]} cannot be set in an init_from arm: its SAEs are its source trial's"
                )
        return fixed

    @field_validator("search", "initial_points")
    @classmethod
    def _searched_unless_fine_tune(cls, value: Any, info: ValidationInfo) -> Any:
        fine_tune = info.data.get("init_from") is not None
        if fine_tune and value:
            raise ValueError(
                "not allowed with init_from: the arm runs one trial per source trial, with the "
                "source's values (set fixed values in `set`)"
            )
        if not fine_tune and info.field_name == "search" and not value:
            raise ValueError(
                "should have at least 1 item: Optuna needs something to search (for repeats, search "
                "`seed`), unless the arm starts from another arm's trials (init_from)"
            )
        return value

    @model_validator(mode="after")
    def _set_and_search_apart(self) -> Arm:
        both = sorted(set(self.set) & set(self.search))
        if both:
            raise ValueError(f"{', '.join(both)} is both set and searched; keep it in one of them")
        return self

    def check_initial_points(self) -> None:
        """Raises ValueError unless each initial point sets exactly the searched paths, in range."""
        for i, point in enumerate(self.initial_points):
            if set(point) != set(self.search):
                raise ValueError(
                    f"initial_points[{i}] must set exactly the searched paths "
                    f"({', '.join(self.search) or 'none'}); got {', '.join(point) or 'none'}"
                )
            for path, value in point.items():
                if not self.search[path].contains(value):
                    raise ValueError(f"initial_points[{i}]: {path} = {value!r} is outside its search range")


class Objective(StrictModel):
    metric: str
    mode: Literal["min", "max"] = "min"


class Resources(StrictModel):
    num_workers: int = Field(default=1, ge=1)
    """Ray Train workers (DDP ranks) per trial."""
    cpus_per_worker: float = Field(default=2, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)
    max_failures: int = Field(default=2, ge=0)
    """Times a trial is restarted after a worker failure (a crashed or lost worker), each time
    from its last checkpoint (`save_every_n_samples`); a diverged trial is never retried."""

    @model_validator(mode="after")
    def _whole_gpus_for_ddp(self) -> Resources:
        # 1.5 is fractional too: two workers would share the GPU holding their halves
        if self.num_workers > 1 and not float(self.gpus_per_worker).is_integer():
            raise ValueError(
                f"fractional gpus_per_worker ({self.gpus_per_worker:g}) needs num_workers 1 "
                f"(got {self.num_workers}): two ranks on one GPU break NCCL; use whole GPUs for DDP"
            )
        return self


class EarlyStopping(StrictModel):
    """ASHA (asynchronous successive halving): at each eval, a trial whose `metric` is in the
    worse 1 - 1/reduction_factor of the trials that reached the same eval is stopped. Stopped
    trials are recorded as `stopped` and left out of every frontier (their values are
    half-trained)."""

    type: Literal["asha"] = "asha"
    metric: str = names.EVAL_CE_LOSS_INCREASE
    """One eval metric ASHA compares (it takes one, unlike the Optuna objectives)."""
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(default=1, ge=1)
    """Evals every trial gets before it may be stopped."""
    reduction_factor: float = Field(default=3.0, gt=1)
    """Keep the best 1/reduction_factor at each rung."""

    @field_validator("metric")
    @classmethod
    def _metric_is_reported(cls, metric: str) -> str:
        if metric not in names.PRODUCED_EVAL_METRICS:
            raise ValueError(
                f"{metric!r} is not a metric trials report; allowed: {', '.join(names.PRODUCED_EVAL_METRICS)}"
            )
        return metric


MATCH_TARGET_METRICS = {"l0_targets": names.EVAL_L0, "ce_increase_targets": names.EVAL_CE_LOSS_INCREASE}
"""The metric each target list of `strategy: match` names."""


class SearchSpace(StrictModel):
    name: str = Field(pattern=SAFE_NAME)
    """Sweep name: the results folder is storage_path/name (rerun to resume). Letters, digits,
    `_.+=,-`, not starting with '.'."""
    base_config: dict[str, Any] | str
    """Training config shared by all trials: inline, or a YAML path relative to this file."""
    arms: dict[str, Arm] = Field(min_length=1)
    num_samples: int = Field(gt=0)
    """Trials per arm (each arm gets the same budget and its own Optuna study)."""
    seeds: int = Field(default=1, ge=1)
    """Replicates per point: each suggested point (one trial) is trained `seeds` times, one after
    the other, with different seeds: replicate k (k = 0..seeds-1) uses the training config's
    `seed` + k (SAE init) and `train_data.seed` + k (data order; the eval stream's seed skipped
    when train and eval read the same data), so replicate 0 is the
    configured run. The trial's metrics are the replicates' means and its `eval_se/<metric>` the
    standard error across them; Optuna sees one value per point. Not with `early_stopping`
    (ASHA would take the replicates' evals for one trial's steps)."""
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric=m) for m in names.DEFAULT_OBJECTIVES], min_length=1
    )
    max_concurrent_trials: int = Field(default=1, ge=1)
    storage_path: str = "sweeps"
    """Where results go: a local or shared-filesystem folder (relative to the working
    directory), or a URI that `pyarrow.fs` resolves, as Ray uses (`s3://bucket/prefix`,
    `gs://bucket/prefix`; for an S3-compatible server add `?endpoint_override=host:port&scheme=http`).
    See `sweep.storage`."""
    seed: Seed = 0
    """Seeds the Optuna samplers."""
    sampler: Literal["tpe", "nsga2", "qmc", "random", "grid"] = "tpe"
    """Optuna sampler of every arm's study: `tpe` (multi-objective TPE; its first 10 trials are
    random), `nsga2` (genetic, for large budgets), `qmc` (quasi-random Sobol points that spread
    evenly over the ranges: best for a handful of trials), `random`, `grid` (every combination
    of the categorical values once: every searched parameter categorical, num_samples = the
    grid size, no initial_points)."""
    l0_targets: list[float] | None = None
    """With `strategy: match`: the `eval/L0` values every arm aims its trials at (positive;
    sorted and deduplicated on load)."""
    ce_increase_targets: list[float] | None = None
    """With `strategy: match`: the `eval/ce_loss_increase` values (nats/token) every arm aims its
    trials at, instead of `l0_targets` (positive; sorted and deduplicated on load)."""
    strategy: Literal["sample", "match"] = Field(default="sample", validate_default=True)
    """How each arm's study proposes trials: `sample` (the `sampler` above), or `match`: aim every
    arm's `match_param` (default `loss.sparsity.coeff`) at the targets of exactly one of
    `l0_targets` / `ce_increase_targets`, so that all arms put trials at the same points
    (`sweep.match.MatchSampler`; it relies on L0 falling and the CE increase rising monotonically
    with the sparsity coefficient, roughly linearly in log-log). The target's metric must be an
    objective; the arm's other searched parameters are sampled at random."""
    resources: Resources = Resources()
    baseline: str | None = Field(default=None, validate_default=True)
    """The arm every other arm is compared with in the report's verdict; by default the one arm
    whose loss has no logits_kl and no in_to_orig term (the local SAE), an error when that is
    not exactly one arm (`sweep.baseline.baseline_arm`)."""
    early_stopping: EarlyStopping | None = None
    """Stop unpromising trials at their evals (ASHA); needs `eval_every_n_samples` in the
    training config, so that trials report before they end."""

    @field_validator("arms")
    @classmethod
    def _arm_names_are_folder_names(cls, arms: dict[str, Arm]) -> dict[str, Arm]:
        for name in arms:
            if not re.match(SAFE_NAME, name):
                raise ValueError(
                    f"arm name {name!r} must be letters, digits or `_.+=,-`, not starting with '.' "
                    "(it names folders)"
                )
        return arms

    @field_validator("objectives")
    @classmethod
    def _objectives_exist(cls, objectives: list[Objective]) -> list[Objective]:
        for objective in objectives:
            if objective.metric not in names.PRODUCED_EVAL_METRICS:
                by_lower = {m.lower(): m for m in names.PRODUCED_EVAL_METRICS}
                close = [by_lower[objective.metric.lower()]] if objective.metric.lower() in by_lower else []
                close = close or difflib.get_close_matches(objective.metric, names.PRODUCED_EVAL_METRICS, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise ValueError(
                    f"{objective.metric!r} is not a metric trials report; {hint}"
                    f"allowed: {', '.join(names.PRODUCED_EVAL_METRICS)}"
                )
        return objectives

    @model_validator(mode="after")
    def _seeds_without_early_stopping(self) -> SearchSpace:
        if self.seeds > 1 and self.early_stopping is not None:
            raise ValueError(
                f"seeds: {self.seeds} cannot be combined with early_stopping (ASHA would compare "
                "a point's replicates as one trial's evals); use seeds: 1 or drop early_stopping"
            )
        return self

    @field_validator("baseline")
    @classmethod
    def _baseline_is_known(cls, baseline: str | None, info: ValidationInfo) -> str | None:
        # a field validator, so that an error names `baseline`; `arms` is validated before it
        arms: dict[str, Arm] | None = info.data.get("arms")
        if arms is not None:
            baseline_arm(
                {name: arm.loss for name, arm in arms.items()},
                {name: list(arm.search) for name, arm in arms.items()},
                baseline,
                {name: arm.set for name, arm in arms.items()},
                [name for name, arm in arms.items() if arm.init_from is not None],
            )
        return baseline

    def baseline_arm(self) -> str | None:
        """The verdict's baseline arm (None with one arm). Raises ValueError if ambiguous."""
        return baseline_arm(
            {name: arm.loss for name, arm in self.arms.items()},
            {name: list(arm.search) for name, arm in self.arms.items()},
            self.baseline,
            {name: arm.set for name, arm in self.arms.items()},
            self.fine_tune_arms,
        )

    @property
    def fine_tune_arms(self) -> list[str]:
        """The arms that start from another arm's trials (`init_from`), in file order."""
        return [name for name, arm in self.arms.items() if arm.init_from is not None]

    def source_arm(self, arm_name: str) -> str:
        """The arm whose trial configs (and corners) an arm's trials follow: its `init_from`
        source, else itself."""
        init_from = self.arms[arm_name].init_from
        return arm_name if init_from is None else init_from.arm

    @field_validator("l0_targets", "ce_increase_targets")
    @classmethod
    def _targets_positive_sorted(cls, targets: list[float] | None) -> list[float] | None:
        if targets is None:
            return None
        if not targets:
            raise ValueError("needs at least one target")
        if any(t <= 0 for t in targets):
            raise ValueError("targets must be positive")
        return sorted(set(targets))

    @field_validator("strategy")
    @classmethod
    def _strategy_has_its_targets(cls, strategy: str, info: ValidationInfo) -> str:
        data = info.data
        if not {"arms", "objectives", "l0_targets", "ce_increase_targets"} <= set(data):
            return strategy  # one of them failed validation: that error is reported already
        given = [field for field in MATCH_TARGET_METRICS if data[field] is not None]
        if strategy != "match":
            if given:
                raise ValueError(f"{given[0]} needs `strategy: match`")
            return strategy
        if len(given) != 1:
            got = "both are set" if given else "neither is set"
            raise ValueError(f"match needs exactly one of l0_targets, ce_increase_targets; {got}")
        metric = MATCH_TARGET_METRICS[given[0]]
        if metric not in [o.metric for o in data["objectives"]]:
            raise ValueError(f"match on {given[0]} needs {metric} among the objectives")
        for arm_name, arm in data["arms"].items():
            if arm.init_from is not None:
                continue  # it follows its sources, aiming at nothing
            dist = arm.search.get(arm.match_param)
            if dist is None or dist.type not in ("loguniform", "uniform", "int"):
                how = "it is not searched" if dist is None else f"it is searched as {dist.type}"
                raise ValueError(
                    f"match: arms.{arm_name} must search its match_param {arm.match_param} with "
                    f"loguniform, uniform or int; {how}"
                )
            if dist.type == "int" and (dist.low or 0) <= 0:
                raise ValueError(
                    f"match: arms.{arm_name}: an int match_param is matched in log scale; its low "
                    f"must be positive (got {dist.low:g})"
                )
        return strategy

    @property
    def match_targets(self) -> tuple[str, list[float]] | None:
        """With `strategy: match`: the target metric and its targets; else None."""
        if self.strategy != "match":
            return None
        for field, metric in MATCH_TARGET_METRICS.items():
            targets = getattr(self, field)
            if targets is not None:
                return metric, list(targets)
        return None

    @model_validator(mode="after")
    def _grid_is_a_grid(self) -> SearchSpace:
        if self.sampler != "grid":
            return self
        for arm_name, arm in self.arms.items():
            if arm.init_from is not None:
                continue  # one trial per source, no grid
            ranges = [path for path, dist in arm.search.items() if dist.type != "categorical"]
            if ranges:
                raise ValueError(
                    f"sampler grid: arms.{arm_name} searches {', '.join(ranges)} over a range; "
                    "a grid needs categorical values"
                )
            if arm.initial_points:
                raise ValueError(
                    f"sampler grid: arms.{arm_name}: initial_points are not allowed (the grid is every point)"
                )
            if grid_size(arm.search) != self.num_samples:
                raise ValueError(
                    f"sampler grid: num_samples must be the grid size, {grid_size(arm.search)} for "
                    f"arms.{arm_name} (got {self.num_samples}; every arm's grid has the same size)"
                )
        return self

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        return [o.mode for o in self.objectives]


SPACE_RECORD = "search_space.json"
"""In a sweep folder: the validated search space it was started with, as JSON `{"space": ...,
"base": ...}` (a rerun must match it; the report reads its arms and baseline)."""


def describe_strategy(space: SearchSpace, arm_name: str) -> str:
    """One line on how an arm's study proposes trials (for --dry-run, whose own sample trials
    stay random draws whatever the strategy)."""
    arm = space.arms[arm_name]
    if arm.init_from is not None:
        which = "finished trial on the eval/L0 vs eval/ce_loss_increase frontier"
        if arm.init_from.select == "all":
            which = "finished trial"
        return (
            f"init_from: one trial per {which} of arm {arm.init_from.arm}, in order of eval/L0, each "
            "starting from that trial's saved SAEs, with its config and searched values and this "
            "arm's loss and set on top"
        )
    match = space.match_targets
    if match is None:
        return f"strategy sample: Optuna {space.sampler} sampler"
    metric, targets = match
    dist = arm.search[arm.match_param]
    others = [p for p in arm.search if p != arm.match_param]
    rest = f"; {', '.join(others)} at random" if others else ""
    return (
        f"strategy match: aims {arm.match_param} ({dist.type} {dist.low:g}..{dist.high:g}) at "
        f"{metric} = {', '.join(f'{t:g}' for t in targets)}{rest}"
    )


def grid_points(search: dict[str, Distribution]) -> list[dict[str, Any]]:
    """Every combination of the categorical values of `search` (`sampler: grid`), in order."""
    paths = list(search)
    combos = itertools.product(*(search[p].values or [] for p in paths))
    return [dict(zip(paths, combo, strict=True)) for combo in combos]


def grid_size(search: dict[str, Distribution]) -> int:
    """How many points `grid_points` gives."""
    return math.prod(len(dist.values or []) for dist in search.values())


def set_dotted(tree: dict[str, Any], path: str, value: Any) -> None:
    """Set `tree[a][b][c] = value` for path `a.b.c`, creating missing sections."""
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def trial_config_dict(
    base: dict[str, Any], arm: Arm, params: dict[str, Any], source: Arm | None = None
) -> dict[str, Any]:
    """Base config, then the arm's loss and fixed values, then the searched params.

    For a fine-tune arm (`init_from`), `source` is its source arm and `params` the source
    trial's searched values: base, the arm's own loss, the source arm's fixed values and
    `params` (those under `loss.<term>` only for terms of the arm's own loss, e.g. the
    source's sparsity coefficient), then the arm's own fixed values. The SAEs to start from
    are added by `sweep.init_from.fine_tune_config`.
    """
    tree = copy.deepcopy(base)
    tree["loss"] = copy.deepcopy(arm.loss)
    if source is None:
        for path, value in {**arm.set, **params}.items():
            set_dotted(tree, path, value)
        return tree
    for path, value in {**source.set, **params}.items():
        parts = path.split(".")
        if parts[0] == "loss" and (len(parts) < 2 or arm.loss.get(parts[1]) is None):
            continue  # the fine-tune's loss is its own: no source term is switched on (nor a null one)
        set_dotted(tree, path, value)
    for path, value in arm.set.items():
        set_dotted(tree, path, value)
    return tree


class LoadedSpace:
    """A validated search space with its base config resolved. Build with `load_search_space`."""

    def __init__(self, space: SearchSpace, base: dict[str, Any], source: str):
        self.space = space
        self.base = base
        self.source = source

    def trial_config(self, arm_name: str, params: dict[str, Any]) -> TrainConfig:
        """The TrainConfig of one trial.

        Raises:
            ConfigError: naming the file, the arm and the field.
        """
        arm = self.space.arms[arm_name]
        source = None if arm.init_from is None else self.space.arms[arm.init_from.arm]
        tree = trial_config_dict(self.base, arm, params, source)
        return validate_config(tree, source=f"{self.source}: arms.{arm_name}")

    def corner_trials(self, arm_name: str) -> list[dict[str, Any]]:
        """Parameter sets at the edges of an arm's search: every searched value at its low end,
        then each one moved to each of its other corners (categorical: every value). A
        fine-tune arm's are its source arm's (its trials take their sources' values)."""
        search = self.space.arms[self.space.source_arm(arm_name)].search
        corners = {param: dist.corners() for param, dist in search.items()}
        low = {param: values[0] for param, values in corners.items()}
        return [low] + [{**low, param: value} for param, values in corners.items() for value in values[1:]]

    def sample_trials(self, arm_name: str, n: int, seed: int | None = None) -> list[dict[str, Any]]:
        """`n` parameter sets of an arm (what --dry-run prints): its initial points, then
        random draws (a fine-tune arm: its source arm's)."""
        rng = random.Random(self.space.seed if seed is None else seed)
        arm = self.space.arms[self.space.source_arm(arm_name)]
        if self.space.sampler == "grid":  # each point once, as the grid sampler runs them
            return grid_points(arm.search)[:n]
        sampled = [{path: dist.sample(rng) for path, dist in arm.search.items()} for _ in range(n)]
        return (list(arm.initial_points) + sampled)[:n]


def load_search_space(path: str | Path) -> LoadedSpace:
    """Read, validate and check a search-space file: every arm's config is validated at the
    corners of its search ranges.

    Raises:
        ConfigError: one line per problem, naming the file and field.
    """
    from sweep.wandb_sweep import is_wandb_sweep, wandb_sweep_space

    path = Path(path)
    raw = read_yaml(path)
    if is_wandb_sweep(raw):  # the reference library's W&B sweep file (docs/design.md §12)
        return check_arms(wandb_sweep_space(path, raw))
    if "arms" not in raw and {"saes", "loss"} & set(raw):
        raise ConfigError(
            f"{path}: this is a training config, not a search space; train it with "
            f"`python -m sparsify.train {path}`, or name it as base_config of a search space"
        )
    space = validate_model(SearchSpace, raw, str(path))
    if isinstance(space.base_config, str):
        base_path = (path.parent / space.base_config).resolve()
        try:
            base = read_yaml(base_path)
        except ConfigError as exc:
            raise ConfigError(f"{path}: base_config: {exc}") from None
    else:
        base = dict(space.base_config)
    return check_arms(LoadedSpace(space, base, str(path)))


def check_arms(loaded: LoadedSpace) -> LoadedSpace:
    """Validate every fine-tune arm's source, then every arm's config at the corners of its
    search (a fine-tune arm's: at its source's), and its initial points.

    Raises:
        ConfigError: one line, naming the file and the arm.
    """
    check_sources(loaded)
    for arm_name, arm in loaded.space.arms.items():
        low, *others = loaded.corner_trials(arm_name)
        if loaded.trial_config(arm_name, low).eval_data is None:
            raise ConfigError(
                f"{loaded.source}: arms.{arm_name}: eval_data is null, but the objectives are eval metrics; "
                "give base_config an eval_data section"
            )
        for params in others:
            loaded.trial_config(arm_name, params)
        _check_takes_fractions(loaded, arm_name, low)
        try:
            arm.check_initial_points()
        except ValueError as exc:
            raise ConfigError(f"{loaded.source}: arms.{arm_name}: {exc}") from None
    return loaded


def _check_takes_fractions(loaded: LoadedSpace, arm_name: str, low: dict[str, Any]) -> None:
    """A `loguniform` or `uniform` path must take fractional values: its corners may be whole
    numbers (`saes.k: {type: loguniform, low: 4, high: 40}` validates there), but almost every
    draw between them is not, and an integer field (`saes.k`, `batch_size`) would then fail
    every trial. Checked just above `low`.

    Raises:
        ConfigError: naming the file, the arm and the path, with the fix (`type: int`).
    """
    search = loaded.space.arms[loaded.space.source_arm(arm_name)].search
    for path, dist in search.items():
        if dist.type not in ("loguniform", "uniform") or not float(low[path]).is_integer():
            continue
        inside = math.nextafter(float(low[path]), math.inf)
        try:
            loaded.trial_config(arm_name, {**low, path: inside})
        except ConfigError:
            raise ConfigError(
                f"{loaded.source}: arms.{arm_name}: {path} is searched as {dist.type}, but takes whole "
                f"numbers only (a draw such as {inside!r} fails); search it with type: int"
            ) from None


def check_sources(loaded: LoadedSpace) -> None:
    """Each `init_from` names another arm of the space, one that is not itself an `init_from`
    arm (no chains).

    Raises:
        ConfigError: `<file>: arms.<arm>.init_from.arm: ...`, one line.
    """
    arms = loaded.space.arms
    for arm_name, arm in arms.items():
        if arm.init_from is None:
            continue
        source, where = arm.init_from.arm, f"{loaded.source}: arms.{arm_name}.init_from.arm"
        if source == arm_name:
            raise ConfigError(f"{where}: an arm cannot start from its own trials; name another arm")
        if source not in arms:
            close = difflib.get_close_matches(source, list(arms), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"{where}: {source!r} is not an arm; {hint}arms: {', '.join(arms)}")
        chained = arms[source].init_from
        if chained is not None:
            raise ConfigError(
                f"{where}: {source} itself starts from arm {chained.arm} (init_from); chains are not "
                f"supported: start from {chained.arm} or from another arm that searches"
            )
