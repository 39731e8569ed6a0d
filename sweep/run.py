"""`python -m sweep.run search_space.yaml`: one Optuna study per SAE type through Ray Tune.

Each arm (SAE type) gets its own multi-objective Optuna study (default objectives: eval L0 and
eval CE-loss increase, both minimized) and the same trial budget, run by the arm's Ray Tune
`Tuner` (`sweep.tuner`); each trial is a Ray Train `TorchTrainer` (see `sweep.trial`). Results
land in `<storage_path>/<name>/`; rerunning the same command resumes an interrupted sweep. At
the end the frontier report is written (`sweep.report`). `--dry-run` validates the file and
prints the trials without training. This module is the command line and the checks made
before Ray starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsify import MissingPackageError, SparsifyError, load_env_file, redact
from sweep import interrupt
from sweep.init_from import arm_order, select_sources
from sweep.records import SweepDir
from sweep.space import SPACE_RECORD, LoadedSpace, SearchSpace, describe_strategy, load_search_space
from sweep.storage import SweepStore, as_store, child_uri, is_uri

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


def sweep_folder(storage_path: str, name: str) -> SweepStore:
    """The one place a sweep's folder is built: storage_path / name, as a `SweepStore`: an
    absolute local folder, or a URI that `pyarrow.fs` resolves (`s3://bucket/prefix`, `gs://...`)
    with `name` appended to its path (its query string, such as S3's `endpoint_override`, kept).

    Raises:
        SparsifyError: a local storage_path (or the folder in it) that is a file.
    """
    if is_uri(storage_path):
        return SweepStore(child_uri(storage_path, name))
    storage = Path(storage_path).expanduser()
    for folder in (storage, storage / name):
        if folder.exists() and not folder.is_dir():
            raise SparsifyError(f"storage_path: {folder} is a file, not a folder")
    return SweepStore(str((storage / name).resolve()))


DRY_RUN_SHOWN = 20
"""Trials per arm a dry run prints."""


def dry_run(loaded: LoadedSpace, num_samples: int, sweep_dir: SweepStore | None = None) -> None:
    """Print every arm's fixed settings and `num_samples` sampled trial configs (validated); a
    fine-tune arm's (`init_from`) with its source arm's sample values, and the source trials it
    would start from now when `sweep_dir` already holds some."""
    space = loaded.space
    print(
        f"sweep {space.name}: {len(space.arms)} arms x {num_samples} trials; objectives "
        f"{', '.join(f'{o.metric} ({o.mode})' for o in space.objectives)}"
    )
    baseline = space.baseline_arm()
    if baseline is not None:
        print(f"baseline (the verdict compares every other arm with it): {baseline}")
    if space.seeds > 1:
        print(f"each point trained {space.seeds} times (seeds)")
    for arm_name in arm_order(space):
        arm = space.arms[arm_name]
        if arm.init_from is not None:
            print(f"\narm {arm_name}: starts from the SAEs of arm {arm.init_from.arm}'s trials (init_from)")
            _print_fine_tune(loaded, arm_name, num_samples, sweep_dir)
            continue
        searched = ", ".join(f"{p} ~ {d.type}" for p, d in arm.search.items()) or "nothing"
        print(f"\narm {arm_name}: searches {searched}")
        first = loaded.trial_config(arm_name, loaded.corner_trials(arm_name)[0])
        loss = ", ".join(f"{term} {'searched' if f'loss.{term}.coeff' in arm.search else f'{coeff:g}'}"
                         for term, coeff in first.loss.coeffs().items())  # fmt: skip
        print(f"  SAE positions: {', '.join(first.saes.sae_positions)}; {_describe_saes(first, arm.search)}")
        print(f"  loss: {loss}")
        print(f"  {describe_strategy(space, arm_name)}")
        shown_trials = min(num_samples, DRY_RUN_SHOWN)
        trials = loaded.sample_trials(arm_name, shown_trials)
        if space.strategy == "match":
            # the real coefficients are chosen as trials finish: show what runs before that
            shown_trials = min(num_samples, len(arm.initial_points) + 1)
            trials = [
                *arm.initial_points,
                {**trials[-1], arm.match_param: _mid_range(arm.search[arm.match_param])},
            ]
            trials = trials[:shown_trials]
        for i, params in enumerate(trials):
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
            more = "more, each aimed at the emptiest target" if space.strategy == "match" else "more"
            print(f"  ... and {num_samples - shown_trials} {more}")


def _print_fine_tune(
    loaded: LoadedSpace, arm_name: str, num_samples: int, sweep_dir: SweepStore | None
) -> None:
    """The dry run of a fine-tune arm: where its trials start, and its config at the source
    arm's first sample values (its real trials take their sources' values)."""
    space = loaded.space
    init_from = space.arms[arm_name].init_from
    assert init_from is not None
    print(f"  {describe_strategy(space, arm_name)}")
    print(
        f"  at most {num_samples} trials (num_samples); the pretrained SAEs are retrained (retrain_saes: true)"
    )
    params = loaded.sample_trials(arm_name, 1)[0]
    cfg = loaded.trial_config(arm_name, params)
    terms = ", ".join(f"{term} {coeff:g}" for term, coeff in cfg.loss.coeffs().items())
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    print(f"  SAE positions: {', '.join(cfg.saes.sae_positions)}")
    print(
        f"  e.g. from a {init_from.arm} trial with {shown or 'no searched values'} | loss {terms} "
        f"| {cfg.n_samples} samples x {cfg.train_data.n_ctx} tokens | model {cfg.model_name}"
    )
    if sweep_dir is None or not sweep_dir.exists():
        print(f"  sources: chosen once arm {init_from.arm} has run")
        return
    sources = select_sources(space, sweep_dir, arm_name, num_samples)
    if not sources:
        print(f"  sources now: none (arm {init_from.arm} has no {init_from.select} finished trial yet)")
    for record in sources:
        print(f"  starts from {_describe_source(record)}")


def _describe_source(record: Any) -> str:
    """One source trial: `<arm>/<trial_id> (eval/L0 ..., eval/ce_loss_increase ...)`."""
    from sparsify.metric_names import EVAL_CE_LOSS_INCREASE, EVAL_L0

    values = ", ".join(
        f"{name} {record.metrics[name]:.4g}"
        for name in (EVAL_L0, EVAL_CE_LOSS_INCREASE)
        if name in record.metrics
    )
    return f"{record.arm}/{record.trial_id} ({values})"


def _describe_saes(cfg: Any, search: dict[str, Any]) -> str:
    """`relu SAEs, dictionary size 2 x d_in` / `topk SAEs (k searched), ...`."""
    saes = cfg.saes
    k = "" if saes.k is None else f" (k {'searched' if 'saes.k' in search else saes.k})"
    return f"{saes.architecture} SAEs{k}, dictionary size {saes.dict_size_to_input_ratio:g} x d_in"


def _mid_range(dist: Any) -> float | int:
    """Where `strategy: match` starts without initial points: the middle of the range (geometric
    for loguniform and int, an int rounded), as `sweep.match.MatchSampler` does with no trial."""
    low, high = float(dist.low), float(dist.high)
    if dist.type == "int":
        return min(max(round(math.sqrt(low * high)), int(low)), int(high))
    return math.sqrt(low * high) if dist.type == "loguniform" else (low + high) / 2


def on_cluster() -> bool:
    """Whether `RAY_ADDRESS` names a cluster to join (`ray job submit` sets it; `auto` joins
    the cluster started on this node with `ray start`)."""
    return os.environ.get("RAY_ADDRESS", "local") not in ("", "local")


def start_ray() -> Any:
    """Connect to the cluster `RAY_ADDRESS` names, or else start a new local Ray with the
    dashboard on loopback: never silently join some other Ray already running here. Every
    worker process of a local Ray gets RAY_ADDRESS = that Ray's GCS address
    (`own_cluster_setup_hook`), so that nothing in it looks for its cluster among the Ray
    instances running on the machine."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    if on_cluster():
        return ray.init(log_to_driver=True)
    return ray.init(
        address="local",
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env={"worker_process_setup_hook": own_cluster_setup_hook()},
    )


