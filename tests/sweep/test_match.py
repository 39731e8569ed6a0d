"""`strategy: match` (sweep/match.py): the sampler that aims each arm's sparsity coefficient at
L0 / CE-increase targets. Hand-computed proposals, target choice, unreachable targets, resume
from the journal file, Tune's OptunaSearch around it, the config fields; and, on a stand-in
objective, that it hits every target in fewer trials than TPE. No Ray cluster, no training."""

from __future__ import annotations

import copy
import math
import pickle
import random
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from sparsify import ConfigError
from sparsify.metric_names import EVAL_CE_LOSS_INCREASE, EVAL_L0
from sweep.match import (
    MODE_ATTR,
    TARGET_ATTR,
    UNREACHABLE_ATTR,
    MatchSampler,
    Observation,
    ParamRange,
    densify_candidates,
    match_sampler,
    propose,
)
from sweep.space import describe_strategy, load_search_space

PARAM = "loss.sparsity.coeff"
QUICKSTART = Path(__file__).parents[2] / "search_spaces" / "quickstart.yaml"
TARGETS = [10.0, 20.0, 40.0, 80.0]

optuna.logging.set_verbosity(optuna.logging.WARNING)


def obs(*pairs: tuple[float, float]) -> list[Observation]:
    return [Observation(c, m) for c, m in pairs]


def stand_in(c: float, seed: int) -> list[float]:
    """The quickstart local arm's stand-in (bench/match_vs_tpe.py): L0 = 150·c^-1.3 and CE
    increase 0.05·c, each with 5% log-normal noise, deterministic in (seed, c)."""
    rng = random.Random(f"{seed}:{c!r}")
    return [150 * c**-1.3 * math.exp(0.05 * rng.gauss(0, 1)), 0.05 * c * math.exp(0.05 * rng.gauss(0, 1))]


def sampler(targets=TARGETS, low=1.0, high=10.0, seed=0, **kwargs) -> MatchSampler:
    return MatchSampler(PARAM, low, high, True, EVAL_L0, 0, targets, seed=seed, **kwargs)


def study_with(match: MatchSampler, storage=None, name="arm") -> optuna.Study:
    return optuna.create_study(
        directions=["minimize", "minimize"],
        sampler=match,
        storage=storage,
        study_name=name,
        load_if_exists=True,
    )


def add(study: optuna.Study, c: float, l0: float, low=1.0, high=10.0) -> None:
    study.add_trial(
        optuna.trial.create_trial(
            params={PARAM: c}, distributions={PARAM: FloatDistribution(low, high, log=True)}, values=[l0, 0.1]
        )
    )


def ask_tell(study: optuna.Study, seed: int, n: int, low=1.0, high=10.0) -> list[float]:
    """`n` trials on the stand-in; their coefficients."""
    proposed = []
    for _ in range(n):
        trial = study.ask({PARAM: FloatDistribution(low, high, log=True)})
        proposed.append(trial.params[PARAM])
        study.tell(trial, stand_in(trial.params[PARAM], seed))
    return proposed


def trials_to_hit(make, seed: int, budget: int) -> int | None:
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make(seed))
    l0s = []
    for n in range(1, budget + 1):
        trial = study.ask({PARAM: FloatDistribution(1.0, 10.0, log=True)})
        values = stand_in(trial.params[PARAM], seed)
        study.tell(trial, values)
        l0s.append(values[0])
        if all(any(abs(m / t - 1) <= 0.15 for m in l0s) for t in TARGETS):
            return n
    return None


# --- the proposal, by hand ---------------------------------------------------------------------

WIDE = ParamRange(0.1, 10.0, log=True)


def test_secant_interpolates_between_the_bracketing_trials():
    # slope (log 50 - log 100) / (log 4 - log 1) = -0.5; nearest to 80 in log L0 is (1, 100):
    # log c = log 1 + (log 80 - log 100) / -0.5, c = 0.8^-2
    assert propose(obs((1, 100), (4, 50)), 80, WIDE, -1) == pytest.approx(1.5625)


def test_secant_extrapolates_from_the_nearest_trial():
    # both above 40: step from (4, 50) with the same slope: c = 4 · (40/50)^(1/-0.5)
    assert propose(obs((1, 100), (4, 50)), 40, WIDE, -1) == pytest.approx(6.25)


