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
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    atomic_write_text,
    load_env_file,
    quiet_library_progress_bars,
    redact,
    train,
)
from sparsify import metric_names as names
from sweep.records import DIVERGED, ERROR, FINISHED, TrialRecord, read_trial_record, write_trial_record
from sweep.space import LoadedSpace

logger = logging.getLogger(__name__)

ARM_KEY = "arm"
"""Tune config key holding the arm name; every other key is a dotted training-config path."""


def trial_run_name(trial_id: str) -> str:
    """Ray Train run name of a trial: from the trial id, never a timestamp, so a rerun of the
    same trial finds its checkpoints."""
    return f"train_{trial_id}"


USER_ERROR_FILE = "user_error.txt"
"""In a trial's Ray Train run folder: the user error a DDP rank hit, so that the worker group
Ray Train restarts ends the trial with it instead of training again (see `train_worker`)."""


def sweep_runs_dir(sweep_dir: Path, arm: str) -> Path:
    """Where each trial's SAE run folder (weights, config, metrics) lives."""
    return sweep_dir / "runs" / arm


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: train one SAE config, from the run's last checkpoint when there is one
    (a restarted worker group, or a resumed sweep); rank 0 writes the run folder and reports
    checkpoints.

    Returns:
        The outcome, which Ray Train hands to the driver as rank 0's `Result.return_value`:
        `{"status": FINISHED, "metrics": {...}}`, `{"status": DIVERGED, "error": "..."}`
        or, for a user error (`SparsifyError`, not transient), `{"status": ERROR, ...}`
        (statuses from `sweep.records`): returned, not raised, because Ray Train retries what
        is raised, and neither would end differently on a retry (every rank diverges at the
        same check). With several ranks a user error may be one rank's alone while the others
        wait in an all-reduce, and only a raise makes Ray stop them: that rank first writes the
        error to `config["user_error_file"]`, and the restarted group returns it at once,
        before it trains or loads anything.
    """
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    user_error = Path(config["user_error_file"])
    if user_error.is_file():  # an earlier attempt of this fit hit a user error: it would again
        return {"status": ERROR, "error": user_error.read_text(encoding="utf-8")}
    if config.get("num_threads"):
        torch.set_num_threads(int(config["num_threads"]))
    quiet_library_progress_bars()
    load_env_file(config["env_file"])  # on a cluster node started by `ray start`, not our shell
    cfg = TrainConfig.model_validate(config["train_config"])

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
        return {"status": DIVERGED, "error": str(exc)}
    except SparsifyError as exc:
        if exc.transient:
            raise  # e.g. the hub was unreachable: Ray Train restarts the worker group (FailureConfig)
        if world_size > 1:
            # the others may wait in an all-reduce: raise to stop them, and leave the error
            # for the restarted group, which then ends the trial without training again
            atomic_write_text(user_error, str(exc))
            raise
        # the same config would fail the same way: end the trial now, one line, no retries
        return {"status": ERROR, "error": str(exc)}
    return {"status": FINISHED, "metrics": result.metrics}


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
    """Tune function trainable: one trial = one `TorchTrainer.fit()`.

    Writes the trial record (`sweep.records`) when the trial finishes or diverges; errors
    propagate to Tune, whose `sweep.tuner.TrialRecordCallback` records them as they happen. A
    trial that already has a finished or diverged record (Tune restarts the trials it had not
    seen end when a sweep resumes) reports that record again and trains nothing; any other
    record (`interrupted`: a Ctrl-C stopped it) does not stop it: it trains on from the Train
    run's last checkpoint, and its end replaces the record.
    """
    start = time.perf_counter()
    arm = tune_config[ARM_KEY]
    params = {k: v for k, v in tune_config.items() if k != ARM_KEY}
    trial_id = tune.get_context().get_trial_id()
    nan_objectives = {metric: math.nan for metric in space.space.metrics}
    done = read_trial_record(sweep_dir, arm, trial_id)
    if done is not None and done.status in (FINISHED, DIVERGED):
        logger.info("trial %s already ended (%s); keeping its record", trial_id, done.status)
        kept = done.metrics if done.status == FINISHED else nan_objectives
        tune.report({**kept, "status": done.status})
        return
    cfg = space.trial_config(arm, params)
    cfg = cfg.model_copy(update={"save_dir": str(sweep_runs_dir(Path(sweep_dir), arm)), "run_name": trial_id})
    train_run_dir = Path(sweep_dir) / "ray_train" / trial_run_name(trial_id)
    user_error = train_run_dir / USER_ERROR_FILE
    user_error.unlink(missing_ok=True)  # from an earlier fit: the data may have been fixed since
    resources = space.space.resources
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "train_config": cfg.model_dump(mode="json"),
            "num_threads": max(1, int(resources.cpus_per_worker)),
            "env_file": str(Path.cwd() / ENV_FILE),  # the path only: secrets stay out of Ray's files
            "user_error_file": str(user_error),
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
            name=trial_run_name(trial_id),
            storage_path=str(train_run_dir.parent),
            # a crashed or lost worker: restart the group from the last checkpoint
            failure_config=FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[EvalReportCallback()],
        ),
    )
    try:
        outcome = trainer.fit().return_value
    except ray.train.TrainingFailedError as exc:
        # Tune writes this error into the sweep folder: the one-line cause, secrets masked
        raise TrialFailedError(redact(_worker_message(exc))) from None
    if not isinstance(outcome, dict):
        raise TrialFailedError(f"the training workers returned no outcome (got {outcome!r})")
    if outcome["status"] == ERROR:
        raise TrialFailedError(redact(outcome["error"]))
    if outcome["status"] == DIVERGED:
        record = TrialRecord(
            arm=arm, trial_id=trial_id, status=DIVERGED, params=params, metrics={},
            error=redact(outcome["error"]), wall_time_s=time.perf_counter() - start,
        )  # fmt: skip
        write_trial_record(sweep_dir, record)
        tune.report({**nan_objectives, "status": DIVERGED})
        return
    metrics = {k: v for k, v in outcome["metrics"].items() if "/" in k}
    record = TrialRecord(
        arm=arm, trial_id=trial_id, status=FINISHED, params=params, metrics=metrics,
        error=None, wall_time_s=time.perf_counter() - start,
    )  # fmt: skip
    write_trial_record(sweep_dir, record)
    # Tune keeps only the last result; OptunaSearch reads the objectives from it
    tune.report({**metrics, "status": FINISHED})


class TrialFailedError(RuntimeError):
    """A trial's training failed for a reason other than divergence (message: the worker's
    last error line, secrets masked)."""
