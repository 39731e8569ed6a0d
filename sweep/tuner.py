"""One arm's Ray Tune `Tuner`: its Optuna study, ASHA scheduler and callbacks (docs/design.md §7, §9).

`arm_tuner` builds (or restores) the Tuner that runs the arm's trials (`sweep.trial.run_trial`).
Its `TrialRecordCallback` writes the record of every trial that ends without writing its own
(an error, a stop by ASHA, a Ctrl-C) the moment Tune ends it, so the sweep folder knows every
ended trial while the sweep runs; the progress line (`sweep.progress`) reads those records.
`CtrlCRelay` lets `sweep.interrupt.fit_arm` learn of a Ctrl-C that Tune takes itself.
Imports Ray: `sweep.run` imports this module only after `start_ray`.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from sparsify import SparsifyError, redact
from sparsify import metric_names as names
from sweep.init_from import INIT_FROM_KEY, fine_tune_start
from sweep.interrupt import CTRL_C, relay_ctrl_c
from sweep.match import match_sampler
from sweep.progress import make_progress_callback
from sweep.records import (
    DIVERGED,
    ERROR,
    FINISHED,
    INTERRUPTED,
    INTERRUPTED_BY_USER,
    STOPPED,
    STOPPED_BY_ASHA,
    Status,
    SweepDir,
    TrialRecord,
    has_final_trial_record,
    write_trial_record,
)
from sweep.space import Distribution, LoadedSpace
from sweep.storage import SweepStore, as_store
from sweep.trial import ARM_KEY, run_trial

logger = logging.getLogger(__name__)

HEAD_NODE_RESOURCE = "node:__internal_head__"
"""A resource only Ray's head node has (`ray._common.constants.HEAD_NODE_RESOURCE_NAME`):
asking for a sliver of it places an actor there."""


def to_tune(dist: Distribution) -> Any:
    """A search-space distribution as a Ray Tune sampler (OptunaSearch converts it)."""
    if dist.type in ("loguniform", "uniform", "int"):
        assert dist.low is not None and dist.high is not None  # the schema requires them
        if dist.type == "loguniform":
            return tune.loguniform(dist.low, dist.high)
        if dist.type == "uniform":
            return tune.uniform(dist.low, dist.high)
        return tune.randint(int(dist.low), int(dist.high) + 1)
    return tune.choice(list(dist.values or []))


class TuneGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, without its `study.stop()` once every point has run: that works
    only inside `study.optimize`, and OptunaSearch tells trials outside it (the last one would
    raise). Tune's `num_samples` (the grid size) ends the arm instead. Trial number k < the grid
    size runs grid point k (of the seeded shuffle), so each point runs once."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        pass


def optuna_sampler(name: str, seed: int, search: dict[str, Distribution] | None = None) -> Any:
    """The Optuna sampler a search space names, seeded (`strategy: sample`; `strategy: match`
    uses `sweep.match.match_sampler`); `grid` runs over the categorical values of `search`."""
    if name == "grid":
        return TuneGridSampler(
            {path: list(dist.values or []) for path, dist in (search or {}).items()}, seed=seed
        )
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    return samplers[name]()


TUNE_DIR = "ray_tune"
"""Ray Tune's experiments under the sweep folder, one per arm."""


def optuna_journal(arm_name: str) -> str:
    """An arm's Optuna journal, relative to the sweep folder."""
    return f"optuna/{arm_name}.journal"


def can_resume_arm(sweep_dir: SweepDir, arm_name: str) -> bool:
    """Whether an earlier run of the sweep left the arm's Tune experiment to resume."""
    path, filesystem = as_store(sweep_dir).ray_storage(f"{TUNE_DIR}/{arm_name}")
    return tune.Tuner.can_restore(path, storage_filesystem=filesystem)