def test_one_trial_steps_with_the_prior_slope():
    assert propose(obs((2, 100)), 25, WIDE, -1) == pytest.approx(8.0)  # L0 ∝ 1/c
    assert propose(obs((2, 0.1)), 0.2, WIDE, +1) == pytest.approx(4.0)  # CE increase ∝ c


def test_no_trial_starts_at_the_middle_of_the_range():
    assert propose([], 25, WIDE, -1) == pytest.approx(1.0)  # geometric
    assert propose([], 25, ParamRange(0.0, 4.0, log=False), -1) == pytest.approx(2.0)  # arithmetic


def test_a_flat_or_backward_slope_is_clamped_or_replaced_by_the_prior():
    # a saturated L0 (slope -0.0048) is clamped to -0.2: c = 2·(29.9/10)^5 = 478, clipped to 10
    assert propose(obs((1, 30), (2, 29.9)), 10, WIDE, -1) == 10.0
    # L0 rising with c is noise: the prior slope -1 from the nearest trial, (1, 45): c = 1·45/40
    assert propose(obs((1, 45), (2, 50)), 40, WIDE, -1) == pytest.approx(1.125)


def test_a_ce_increase_at_or_below_zero_counts_as_the_lower_end():
    # no positive CE increase yet: bisect (geometrically) above the largest such coefficient
    assert propose(obs((0.5, -0.01), (0.2, 0.0)), 0.1, WIDE, +1) == pytest.approx(math.sqrt(0.5 * 10))
    # bracketed by a positive trial: stay inside, 10% of the bracket from its ends
    value = propose(obs((0.5, -0.01), (8, 1.0)), 0.01, WIDE, +1)
    assert math.log(0.5) < math.log(value) <= math.log(0.5) + 0.9 * math.log(16) + 1e-12


def test_densify_candidates_are_targets_and_geometric_midpoints():
    assert densify_candidates([40, 10, 20]) == pytest.approx([10, math.sqrt(200), 20, math.sqrt(800), 40])


# --- the sampler on a study --------------------------------------------------------------------


def test_unreachable_target_is_marked_and_another_one_aimed_at():
    study = study_with(sampler(targets=[10, 40]))
    add(study, 10.0, 30.0)  # at the upper bound, L0 is still 30: 10 lies beyond the range
    add(study, 5.0, 60.0)
    trial = study.ask({PARAM: FloatDistribution(1.0, 10.0, log=True)})
    frozen = study.trials[trial.number]
    assert frozen.system_attrs[UNREACHABLE_ATTR] == [10.0]
    assert frozen.system_attrs[TARGET_ATTR] == 40.0 and frozen.system_attrs[MODE_ATTR] == "target"
    # 40 lies between 60 (c = 5) and 30 (c = 10), slope -1, nearest 30: c = 10 · 30/40
    assert trial.params[PARAM] == pytest.approx(7.5)


def test_every_target_unreachable_falls_back_to_random():
    study = study_with(sampler(targets=[5.0]))
    add(study, 10.0, 30.0)
    trial = study.ask({PARAM: FloatDistribution(1.0, 10.0, log=True)})
    frozen = study.trials[trial.number]
    assert frozen.system_attrs[MODE_ATTR] == "random" and TARGET_ATTR not in frozen.system_attrs
    assert frozen.system_attrs[UNREACHABLE_ATTR] == [5.0]
    assert 1.0 <= trial.params[PARAM] <= 10.0
    # later trials read the mark: still random, and the target is not marked again
    study.tell(trial, stand_in(trial.params[PARAM], 0))
    number = study.ask({PARAM: FloatDistribution(1.0, 10.0, log=True)}).number
    again = study.trials[number]
    assert again.system_attrs[MODE_ATTR] == "random" and UNREACHABLE_ATTR not in again.system_attrs


def test_concurrent_trials_aim_at_different_targets_and_values():
    study = study_with(sampler())
    trials = [study.ask({PARAM: FloatDistribution(1.0, 10.0, log=True)}) for _ in range(4)]
    aims = [study.trials[t.number].system_attrs[TARGET_ATTR] for t in trials]
    values = [t.params[PARAM] for t in trials]
    assert sorted(aims) == TARGETS  # one each, emptiest first: the two middle ones, nearest the center
    assert aims[0] in (20.0, 40.0) and values[0] == pytest.approx(math.sqrt(10))
    assert len({round(v, 9) for v in values}) == 4