def own_cluster_setup_hook() -> Callable[[], None]:
    """A Ray `worker_process_setup_hook` that sets RAY_ADDRESS, in each worker process of the
    job (tasks and actors, detached ones too: they inherit the job's runtime environment), to
    the GCS address of the Ray the worker belongs to.

    Why: Ray's state API (`ray.util.state.get_actor`) finds its cluster by RAY_ADDRESS, else
    by listing the GCS processes running on the machine, and fails ("Found multiple active Ray
    instances") when there are several, e.g. a second sweep, a test run or `ray start`. Ray
    Train's detached `PlacementGroupCleaner` asks it whether a trial's Train controller is
    alive; when that fails it never frees the placement group of a trial that ASHA stopped,
    and the next trial waits for its workers forever (ray#54305 again). The address is only
    known once Ray has started, hence a hook that each worker runs as it starts rather than
    an environment variable set here.

    Returns:
        The hook: a nested function, so Ray pickles it by value and workers run it without
        importing this module (and torch).
    """

    def set_ray_address_to_own_cluster() -> None:
        import os

        import ray

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address

    return set_ray_address_to_own_cluster


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


def _recorded_space(text: str) -> str | None:
    """A recorded search space, re-validated so that fields added since it was written read as
    their defaults (a sweep started by an older version resumes), as `check_same_space` compares it."""
    try:
        recorded = json.loads(text)
        space = SearchSpace.model_validate(recorded["space"]).model_dump(mode="json")
    except (ValueError, KeyError, TypeError):
        return None
    return json.dumps({"space": space, "base": recorded.get("base")}, sort_keys=True)


