"""One sweep trial on Ray: the Tune driver function and the Ray Train worker function.

The Train V2 pattern (docs/design.md §9): Tune runs `run_trial` once per trial; it turns Tune's
parameters into a `TrainConfig`, then builds and fits a `TorchTrainer` whose workers run
`sparsify.train`. Workers call `ray.train.report` (every rank, same number of calls); the
`TuneReportCallback` forwards rank 0's eval metrics to Tune. A diverged trial (NaN/inf loss)
is reported with status "diverged" and NaN objectives; the sweep goes on.

Never losing work (docs/design.md §11): workers report a resume checkpoint every
`save_every_n_samples` (Ray Train keeps the latest); a failed worker group is restarted up to
`resources.max_failures` times and continues from that checkpoint, and so does a trial that
Tune restarts when an interrupted sweep is resumed (same Train run name, same storage). A trial
that already wrote its record is not trained again. Divergence is an outcome, not a failure:
it is never retried (it would diverge again); nor is a user error such as data too small for
the trial's config (it would fail again).

Replicates (`seeds: N`, docs/design.md §7, §11): one trial = one point = N trainings, one after
the other, each its own `TorchTrainer.fit()` (Train run `replicate_run_name`) and SAE run
folder (`replicate_sae_run_name`); each finished one leaves `replicate.json` in its Train run
folder, so a restarted trial trains only the replicates that had not finished.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import ray
import ray.train
import torch
from ray import tune
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from sparsify import (
    ENV_FILE,
    DivergedError,
    SparsifyError,
    TrainConfig,
    activations_dir,
    load_env_file,
    quiet_library_progress_bars,
    redact,
    run_dir_for,
    standard_error,
    train,
    validate_config,
)
from sparsify import metric_names as names
from sweep.init_from import INIT_FROM_KEY, FineTuneStart, fine_tune_config, fine_tune_start
from sweep.records import (
    DIVERGED,
    ERROR,
    FINISHED,
    SweepDir,
    TrialRecord,
    load_record_json,
    read_trial_record,
    write_trial_record,
)
from sweep.space import LoadedSpace
from sweep.storage import SweepStore, as_store
from sweep.timing import fit_times

logger = logging.getLogger(__name__)

ARM_KEY = "arm"
"""Tune config key holding the arm name; every other key is a dotted training-config path, but
a fine-tune arm's `sweep.init_from.INIT_FROM_KEY` (its source trial)."""


def trial_run_name(trial_id: str) -> str:
    """Ray Train run name of a trial: from the trial id, never a timestamp, so a rerun of the
    same trial finds its checkpoints."""
    return f"train_{trial_id}"


def replicate_run_name(trial_id: str, k: int) -> str:
    """Ray Train run name of replicate `k` of a trial (`seeds: N`): replicate 0's is the
    trial's own (`trial_run_name`), so a sweep keeps its Train runs whatever `seeds` is."""
    return trial_run_name(trial_id) + (f"_seed{k}" if k else "")


def replicate_sae_run_name(trial_id: str, k: int) -> str:
    """SAE run folder name (`run_name`) of replicate `k`: the trial id for replicate 0."""
    return trial_id + (f"_seed{k}" if k else "")


TRAIN_RUNS_DIR = "ray_train"
"""Ray Train's runs (checkpoints) under the sweep folder, one per replicate (`replicate_run_name`)."""

REPLICATE_FILE = "replicate.json"
"""In a replicate's Ray Train run folder: its outcome once it finished or diverged
(`{"seed", "status", "metrics", "eval_per_sequence", "error", "wall_time_s"}`), reused by a
restarted trial instead of training it again."""

USER_ERROR_FILE = "user_error.txt"
"""In a trial's Ray Train run folder: the user error a DDP rank hit, so that the worker group
Ray Train restarts ends the trial with it instead of training again (see `train_worker`)."""


def sweep_runs_dir(sweep_dir: Path, arm: str) -> Path:
    """Where each trial's SAE run folder (weights, config, metrics) lives."""
    return sweep_dir / "runs" / arm


ACTIVATION_CACHE_DIR = "activation_cache"
"""In a sweep on object storage: the activation caches of its local trials
(`sparsify.training.activation_cache`), shared by every node."""