def arm_tuner(
    loaded: LoadedSpace, arm_name: str, sweep_dir: SweepDir, num_samples: int, sources: Sequence[str] = ()
) -> Any:
    """The Tuner of one arm: its own Optuna study (journal file under `optuna/`), resumed from
    the sweep folder when an earlier run of it was interrupted. A fine-tune arm (`init_from`)
    has no study: its Tuner runs one trial per source trial, in the order given (Tune's grid
    over `INIT_FROM_KEY`), and a resumed one keeps the sources it was started with.

    Args:
        loaded: The validated search space.
        arm_name: The arm whose trials the Tuner runs.
        sweep_dir: The sweep's storage (records, runs, Tune and Optuna state).
        num_samples: The arm's trial budget.
        sources: A fine-tune arm's source trial ids (`sweep.init_from.select_sources`).

    Returns:
        A `ray.tune.Tuner`; its `fit()` runs the trials.

    Raises:
        SparsifyError: early stopping for trials that do not eval before they end; a new
            fine-tune arm without sources.
    """
    space = loaded.space
    sweep_dir = as_store(sweep_dir)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, space=loaded, sweep_dir=sweep_dir.uri),
        # the driver function holds (almost) nothing; the Train workers hold the CPUs/GPUs. It
        # runs on the head node (as Ray Train's own PlacementGroupCleaner does): the trial's Train
        # controller runs beside it, so a lost worker node then loses only Train workers, which
        # Ray Train restarts from the last checkpoint; on that node it would error the trial
        {"cpu": 0, "memory": 2**20, HEAD_NODE_RESOURCE: 0.001},
    )
    # the driver keeps the journal and uploads it as trials end (JournalUpload): on a fresh
    # driver machine, the bucket's copy is the study (docs/design.md §15)
    sweep_dir.pull(optuna_journal(arm_name))
    if can_resume_arm(sweep_dir, arm_name):
        experiment, filesystem = sweep_dir.ray_storage(f"{TUNE_DIR}/{arm_name}")
        logger.info("resuming arm %s from %s", arm_name, experiment)
        return tune.Tuner.restore(
            experiment, trainable=trainable, resume_errored=True, storage_filesystem=filesystem
        )
    init_from = space.arms[arm_name].init_from
    if init_from is not None:
        if not sources:
            raise SparsifyError(f"arms.{arm_name}: no source trial of arm {init_from.arm} to start from")
        return _tuner(
            loaded, arm_name, sweep_dir, trainable, len(sources),
            param_space={ARM_KEY: arm_name, INIT_FROM_KEY: tune.grid_search(list(sources))},
            tune_samples=1, search_alg=None,
        )  # fmt: skip
    storage = journal_storage(sweep_dir, arm_name)
    study = optuna.create_study(
        storage=storage,
        study_name=arm_name,
        load_if_exists=True,
        directions=["minimize" if m == "min" else "maximize" for m in space.modes],
    )
    study.set_metric_names(space.metrics)
    if space.strategy == "match":  # aim the arm's trials at the targets (sweep/match.py)
        sampler = match_sampler(space, arm_name)
    else:
        sampler = optuna_sampler(space.sampler, space.seed, space.arms[arm_name].search)
    searcher = FailNonFiniteOptunaSearch(
        metric=space.metrics, mode=space.modes, sampler=sampler,
        storage=storage, study_name=arm_name, points_to_evaluate=space.arms[arm_name].initial_points or None,
    )  # fmt: skip
    searcher.sweep_uri = sweep_dir.uri
    param_space = {ARM_KEY: arm_name, **{p: to_tune(d) for p, d in space.arms[arm_name].search.items()}}
    return _tuner(loaded, arm_name, sweep_dir, trainable, num_samples, param_space, num_samples, searcher)


def _tuner(
    loaded: LoadedSpace,
    arm_name: str,
    sweep_dir: SweepStore,
    trainable: Any,
    num_samples: int,
    param_space: dict[str, Any],
    tune_samples: int,
    search_alg: Any,
) -> Any:
    """A new Tuner of one arm's `num_samples` trials: `tune_samples` draws of `param_space`
    by `search_alg` (None: Tune's own generator, which runs each grid value once per draw)."""
    space = loaded.space
    source = space.arms[arm_name].init_from
    storage_path, storage_filesystem = sweep_dir.ray_storage(TUNE_DIR)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=asha_scheduler(loaded, arm_name),
            num_samples=tune_samples,
            max_concurrent_trials=space.max_concurrent_trials,
            trial_dirname_creator=lambda trial: f"{arm_name}_{trial.trial_id}",
            # no reuse_actors: a trial ASHA stops is ended by killing its actor, which ends its
            # Ray Train run; a reused actor would keep that run going beside the next trial
        ),
        run_config=tune.RunConfig(
            name=arm_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            verbose=1,
            # Tune calls callbacks in this order: the record first, which the progress line reads
            callbacks=[
                TrialRecordCallback(sweep_dir, arm_name, None if source is None else source.arm),
                make_progress_callback(sweep_dir, arm_name, num_samples),
                CtrlCRelay(),
                JournalUpload(sweep_dir, optuna_journal(arm_name)),
            ],
            progress_reporter=tune.CLIReporter(
                metric_columns={m: m for m in space.metrics},
                parameter_columns=[p for p in param_space if p != ARM_KEY],
                max_report_frequency=60,
            ),
        ),
    )