def check_same_space(loaded: LoadedSpace, sweep_dir: SweepDir) -> None:
    """A rerun resumes the sweep in its folder: refuse if the search space has changed since
    (its trials and Optuna studies belong to the old one); record it on the first run."""
    sweep_dir = as_store(sweep_dir)
    current = json.dumps({"space": loaded.space.model_dump(mode="json"), "base": loaded.base}, sort_keys=True)
    record = sweep_dir.local / SPACE_RECORD
    if sweep_dir.pull(SPACE_RECORD):
        text = record.read_text()
        if text != current and _recorded_space(text) != current:
            raise SparsifyError(
                f"{loaded.source}: sweep folder {sweep_dir} holds a sweep of a different search space; "
                "rename the sweep (name), pick another --storage, or delete that folder"
            )
        return
    sweep_dir.write_bytes(SPACE_RECORD, current.encode())


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


def run_sweep(loaded: LoadedSpace, sweep_dir: SweepDir, num_samples: int) -> Path:
    """Run every arm's trials, then write and return the report (`sweep.report`)."""
    sweep_dir = as_store(sweep_dir)
    require_sweep_packages()
    if not on_cluster():
        check_resources(loaded)
    from sparsify import prepare, quiet_library_progress_bars
    from sweep.report import build_report
    from sweep.wandb_sweep import resolve_sae_positions

    start = time.perf_counter()
    quiet_library_progress_bars()
    models: dict[str, Any] = {}
    resolve_sae_positions(loaded, models)  # a W&B sweep's reference run config: substring hook names
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
    from sweep.tuner import arm_tuner, can_resume_arm  # imports Ray: after start_ray has set its environment

    for arm_name in arm_order(loaded.space):  # sources before their fine-tunes (sweep.init_from)
        init_from = loaded.space.arms[arm_name].init_from
        chosen = [] if init_from is None else select_sources(loaded.space, sweep_dir, arm_name, num_samples)
        sources = [record.trial_id for record in chosen]
        if init_from is None:
            print(f"\n=== arm {arm_name}: {num_samples} trials ===", flush=True)
        elif can_resume_arm(sweep_dir, arm_name):  # it keeps the sources it started with
            print(f"\n=== arm {arm_name}: resuming its trials from arm {init_from.arm}'s ===", flush=True)
        elif not chosen:
            print(f"\n=== arm {arm_name}: no {init_from.select} finished trial of arm {init_from.arm} "
                  "to start from; no trials ===", flush=True)  # fmt: skip
            continue
        else:
            print(f"\n=== arm {arm_name}: {len(sources)} trials, starting from "
                  f"{'; '.join(_describe_source(r) for r in chosen)} ===", flush=True)  # fmt: skip
        # every trial's record is written as it ends (sweep.records, sweep.tuner)
        tuner = arm_tuner(loaded, arm_name, sweep_dir, num_samples, sources)
        if interrupt.fit_arm(tuner, on_ctrl_c=interrupt.second_ctrl_c_exits_at_once):
            # Tune took a Ctrl-C: it saved its state and stopped the running trials (recorded
            # `interrupted`, resumed by a rerun); no further arm starts
            raise KeyboardInterrupt
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
        if loaded.space.sampler == "grid" and num_samples > loaded.space.num_samples:
            raise SparsifyError(
                f"--num-samples: the grid has {loaded.space.num_samples} points per arm, each run "
                f"once; ask for at most that many (got {num_samples})"
            )
        try:
            sweep_dir = sweep_folder(args.storage or loaded.space.storage_path, loaded.space.name)
        except SparsifyError as exc:
            raise SparsifyError(f"{'--storage' if args.storage else loaded.source}: {exc}") from None
        if args.dry_run:
            dry_run(loaded, num_samples, sweep_dir)
            return 0
        if args.resume and not sweep_dir.exists():
            raise SparsifyError(f"--resume: no sweep folder {sweep_dir} to resume")
        # before anything heavy (the model, Ray): read-only storage or a full disk is one line now
        from sweep.storage import check_sweep_storage

        check_sweep_storage(sweep_dir, "--storage" if args.storage else "storage_path")
        print(f"sweep folder: {sweep_dir}", flush=True)
        # on object storage each run folder is uploaded as its trial ends (TensorBoard reads s3:// with boto3)
        runs = child_uri(sweep_dir.uri, "runs") if sweep_dir.remote else sweep_dir.local / "runs"
        print(f"TensorBoard: tensorboard --logdir {runs}", flush=True)
        interrupt.new_sweep_run()
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, interrupt.stop_on_ctrl_c) if in_main_thread else None
        try:
            report = run_sweep(loaded, sweep_dir, num_samples)
        except KeyboardInterrupt:
            previous = None  # stopping: a second Ctrl-C exits at once
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
    except KeyboardInterrupt:
        # Ray shuts down as this process exits, which takes seconds: the next Ctrl-C cuts that short
        interrupt.second_ctrl_c_exits_at_once()
        interrupt.report_interrupted()
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