def test_all_targets_hit_then_densify_between_them():
    study = study_with(sampler(targets=[10, 40]))
    add(study, 2.0, 40.0)
    add(study, 8.0, 10.0)
    number = study.ask({PARAM: FloatDistribution(1.0, 10.0, log=True)}).number
    frozen = study.trials[number]
    assert frozen.system_attrs[MODE_ATTR] == "densify" and frozen.system_attrs[TARGET_ATTR] == 20.0
    assert frozen.params[PARAM] == pytest.approx(4.0)  # slope -1 between the two: halfway in log


def test_initial_points_run_as_given_and_are_not_aimed():
    study = study_with(sampler())
    study.enqueue_trial({PARAM: 3.0})
    trial = study.ask({PARAM: FloatDistribution(1.0, 10.0, log=True)})
    assert trial.params[PARAM] == 3.0 and TARGET_ATTR not in study.trials[trial.number].system_attrs


def test_other_parameters_are_drawn_by_the_fallback():
    study = study_with(sampler(seed=3))
    space: dict[str, BaseDistribution] = {
        PARAM: FloatDistribution(1.0, 10.0, log=True),
        "lr": FloatDistribution(1e-4, 1e-2, log=True),
    }
    trial = study.ask(space)
    assert trial.params[PARAM] == pytest.approx(math.sqrt(10))
    rng_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    assert trial.params["lr"] == rng_study.ask({"lr": space["lr"]}).params["lr"]


def test_a_new_sampler_on_the_same_journal_continues_like_an_uninterrupted_one(tmp_path):
    def journal(name: str) -> optuna.storages.JournalStorage:
        return optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / f"{name}.journal")))

    uninterrupted = ask_tell(study_with(sampler(), journal("whole")), seed=0, n=8)
    first = ask_tell(study_with(sampler(), journal("split")), seed=0, n=3)
    # the rerun: a new sampler (and study object) on the same journal file; the interrupted run
    # left a trial RUNNING, which the sweep's resume finishes (Tune tells it) before going on
    left = study_with(sampler(), journal("split")).ask({PARAM: FloatDistribution(1.0, 10.0, log=True)})
    resumed = study_with(pickle.loads(pickle.dumps(sampler())), journal("split"))
    running = resumed.trials[left.number]
    assert running.state == TrialState.RUNNING
    resumed.tell(left.number, stand_in(left.params[PARAM], 0))
    rest = ask_tell(resumed, seed=0, n=4)
    assert first + [left.params[PARAM]] + rest == pytest.approx(uninterrupted, rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_match_hits_every_target_in_fewer_trials_than_tpe(seed):
    budget = 7
    matched = trials_to_hit(lambda s: sampler(seed=s), seed, budget)
    tpe = trials_to_hit(lambda s: optuna.samplers.TPESampler(seed=s), seed, budget)
    assert matched is not None and matched <= budget
    assert tpe is None, f"TPE hit all of {TARGETS} within {budget} trials at seed {seed}"


def test_ce_increase_targets():
    curve = lambda c: [150 * c**-1.3, 0.05 * c]  # noqa: E731
    match = MatchSampler(PARAM, 1.0, 10.0, True, EVAL_CE_LOSS_INCREASE, 1, [0.1, 0.2, 0.4], seed=0)
    study = study_with(match)
    ce = []
    for _ in range(5):
        trial = study.ask({PARAM: FloatDistribution(1.0, 10.0, log=True)})
        values = curve(trial.params[PARAM])
        study.tell(trial, values)
        ce.append(values[1])
    assert all(any(abs(m / t - 1) <= 0.15 for m in ce) for t in (0.1, 0.2, 0.4)), ce


def test_an_integer_k_that_raises_l0_is_aimed_at_the_targets():
    """A TopK SAE's k: L0 = k (the noise of a short run: 3% below it), searched as an int. The
    sampler proposes whole numbers, steps the right way (more k, more L0) and hits every target."""
    k_dist = IntDistribution(2, 64)
    match = MatchSampler(
        "saes.k", 2, 64, True, EVAL_L0, 0, [5.0, 12.0, 25.0], seed=0, integer=True, denser=True
    )
    study = study_with(match)
    ks, l0s = [], []
    for _ in range(4):
        trial = study.ask({"saes.k": k_dist})
        k = trial.params["saes.k"]
        ks.append(k)
        l0s.append(0.97 * k)
        study.tell(trial, [0.97 * k, 1.0 / k])
    assert all(isinstance(k, int) for k in ks)
    assert ks[0] == 11  # the geometric middle of 2..64, rounded
    assert all(any(abs(m / t - 1) <= 0.15 for m in l0s[:3]) for t in (12.0, 25.0)), ks
    assert any(abs(m / 5.0 - 1) <= 0.15 for m in l0s), ks


# --- Tune's OptunaSearch around it (no Ray cluster) -----------------------------------------


def test_tune_searcher_runs_initial_points_then_aims_and_restores(tmp_path):
    from ray import tune

    from sweep.tuner import FailNonFiniteOptunaSearch

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "local.journal")))
    optuna.create_study(storage=storage, study_name="local", directions=["minimize", "minimize"])

    search = FailNonFiniteOptunaSearch(
        metric=[EVAL_L0, EVAL_CE_LOSS_INCREASE], mode=["min", "min"], sampler=sampler(),
        storage=storage, study_name="local", points_to_evaluate=[{PARAM: 1.5}],
    )  # fmt: skip
    search.set_search_properties(None, None, {"arm": "local", PARAM: tune.loguniform(1.0, 10.0)})
    assert search.suggest("t0") == {PARAM: 1.5}
    search.on_trial_complete("t0", {EVAL_L0: 150 * 1.5**-1.3, EVAL_CE_LOSS_INCREASE: 0.075})
    suggested = search.suggest("t1")
    aim = optuna.load_study(study_name="local", storage=storage).trials[1].system_attrs[TARGET_ATTR]
    # one trial (L0 88.6 at 1.5): the emptiest target is 10; the prior slope -1 says
    # c = 1.5 · 88.6 / 10 = 13.3, clipped to the upper bound (where no trial sits yet)
    assert aim == 10.0 and suggested == {PARAM: 10.0}
    search.on_trial_complete("t1", {EVAL_L0: float("nan"), EVAL_CE_LOSS_INCREASE: 0.1})  # diverged
    search.save(str(tmp_path / "searcher.pkl"))
    restored = FailNonFiniteOptunaSearch(metric=[EVAL_L0], mode=["min"])
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("t2") == {PARAM: 10.0}  # the failed trial is no data: the same proposal
    states = [t.state for t in optuna.load_study(study_name="local", storage=storage).trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING]


