"""`python -m sweep.run search_space.yaml`: one Optuna study per SAE type through Ray Tune.

Each arm (SAE type) gets its own multi-objective Optuna study (default objectives: eval L0 and
eval CE-loss increase, both minimized) and the same trial budget; each trial is a Ray Train
`TorchTrainer` (see `sweep.trial`). Results land in `<storage_path>/<name>/`; rerunning the
same command resumes an interrupted sweep. At the end the frontier report is written
(`sweep.report`). `--dry-run` validates the file and prints the trials without training.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from sparsify.atomic import atomic_write_text
from sparsify.errors import MissingPackageError, SparsifyError
from sparsify.redact import redact
from sparsify.tracking import load_env_file
from sweep.space import Distribution, LoadedSpace, load_search_space

logger = logging.getLogger(__name__)

# Ray settings that must be in the environment before `import ray` reaches the workers
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_AIR_NEW_OUTPUT": "0",
    # Tune's experiment state at most this many seconds old when a sweep is killed (default 10)
    "TUNE_GLOBAL_CHECKPOINT_S": "2",
}


def sweep_folder(storage_path: str, name: str) -> Path:
    """The one place a sweep's folder path is built: storage_path / name (absolute).

    Raises:
        SparsifyError: for a URI (`s3://...`): trial records and SAE runs are written with local
            file I/O, so on a cluster use a shared filesystem path (e.g. an NFS/EFS mount).
    """
    if "://" in storage_path:
        raise SparsifyError(
            f"storage_path: {storage_path!r} is a URI; use a local or shared-filesystem folder "
            "(e.g. an EFS/NFS mount on every node)"
        )
    storage = Path(storage_path).expanduser()
    for folder in (storage, storage / name):
        if folder.exists() and not folder.is_dir():
            raise SparsifyError(f"storage_path: {folder} is a file, not a folder")
    return (storage / name).resolve()


def to_tune(dist: Distribution) -> Any:
    """A search-space distribution as a Ray Tune sampler (OptunaSearch converts it)."""
    from ray import tune

    if dist.type in ("loguniform", "uniform", "int"):
        assert dist.low is not None and dist.high is not None  # the schema requires them
        if dist.type == "loguniform":
            return tune.loguniform(dist.low, dist.high)
        if dist.type == "uniform":
            return tune.uniform(dist.low, dist.high)
        return tune.randint(int(dist.low), int(dist.high) + 1)
    return tune.choice(list(dist.values or []))


def optuna_sampler(name: str, seed: int) -> Any:
    """The Optuna sampler a search space names, seeded."""
    import optuna

    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    return samplers[name]()


DRY_RUN_SHOWN = 20
"""Trials per arm a dry run prints."""


def dry_run(loaded: LoadedSpace, num_samples: int) -> None:
    """Print every arm's fixed settings and `num_samples` sampled trial configs (validated)."""
    space = loaded.space
    print(
        f"sweep {space.name}: {len(space.arms)} arms x {num_samples} trials; objectives "
        f"{', '.join(f'{o.metric} ({o.mode})' for o in space.objectives)}"
    )
    for arm_name, arm in space.arms.items():
        searched = ", ".join(f"{p} ~ {d.type}" for p, d in arm.search.items()) or "nothing"
        print(f"\narm {arm_name}: searches {searched}")
        shown_trials = min(num_samples, DRY_RUN_SHOWN)
        for i, params in enumerate(loaded.sample_trials(arm_name, shown_trials)):
            cfg = loaded.trial_config(arm_name, params)
            shown = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
            )
            terms = ", ".join(f"{term} {coeff:g}" for term, coeff in cfg.loss.coeffs().items())
            print(
                f"  trial {i}: {shown or '(no searched parameters)'} | loss {terms} "
                f"| {cfg.n_samples} samples x {cfg.train_data.n_ctx} tokens | model {cfg.model_name}"
            )
        if num_samples > shown_trials:
            print(f"  ... and {num_samples - shown_trials} more")


def on_cluster() -> bool:
    """Whether `RAY_ADDRESS` names a cluster to join (`ray job submit` sets it; `auto` joins
    the cluster started on this node with `ray start`)."""
    return os.environ.get("RAY_ADDRESS", "local") not in ("", "local")