def asha_scheduler(loaded: LoadedSpace, arm_name: str) -> Any:
    """The arm's ASHA scheduler (`early_stopping`), or None. Its time unit is the trial's evals
    (each `eval_every_n_samples`, then the final one).

    Raises:
        SparsifyError: early stopping for trials that do not eval before they end.
    """
    rule = loaded.space.early_stopping
    if rule is None:
        return None
    max_evals = 1
    for params in loaded.corner_trials(arm_name):
        cfg = loaded.trial_config(arm_name, params)
        if cfg.eval_every_n_samples is None or cfg.eval_data is None:
            raise SparsifyError(
                f"{loaded.source}: early_stopping: arms.{arm_name} trials must eval while they train; "
                "set eval_data and eval_every_n_samples in base_config"
            )
        max_evals = max(max_evals, cfg.n_samples // cfg.eval_every_n_samples + 1)
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=rule.metric,
        mode=rule.mode,
        max_t=max_evals,
        grace_period=min(rule.grace_period, max_evals),
        reduction_factor=rule.reduction_factor,
    )


def journal_storage(sweep_dir: SweepStore, arm_name: str) -> Any:
    """The arm's Optuna storage: a journal file in the sweep folder (this driver's mirror of it
    on object storage), written by this driver alone."""
    journal = sweep_dir.local / optuna_journal(arm_name)
    journal.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(journal)))


class JournalUpload(tune.Callback):
    """Uploads the arm's Optuna journal to object storage whenever it has grown (checked at
    each step of Tune's loop, and at the end): a driver that dies loses at most the last
    trial's `tell`, which its record still has. Nothing for a local sweep."""

    def __init__(self, sweep_dir: SweepStore, journal: str) -> None:
        self.sweep_dir = sweep_dir
        self.journal = journal
        self.pushed_size = -1

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        self._push()

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self._push()

    def _push(self) -> None:
        path = self.sweep_dir.local / self.journal
        if not self.sweep_dir.remote or not path.is_file() or path.stat().st_size == self.pushed_size:
            return
        size = path.stat().st_size
        self.sweep_dir.push(self.journal)
        self.pushed_size = size


class FailNonFiniteOptunaSearch(OptunaSearch):
    """OptunaSearch that records a trial with NaN/missing objectives as FAIL, and that reopens
    its journal in this driver's sweep folder when Tune restores it.

    Plain OptunaSearch passes NaN to `study.tell`, which Optuna 5 rejects, leaving the trial
    RUNNING in the stored study forever. And its saved state holds the journal's path as the
    first driver had it: a driver on another machine (a sweep on object storage has its own
    mirror folder on each) would open a journal that is not there.
    """

    sweep_uri: str | None = None
    """The sweep's `SweepStore.uri`, set by `arm_tuner`; None in a searcher saved before it was."""

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        if self.sweep_uri is None or self._ot_study is None:
            return
        store = as_store(self.sweep_uri)
        arm_name = self._ot_study.study_name
        store.pull(optuna_journal(arm_name))
        self._storage = journal_storage(store, arm_name)
        self._ot_study = optuna.load_study(study_name=arm_name, storage=self._storage, sampler=self._sampler)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result is not None and not error:
            values = [result.get(m) for m in self.metric]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                result, error = None, True
        super().on_trial_complete(trial_id, result=result, error=error)