def test_arm_tuner_gives_the_arm_a_match_sampler(tmp_path, monkeypatch):
    import sweep.tuner as tuner

    class Built(Exception):
        pass

    def capture(**kwargs):
        raise Built(kwargs["sampler"], kwargs["points_to_evaluate"])

    monkeypatch.setattr(tuner.tune, "with_parameters", lambda fn, **kw: fn)
    monkeypatch.setattr(tuner, "FailNonFiniteOptunaSearch", capture)
    initial = {"initial_points": [{PARAM: 0.3}, {PARAM: 0.6}, {PARAM: 1.2}]}
    path = write_space(tmp_path, {"e2e": initial}, strategy="match", l0_targets=[40, 10, 20])
    loaded = load_search_space(path)
    with pytest.raises(Built) as built:
        tuner.arm_tuner(loaded, "e2e", tmp_path / "sweep", num_samples=3)
    match, points = built.value.args
    assert isinstance(match, MatchSampler) and points == [{PARAM: 0.3}, {PARAM: 0.6}, {PARAM: 1.2}]
    assert (match.param, match.space, match.targets) == (PARAM, ParamRange(0.1, 2.0, True), [10, 20, 40])
    assert match.objective_index == 0 and match.metric == EVAL_L0


# --- the config ------------------------------------------------------------------------------


def write_space(tmp_path: Path, arm_changes=None, **changes) -> Path:
    tree = yaml.safe_load(QUICKSTART.read_text())
    tree = copy.deepcopy(tree)
    for key in ("strategy", "l0_targets", "ce_increase_targets"):  # each test sets its own
        tree.pop(key, None)
    tree.update(changes)
    for arm, fields in (arm_changes or {}).items():
        tree["arms"][arm].update(fields)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_match_space_loads_with_sorted_targets_and_describes_itself(tmp_path):
    space = load_search_space(write_space(tmp_path, strategy="match", l0_targets=[80, 10, 20, 20, 40])).space
    assert space.match_targets == (EVAL_L0, [10.0, 20.0, 40.0, 80.0])
    assert describe_strategy(space, "local") == (
        f"strategy match: aims {PARAM} (loguniform 1..10) at eval/L0 = 10, 20, 40, 80"
    )
    assert (
        describe_strategy(load_search_space(write_space(tmp_path)).space, "local")
        == "strategy sample: Optuna tpe sampler"
    )
    ce = load_search_space(write_space(tmp_path, strategy="match", ce_increase_targets=[0.2, 0.1]))
    made = match_sampler(ce.space, "e2e")
    assert (made.metric, made.objective_index, made.targets) == (EVAL_CE_LOSS_INCREASE, 1, [0.1, 0.2])