def start_ray() -> Any:
    """Connect to the cluster `RAY_ADDRESS` names, or else start a new local Ray with the
    dashboard on loopback: never silently join some other Ray already running here."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    if on_cluster():
        return ray.init(log_to_driver=True)
    return ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")


def check_resources(loaded: LoadedSpace) -> None:
    """Fail fast, before Ray starts, when one trial asks for more than this machine has (it
    would wait forever). Not used on a cluster, where the autoscaler may add the nodes."""
    import torch

    res = loaded.space.resources
    have_cpu, have_gpu = os.cpu_count() or 1, torch.cuda.device_count()
    need_cpu = res.num_workers * res.cpus_per_worker
    need_gpu = res.num_workers * res.gpus_per_worker
    if need_cpu > have_cpu or need_gpu > have_gpu:
        raise SparsifyError(
            f"{loaded.source}: resources: one trial needs {need_cpu:g} CPUs and {need_gpu:g} GPUs; this "
            f"machine has {have_cpu} CPUs and {have_gpu} GPUs (on a cluster, set RAY_ADDRESS, e.g. auto)"
        )


SPACE_RECORD = "search_space.json"
"""The validated search space a sweep folder was started with (a rerun must match it)."""


def check_same_space(loaded: LoadedSpace, sweep_dir: Path) -> None:
    """A rerun resumes the sweep in its folder: refuse if the search space has changed since
    (its trials and Optuna studies belong to the old one); record it on the first run."""
    current = json.dumps({"space": loaded.space.model_dump(mode="json"), "base": loaded.base}, sort_keys=True)
    record = sweep_dir / SPACE_RECORD
    if record.exists():
        if record.read_text() != current:
            raise SparsifyError(
                f"{loaded.source}: sweep folder {sweep_dir} holds a sweep of a different search space; "
                "rename the sweep (name), pick another --storage, or delete that folder"
            )
        return
    atomic_write_text(record, current)


def arm_tuner(loaded: LoadedSpace, arm_name: str, sweep_dir: Path, num_samples: int) -> Any:
    """The Tuner of one arm: its own Optuna study (journal file under `optuna/`), resumed from
    the sweep folder when an earlier run of it was interrupted."""
    import optuna
    from ray import tune

    from sweep.progress import make_progress_callback
    from sweep.trial import ARM_KEY, FailNonFiniteOptunaSearch, run_trial

    space = loaded.space
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, space=loaded, sweep_dir=str(sweep_dir)),
        # the driver function holds (almost) nothing; the Train workers hold the CPUs/GPUs
        {"cpu": 0, "memory": 2**20},
    )
    experiment = sweep_dir / "ray_tune" / arm_name
    if tune.Tuner.can_restore(str(experiment)):
        logger.info("resuming arm %s from %s", arm_name, experiment)
        return tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    journal = sweep_dir / "optuna" / f"{arm_name}.journal"
    journal.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.create_study(
        storage=storage,
        study_name=arm_name,
        load_if_exists=True,
        directions=["minimize" if m == "min" else "maximize" for m in space.modes],
    )
    study.set_metric_names(space.metrics)
    searcher = FailNonFiniteOptunaSearch(
        metric=space.metrics, mode=space.modes, sampler=optuna_sampler(space.sampler, space.seed),
        storage=storage, study_name=arm_name, points_to_evaluate=space.arms[arm_name].initial_points or None,
    )  # fmt: skip
    param_space = {ARM_KEY: arm_name, **{p: to_tune(d) for p, d in space.arms[arm_name].search.items()}}
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=asha_scheduler(loaded, arm_name),
            num_samples=num_samples,
            max_concurrent_trials=space.max_concurrent_trials,
            trial_dirname_creator=lambda trial: f"{arm_name}_{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=arm_name,
            storage_path=str(sweep_dir / "ray_tune"),
            verbose=1,
            callbacks=[make_progress_callback(sweep_dir, arm_name, num_samples)],
            progress_reporter=tune.CLIReporter(
                metric_columns={m: m for m in space.metrics},
                parameter_columns=list(space.arms[arm_name].search),
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
    from ray.tune.schedulers import ASHAScheduler

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


def record_unfinished(results: Any, arm_name: str, sweep_dir: Path) -> None:
    """Write a trial record for every trial that errored or that ASHA stopped (finished and
    diverged ones wrote their own). A stopped trial keeps its last, half-trained eval metrics,
    marked `stopped` so that no frontier uses them."""
    from sweep.results import trial_record_path, write_trial_record

    for result in results:
        trial_id = Path(result.path).name.removeprefix(f"{arm_name}_")
        if trial_record_path(sweep_dir, arm_name, trial_id).exists():
            continue
        params = {k: v for k, v in (result.config or {}).items() if k != "arm"}
        record = {"arm": arm_name, "trial_id": trial_id, "params": params, "wall_time_s": None}
        if result.error is not None:
            message = str(result.error).strip().splitlines()
            error = message[-1] if message else type(result.error).__name__
            record.update(status="error", metrics={}, error=error)
        else:
            metrics = {k: v for k, v in (result.metrics or {}).items() if k.startswith("eval/")}
            record.update(status="stopped", metrics=metrics, error="stopped early by ASHA")
        write_trial_record(sweep_dir, record)


SWEEP_PACKAGES = ("ray", "optuna", "pandas", "matplotlib")
"""Imported by a real sweep (not by --dry-run); installed by the `sweep` extra."""


def require_sweep_packages() -> None:
    """Raises MissingPackageError, saying how to install them, when a sweep's packages are
    missing (checked before anything is loaded or written)."""
    import importlib.util

    missing = []
    for name in SWEEP_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise MissingPackageError(
            f"a sweep needs {', '.join(missing)}, which is not installed: pip install -e '.[sweep]'"
        )


def run_sweep(loaded: LoadedSpace, sweep_dir: Path, num_samples: int) -> Path:
    """Run every arm's trials, then write and return the report (`sweep.report`)."""
    require_sweep_packages()
    if not on_cluster():
        check_resources(loaded)
    from sparsify import prepare, quiet_library_progress_bars
    from sweep.report import build_report

    start = time.perf_counter()
    quiet_library_progress_bars()
    models: dict[str, Any] = {}
    checked: set[str] = set()
    for arm_name in loaded.space.arms:
        # the edges of the search: a searched n_ctx, hook or data size fails here, not in trial 37
        corners = loaded.corner_trials(arm_name)
        print(f"checking arm {arm_name} at {len(corners)} corners of its search (model and data are "
              "cached after the first run) ...", flush=True)  # fmt: skip
        for params in corners:
            cfg = loaded.trial_config(arm_name, params)
            key = cfg.model_dump_json()
            if key in checked:
                continue
            checked.add(key)
            try:
                models[cfg.model_name] = prepare(cfg, models.get(cfg.model_name))
            except SparsifyError as exc:
                shown = ", ".join(f"{k}={v}" for k, v in params.items())
                where = f" (at {shown})" if shown else ""
                raise type(exc)(f"{loaded.source}: arms.{arm_name}{where}: {exc}") from None
    models.clear()  # the driver does not need the weights while trials run
    check_same_space(loaded, sweep_dir)
    context = start_ray()
    dashboard = getattr(context, "dashboard_url", None)
    if dashboard:
        print(f"Ray dashboard: http://{dashboard}", flush=True)
    for arm_name in loaded.space.arms:
        print(f"\n=== arm {arm_name}: {num_samples} trials ===", flush=True)
        results = arm_tuner(loaded, arm_name, sweep_dir, num_samples).fit()
        record_unfinished(results, arm_name, sweep_dir)
    report = build_report(sweep_dir)
    print(f"\nsweep finished in {time.perf_counter() - start:.0f} s", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweep.run", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("search_space", help="search-space YAML (see search_spaces/)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the trials; train nothing")
    parser.add_argument("--num-samples", type=int, help="trials per arm (overrides the file)")
    parser.add_argument("--storage", help="storage folder (overrides storage_path)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep (also automatic when its folder exists)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    load_env_file()  # W&B credentials, if a .env is here (before Ray starts: workers inherit them)
    try:
        loaded = load_search_space(args.search_space)
        num_samples = loaded.space.num_samples if args.num_samples is None else args.num_samples
        if num_samples < 1:
            raise SparsifyError(f"--num-samples: must be >= 1 (got {num_samples})")
        try:
            sweep_dir = sweep_folder(args.storage or loaded.space.storage_path, loaded.space.name)
        except SparsifyError as exc:
            raise SparsifyError(f"{'--storage' if args.storage else loaded.source}: {exc}") from None
        if args.dry_run:
            dry_run(loaded, num_samples)
            return 0
        if args.resume and not sweep_dir.exists():
            raise SparsifyError(f"--resume: no sweep folder {sweep_dir} to resume")
        print(f"sweep folder: {sweep_dir}", flush=True)
        print(f"TensorBoard: tensorboard --logdir {sweep_dir / 'runs'}", flush=True)
        report = run_sweep(loaded, sweep_dir, num_samples)
    except KeyboardInterrupt:
        print("interrupted: finished trials are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except SparsifyError as exc:
        if args.debug:
            raise
        message = str(exc)
        if not message.startswith((args.search_space, str(Path(args.search_space)))):
            message = f"{args.search_space}: {message}"  # every error line names the file
        print(f"error: {redact(message)}", file=sys.stderr)
        return 2
    print(report.read_text())
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