def _fetch_inputs(store: SweepStore, cfg: TrainConfig) -> set[Path]:
    """On object storage, before a worker trains: fetch into this node's mirror the run
    folders of the SAEs it starts from (a fine-tune's source), and the sweep's activation
    caches into this node's cache folder when the trial's loss is local.

    Returns:
        The activation cache files this node had then (`_push_outputs` uploads only newer ones:
        the folder may hold other sweeps' caches).
    """
    if not store.remote:
        return set()
    for path in cfg.saes.pretrained_sae_paths or []:
        if Path(path).is_relative_to(store.local):
            store.pull_tree(Path(path).relative_to(store.local), delete=False)
    if not _may_use_activation_cache(cfg):
        return set()
    store.pull_tree(ACTIVATION_CACHE_DIR, delete=False, local_root=activations_dir())
    return set(activations_dir().glob("*")) if activations_dir().is_dir() else set()


def _may_use_activation_cache(cfg: TrainConfig) -> bool:
    """Whether the trial may read the activation cache (its loss needs neither the original
    model nor the logits; `wants_activation_cache` decides the rest once the model is built)."""
    return cfg.activation_cache != "off" and not cfg.loss.needs_original_model and not cfg.loss.needs_logits


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: train one SAE config, from the run's last checkpoint when there is one
    (a restarted worker group, or a resumed sweep); rank 0 writes the run folder and reports
    checkpoints.

    Returns:
        The outcome, which Ray Train hands to the driver as rank 0's `Result.return_value`:
        `{"status": FINISHED, "metrics": {...}, "eval_per_sequence": {...}}` (the final eval's
        per-sequence values, `TrainResult.eval_per_sequence`), `{"status": DIVERGED, "error": "..."}`
        or, for a user error (`SparsifyError`, not transient), `{"status": ERROR, ...}`
        (statuses from `sweep.records`): returned, not raised, because Ray Train retries what
        is raised, and neither would end differently on a retry (every rank diverges at the
        same check). With several ranks a user error may be one rank's alone while the others
        wait in an all-reduce, and only a raise makes Ray stop them: that rank first writes the
        error to `config["user_error_file"]`, and the restarted group returns it at once,
        before it trains or loads anything.
    """
    entered_at = time.time()  # wall clock: the trial compares it with its own (sweep.cost.fit_times)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    store = as_store(config["sweep"])
    user_error = config["user_error_file"]  # relative to the sweep folder
    if store.pull(user_error):  # an earlier attempt of this fit hit a user error: it would again
        return {"status": ERROR, "error": (store.local / user_error).read_text(encoding="utf-8")}
    if config.get("num_threads"):
        torch.set_num_threads(int(config["num_threads"]))
    quiet_library_progress_bars()
    load_env_file(config["env_file"])  # on a cluster node started by `ray start`, not our shell
    cfg = TrainConfig.model_validate(config["train_config"])
    cached_before = _fetch_inputs(store, cfg)

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)

    try:
        with _last_checkpoint() as resume_from:
            result = train(
                cfg,
                report=report,
                rank=rank,
                world_size=world_size,
                show_progress=False,
                resume_from=resume_from,
            )
    except DivergedError as exc:
        _push_outputs(store, cfg, rank, cached_before)
        return {"status": DIVERGED, "error": str(exc)}
    except SparsifyError as exc:
        if exc.transient:
            raise  # e.g. the hub was unreachable: Ray Train restarts the worker group (FailureConfig)
        if world_size > 1:
            # the others may wait in an all-reduce: raise to stop them, and leave the error
            # for the restarted group, which then ends the trial without training again
            store.write_bytes(user_error, str(exc).encode())
            raise
        # the same config would fail the same way: end the trial now, one line, no retries
        return {"status": ERROR, "error": str(exc)}
    _push_outputs(store, cfg, rank, cached_before)
    worker = {"process_started_at": psutil.Process().create_time(), "entered_at": entered_at,
              "returned_at": time.time()}  # fmt: skip
    return {"status": FINISHED, "metrics": result.metrics, "eval_per_sequence": result.eval_per_sequence,
            "worker_clock": worker}  # fmt: skip


def _push_outputs(store: SweepStore, cfg: TrainConfig, rank: int, cached_before: set[Path]) -> None:
    """On object storage, after a training ended: rank 0 uploads its run folder, and every rank
    the activation caches it wrote (the trial's record, pushed after this, marks the folder
    complete)."""
    if not store.remote:
        return
    run_dir = run_dir_for(cfg)
    if rank == 0 and run_dir is not None and run_dir.is_relative_to(store.local) and run_dir.is_dir():
        store.push_tree(run_dir.relative_to(store.local))
    if _may_use_activation_cache(cfg) and activations_dir().is_dir():
        built = set(activations_dir().glob("*")) - cached_before
        if built:
            store.push_tree(ACTIVATION_CACHE_DIR, local_root=activations_dir(), only=built)


@contextmanager
def _last_checkpoint() -> Iterator[Path | None]:
    """The folder of this Train run's latest reported checkpoint, or None on a first attempt."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        logger.info("resuming from checkpoint %s", checkpoint.path)
        yield Path(folder)