@pytest.mark.parametrize(
    "changes, arm_changes, wanted",
    [
        ({"l0_targets": [10]}, None, "strategy: l0_targets needs `strategy: match`"),
        (
            {"strategy": "match"},
            None,
            "strategy: match needs exactly one of l0_targets, ce_increase_targets; neither",
        ),
        (
            {"strategy": "match", "l0_targets": [10], "ce_increase_targets": [0.1]},
            None,
            "match needs exactly one of l0_targets, ce_increase_targets; both are set",
        ),
        ({"strategy": "match", "l0_targets": [10, -1]}, None, "l0_targets: targets must be positive"),
        ({"strategy": "match", "l0_targets": []}, None, "l0_targets: needs at least one target"),
        (
            {"strategy": "match", "l0_targets": [10], "objectives": [{"metric": EVAL_CE_LOSS_INCREASE}]},
            None,
            "strategy: match on l0_targets needs eval/L0 among the objectives",
        ),
        (
            {"strategy": "match", "l0_targets": [10]},
            {"e2e": {"match_param": "lr"}},
            "match: arms.e2e must search its match_param lr with loguniform, uniform or int; it is not searched",
        ),
        (
            {"strategy": "match", "l0_targets": [10]},
            {
                "local": {
                    "search": {PARAM: {"type": "categorical", "values": [1.0, 2.0]}},
                    "initial_points": [],
                }
            },
            "arms.local must search its match_param loss.sparsity.coeff with loguniform, uniform or int; "
            "it is searched as categorical",
        ),
        ({"strategy": "nearest"}, None, "strategy: Input should be 'sample' or 'match'"),
    ],
)
def test_config_errors_are_one_line(tmp_path, changes, arm_changes, wanted):
    path = write_space(tmp_path, arm_changes, **changes)
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and wanted in message, message


# --- a real sweep (slow: Ray Tune + Ray Train on the tiny model) ----------------------------


@pytest.mark.slow
def test_match_sweep_aims_its_trials_through_tune(tiny_model_dir, corpus_dir, tmp_path):
    import ray
    from conftest import tiny_train_config

    from sweep.results import load_results
    from sweep.run import main as run_main

    # 64 steps: the L0 of this local SAE falls from ~30 at 1e-3 to ~1 at 0.05 (bench/match_vs_tpe.py)
    base = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, n_samples=1024, batch_size=16, lr=1e-2)
    del base["loss"]
    space = {
        "name": "tiny-match",
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": 4,
        "strategy": "match",
        "l0_targets": [4, 16],
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "base_config": base,
        "arms": {
            "local": {
                "loss": {"sparsity": {"coeff": 0.01}, "out_to_in": {"coeff": 1.0}},
                "search": {PARAM: {"type": "loguniform", "low": 1e-3, "high": 0.1}},
                "initial_points": [{PARAM: 0.01}],
            },
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(space))
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        assert run_main([str(path)]) == 0
    finally:
        ray.shutdown()
    sweep_dir = tmp_path / "sweeps" / "tiny-match"
    table = load_results(sweep_dir)
    assert len(table) == 4 and (table["status"] == "finished").all()
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(sweep_dir / "optuna" / "local.journal")))
    trials = optuna.load_study(study_name="local", storage=storage).trials
    assert trials[0].params[PARAM] == 0.01 and TARGET_ATTR not in trials[0].system_attrs  # the initial point
    shown = [(t.number, t.state.name, t.params, t.values, t.system_attrs) for t in trials]
    # Tune asked the sampler for every later trial; the first one aimed at the target farthest
    # from the initial point's L0, in log
    assert all(MODE_ATTR in t.system_attrs for t in trials[1:]), shown
    l0 = trials[0].values[0]
    farthest = max([4.0, 16.0], key=lambda t: abs(math.log(l0 / t)))
    assert trials[1].system_attrs[TARGET_ATTR] == farthest, shown
    assert len({t.params[PARAM] for t in trials}) == 4, shown
    print("L0 per trial:", [(round(t.params[PARAM], 4), round(t.values[0], 2)) for t in trials])