class TrialRecordCallback(tune.Callback):
    """Writes the record of each trial of one arm that ends without writing its own, when Tune
    ends it, with a status that says what happened:

    - `error`: Tune reports the trial failed (`error`: the last line of its error message);
    - `stopped`: the scheduler (ASHA) stopped it, the only other way a trial that did not
      report its own outcome completes; it keeps its last, half-trained eval metrics so that
      no frontier uses them;
    - `interrupted`: it was live in this run and Tune ended it while ending the whole run
      (Ctrl-C), which calls no trial callback; it keeps its last eval metrics. Tune saved the
      experiment state before, with the trial still running, so a rerun resumes it.

    A fine-tune arm's records also say which source trial the trial started from (`init_from`)
    and carry its source's params (`sweep.init_from`).

    Args:
        sweep_dir: The sweep's folder.
        arm: The arm whose trials the Tuner runs.
        source_arm: A fine-tune arm's source arm (`init_from.arm`); None for other arms.
    """

    def __init__(self, sweep_dir: SweepDir, arm: str, source_arm: str | None = None) -> None:
        self.sweep_dir = as_store(sweep_dir)
        self.arm = arm
        self.source_arm = source_arm
        self.live: set[str] = set()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # restored Tuners unpickle their callbacks: one pickled by an older version lacks `live`
        # (and `source_arm`)
        for key, value in {"live": set(), "source_arm": None, **state}.items():
            setattr(self, key, value)

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        self._note_live(trials)

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        # the step that sees a Ctrl-C still ends here: trials it added are noted before Tune ends them
        self._note_live(trials)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.live.add(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._record(trial, ERROR)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        # a trial completes when it returns, having written its record (finished or diverged),
        # or when the scheduler stops it (the sweep sets no other stop criteria)
        self._record(trial, STOPPED)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        for trial in trials:
            if trial.status == Trial.ERROR:
                self._record(trial, ERROR)
            elif trial.status == Trial.TERMINATED:
                # live in this run: ended with the run (Ctrl-C); else it ended in an earlier run
                # of a resumed sweep, which recorded a finish itself and wrote a stop at once
                self._record(trial, INTERRUPTED if trial.trial_id in self.live else STOPPED)

    def _note_live(self, trials: list[Trial]) -> None:
        self.live.update(t.trial_id for t in trials if t.status not in (Trial.TERMINATED, Trial.ERROR))

    def _record(self, trial: Trial, status: Status) -> None:
        """Write `trial`'s record, ended as `status` (error, stopped or interrupted), unless it
        has a final one (any but `interrupted`, which a resumed trial's end replaces)."""
        # a finished or diverged trial wrote its record before it reported its status: the
        # status also covers a shared filesystem that shows the driver that file late
        if trial.last_result.get("status") in (FINISHED, DIVERGED):
            return
        if has_final_trial_record(self.sweep_dir, self.arm, trial.trial_id):
            return
        params = {k: v for k, v in (trial.config or {}).items() if k != ARM_KEY}
        init_from = None
        if self.source_arm is not None:  # the source's params, as the trial itself records them
            source_trial = str(params.pop(INIT_FROM_KEY, ""))
            start = fine_tune_start(self.sweep_dir, self.arm, self.source_arm, source_trial, strict=False)
            params, init_from = start.params, start.record
        if status == ERROR:
            error, metrics = trial_error_line(trial), {}
        else:
            error = STOPPED_BY_ASHA if status == STOPPED else INTERRUPTED_BY_USER
            metrics = {
                k: v
                for k, v in trial.last_result.items()
                if k.startswith((f"{names.EVAL}/", f"{names.EVAL_SE}/"))
            }
        record = TrialRecord(
            arm=self.arm, trial_id=trial.trial_id, status=status, params=params, metrics=metrics, error=error,
            init_from=init_from,
        )  # fmt: skip
        write_trial_record(self.sweep_dir, record)


class CtrlCRelay(tune.Callback):
    """Puts `relay_ctrl_c` in front of the SIGINT handler that Tune installs for the run, at
    the first step: so `fit_arm` learns of a Ctrl-C the moment Tune takes it (Tune ends the run
    after the current step, saves the experiment state, stops the trials, then returns)."""

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        handler = signal.getsignal(signal.SIGINT)
        if getattr(handler, "__module__", None) == "ray.tune.tune":  # Tune's, not yet wrapped
            CTRL_C.tune_handler = handler
            signal.signal(signal.SIGINT, relay_ctrl_c)


def trial_error_line(trial: Trial) -> str:
    """The last line of a failed trial's latest error message, secrets masked.

    Tune appends `str(error)` to the trial's `error.txt` on the driver (`Trial.handle_error`,
    before it calls `on_trial_error`) and copies it to the storage folder only at its next
    experiment checkpoint, so the driver's copy is read first; the text, never the pickled
    error (nothing here unpickles files).
    """
    text = ""
    try:
        if trial.error_file and Path(trial.error_file).is_file():
            text = Path(trial.error_file).read_text(encoding="utf-8", errors="replace")
        else:
            text = str(trial.get_error() or "")
    except Exception as exc:  # a record with a vaguer error beats a crashed sweep
        logger.warning("could not read the error of trial %s: %s", trial.trial_id, exc)
    lines = text.strip().splitlines()
    return redact(lines[-1]) if lines else "failed without an error message"