class EvalReportCallback(TuneReportCallback):
    """Forwards to Tune only the worker reports that carry eval metrics (each eval and the
    end). A report made only to hand Ray Train a checkpoint has no objectives: Tune would reject
    it, and ASHA would count it as a step."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if any(key.startswith(f"{names.EVAL}/") for key in metrics[0]):
            super().after_report(run_context, metrics, checkpoint)


def _worker_message(error: BaseException) -> str:
    failures = getattr(error, "worker_failures", {}) or {}
    first = next(iter(failures.values()), error)
    lines = str(first).strip().splitlines()
    return lines[-1] if lines else type(first).__name__


def run_trial(tune_config: dict[str, Any], space: LoadedSpace, sweep_dir: str) -> None:
    """Tune function trainable: one trial = one point = `seeds` trainings (one
    `TorchTrainer.fit()` each; one with the default `seeds: 1`).

    Writes the trial record (`sweep.records`) when the trial finishes or diverges; errors
    propagate to Tune, whose `sweep.tuner.TrialRecordCallback` records them as they happen. A
    trial that already has a finished or diverged record (Tune restarts the trials it had not
    seen end when a sweep resumes) reports that record again and trains nothing; any other
    record (`interrupted`: a Ctrl-C stopped it) does not stop it: it trains on from the Train
    run's last checkpoint, and its end replaces the record.

    With `seeds: N > 1`, replicate k trains with seed + k and the k-th data seed (`replicate_config`); a replicate
    that finished before the trial was restarted is not trained again (`REPLICATE_FILE`). Any
    replicate diverging makes the point diverged (the later ones are not trained). The record's
    metrics are the replicates' means, `eval_se/<eval metric>` their standard error across
    seeds, `replicates` each one's outcome; Tune gets the means in one final report (only
    replicate 0's intermediate evals are forwarded to it before).
    """
    start = time.perf_counter()
    arm = tune_config[ARM_KEY]
    params = {k: v for k, v in tune_config.items() if k != ARM_KEY}
    init_from = space.space.arms[arm].init_from  # a fine-tune arm: the trial's one param is its source
    source_trial = str(params.pop(INIT_FROM_KEY)) if init_from is not None else None
    trial_id = tune.get_context().get_trial_id()
    nan_objectives = {metric: math.nan for metric in space.space.metrics}
    done = read_trial_record(sweep_dir, arm, trial_id)
    if done is not None and done.status in (FINISHED, DIVERGED):
        logger.info("trial %s already ended (%s); keeping its record", trial_id, done.status)
        kept = done.metrics if done.status == FINISHED else nan_objectives
        tune.report({**kept, "status": done.status})
        return
    fine_tune = None  # raises unless the source is a finished trial (sweep.init_from)
    if init_from is not None and source_trial is not None:
        fine_tune = fine_tune_start(sweep_dir, arm, init_from.arm, source_trial)
        params = fine_tune.params  # the source's searched values, kept
    source = None if fine_tune is None else fine_tune.record
    seeds = space.space.seeds
    if seeds == 1:
        cfg = trial_config(space, sweep_dir, arm, params, fine_tune, 0)
        outcome = _fit(space, sweep_dir, arm, trial_id, cfg, 0, forward_reports=True)
        wall_time_s = time.perf_counter() - start
        replicates: list[dict[str, Any]] = []
    else:
        outcomes = []
        for k in range(seeds):
            cfg = trial_config(space, sweep_dir, arm, params, fine_tune, k)
            outcome = _replicate(space, sweep_dir, arm, trial_id, cfg, k)
            outcomes.append(outcome)
            if outcome["status"] == DIVERGED:
                outcome = {**outcome, "error": f"seed {outcome['seed']}: {outcome['error']}"}
                break
        else:
            outcome = {"status": FINISHED, "metrics": replicate_means(outcomes), "eval_per_sequence": {}}
        wall_time_s = sum(o["wall_time_s"] for o in outcomes)
        replicates = [
            {key: o[key] for key in ("seed", "metrics", "eval_per_sequence", "wall_time_s")} for o in outcomes
        ]
    if outcome["status"] == DIVERGED:
        record = TrialRecord(
            arm=arm, trial_id=trial_id, status=DIVERGED, params=params, metrics={},
            error=redact(outcome["error"]), wall_time_s=wall_time_s, init_from=source,
        )  # fmt: skip
        write_trial_record(sweep_dir, record)
        tune.report({**nan_objectives, "status": DIVERGED})
        return
    metrics = {k: v for k, v in outcome["metrics"].items() if "/" in k}
    record = TrialRecord(
        arm=arm, trial_id=trial_id, status=FINISHED, params=params, metrics=metrics, error=None,
        wall_time_s=wall_time_s, eval_per_sequence=outcome.get("eval_per_sequence") or {},
        replicates=replicates, init_from=source,
    )  # fmt: skip
    write_trial_record(sweep_dir, record)
    # Tune keeps only the last result; OptunaSearch reads the objectives from it
    tune.report({**metrics, "status": FINISHED})


def trial_config(
    space: LoadedSpace,
    sweep_dir: SweepDir,
    arm: str,
    params: dict[str, Any],
    fine_tune: FineTuneStart | None,
    k: int,
) -> TrainConfig:
    """Replicate `k`'s config before `replicate_config` changes its seeds: the arm's config at
    `params`; for a fine-tune trial (`sweep.init_from`), its source's config starting from the
    SAEs of the source's replicate `k` (its run folder `runs/<source arm>/<replicate k's name>`)."""
    if fine_tune is None:
        return space.trial_config(arm, params)
    source_run = sweep_runs_dir(as_store(sweep_dir).local, fine_tune.arm) / replicate_sae_run_name(
        fine_tune.trial, k
    )
    return fine_tune_config(space, arm, fine_tune, source_run)


def replicate_config(cfg: TrainConfig, k: int, source: str) -> TrainConfig:
    """Replicate `k`'s config: `seed` + k and the k-th data seed after `train_data.seed`
    (`cfg` itself for k = 0). When train and eval read the same split of the same data, the
    eval seed is skipped: that shuffle is the held-out eval stream, so training on it would
    train on the eval sequences (`e2e_gpt2.yaml` evaluates on its train split with seed 1).

    Raises:
        ConfigError: a seed beyond the allowed range.
    """
    if k == 0:
        return cfg
    tree = cfg.model_dump(mode="json")
    tree["seed"] += k
    train_data, eval_data = tree["train_data"], tree.get("eval_data")
    same_stream = eval_data is not None and all(
        train_data.get(key) == eval_data.get(key) for key in ("dataset_name", "files", "embedded", "split")
    )
    eval_seed = eval_data["seed"] if same_stream and eval_data is not None else None
    data_seeds = [train_data["seed"]]
    while len(data_seeds) <= k:
        candidate = data_seeds[-1] + 1
        if candidate == eval_seed:
            candidate += 1
        data_seeds.append(candidate)
    train_data["seed"] = data_seeds[k]
    return validate_config(tree, source=f"{source}: seeds")


def replicate_means(outcomes: list[dict[str, Any]]) -> dict[str, float]:
    """A point's metrics from its replicates' (`seeds: N`): the mean of each numeric metric over
    the replicates that have it, and for each eval metric `eval_se/<name>` = sample std across
    the replicates / sqrt(N) (NaN below 2), in place of each run's own standard error. Costs
    (`metric_names.COST_METRICS`: FLOPs, device-seconds) are summed: the point cost them all."""
    by_name: dict[str, list[float]] = {}
    for outcome in outcomes:
        for name, value in outcome["metrics"].items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                by_name.setdefault(name, []).append(float(value))
    means = {
        name: math.fsum(values) / (1 if name in names.COST_METRICS else len(values))
        for name, values in by_name.items()
        if not name.startswith(f"{names.EVAL_SE}/")
    }
    for name, values in by_name.items():
        if name.startswith(f"{names.EVAL}/"):
            means[names.se_name(name)] = standard_error(values)
    return means


def _replicate(
    space: LoadedSpace, sweep_dir: SweepDir, arm: str, trial_id: str, cfg: TrainConfig, k: int
) -> dict[str, Any]:
    """Replicate `k` of a `seeds: N` trial: its stored outcome when it ended before
    (`REPLICATE_FILE`), else trained now and stored once it finished or diverged. Returns
    `{"seed", "status", "metrics", "eval_per_sequence", "error", "wall_time_s"}`."""
    seed = cfg.seed + k
    store = as_store(sweep_dir)
    stored_rel = f"{TRAIN_RUNS_DIR}/{replicate_run_name(trial_id, k)}/{REPLICATE_FILE}"
    store.pull(stored_rel)
    stored = _read_replicate(store.local / stored_rel, seed)
    if stored is not None:
        logger.info("trial %s: replicate %d (seed %d) already %s; not trained again", trial_id, k, seed,
                    stored["status"])  # fmt: skip
        return stored
    start = time.perf_counter()
    outcome = _fit(
        space, sweep_dir, arm, trial_id, replicate_config(cfg, k, space.source), k, forward_reports=k == 0
    )
    replicate = {
        "seed": seed,
        "status": outcome["status"],
        "metrics": {name: v for name, v in outcome.get("metrics", {}).items() if "/" in name},
        "eval_per_sequence": outcome.get("eval_per_sequence") or {},
        "error": redact(outcome["error"]) if outcome.get("error") else None,
        "wall_time_s": time.perf_counter() - start,
    }
    store.write_bytes(stored_rel, json.dumps(replicate, sort_keys=True).encode())
    return replicate


def _read_replicate(path: Path, seed: int) -> dict[str, Any] | None:
    """A replicate's stored outcome, or None when it has none (or an unusable one: trained again)."""
    stored = load_record_json(path, what="replicate file")
    if stored is None:
        return None
    keys = {"seed", "status", "metrics", "eval_per_sequence", "error", "wall_time_s"}
    if set(stored) != keys or stored["seed"] != seed:
        logger.warning("ignoring replicate file %s: not this replicate's outcome", path)
        return None
    if stored["status"] not in (FINISHED, DIVERGED):
        return None
    return stored


def _fit(
    space: LoadedSpace,
    sweep_dir: SweepDir,
    arm: str,
    trial_id: str,
    cfg: TrainConfig,
    k: int,
    forward_reports: bool,
) -> dict[str, Any]:
    """Train replicate `k` of a trial (k = 0: the trial's only training with `seeds: 1`) in one
    `TorchTrainer.fit()`; with `forward_reports`, its eval reports go to Tune as they come.

    Returns:
        The workers' outcome (`train_worker`), FINISHED or DIVERGED.

    Raises:
        TrialFailedError: the training failed (a user error, or crashes past `max_failures`).
    """
    store = as_store(sweep_dir)
    train_storage, train_filesystem = store.ray_storage(TRAIN_RUNS_DIR)
    cfg = cfg.model_copy(
        update={
            "save_dir": str(sweep_runs_dir(store.local, arm)),
            "run_name": replicate_sae_run_name(trial_id, k),
        }
    )
    train_name = replicate_run_name(trial_id, k)
    user_error = f"{TRAIN_RUNS_DIR}/{train_name}/{USER_ERROR_FILE}"
    store.delete(user_error)  # from an earlier fit: the data may have been fixed since
    resources = space.space.resources
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "train_config": cfg.model_dump(mode="json"),
            "num_threads": max(1, int(resources.cpus_per_worker)),
            "env_file": str(Path.cwd() / ENV_FILE),  # the path only: secrets stay out of Ray's files
            "sweep": store.uri,
            "user_error_file": user_error,
        },
        torch_config=TorchConfig(backend="nccl" if resources.gpus_per_worker else "gloo", timeout_s=600),
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": resources.cpus_per_worker,
                **({"GPU": resources.gpus_per_worker} if resources.gpus_per_worker else {}),
            },
        ),
        run_config=RunConfig(
            name=train_name,
            # mid-trial checkpoints: Ray Train uploads them (object storage) or writes them here
            storage_path=train_storage,
            storage_filesystem=train_filesystem,
            # a crashed or lost worker: restart the group from the last checkpoint
            failure_config=FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[EvalReportCallback()] if forward_reports else [],
        ),
    )
    fit_started_at = time.time()
    try:
        outcome = trainer.fit().return_value
    except ray.train.TrainingFailedError as exc:
        # Tune writes this error into the sweep folder: the one-line cause, secrets masked
        raise TrialFailedError(redact(_worker_message(exc))) from None
    if not isinstance(outcome, dict):
        raise TrialFailedError(f"the training workers returned no outcome (got {outcome!r})")
    if outcome["status"] == ERROR:
        raise TrialFailedError(redact(outcome["error"]))
    if "worker_clock" in outcome:  # where the fit's time went, besides training (time/ metrics)
        outcome["metrics"].update(fit_times(fit_started_at, time.time(), outcome.pop("worker_clock")))
    return outcome


class TrialFailedError(RuntimeError):
    """A trial's training failed for a reason other than divergence (message: the worker's
    last error line, secrets masked)."""
