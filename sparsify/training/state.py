"""What changes during a training run (the config never does), and its checkpoint glue.

`TrainState` counts steps and samples; `TrainWindow` holds the loss terms since the last log
(on the device, one sync per log); `due_after_step` says what follows a step (log, eval, alive
count, checkpoint). `train_state_json`, `save_step_checkpoint` and `restore` turn all of it
into a resume checkpoint and back (`sparsify.training.checkpoint` writes the files).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sparsify import metric_names as names
from sparsify.config import TrainConfig
from sparsify.errors import ConfigError, DivergedError
from sparsify.sae_transformer import SAETransformer
from sparsify.training.checkpoint import ResumeState, clear_final_state, save_checkpoint, save_run
from sparsify.training.evaluation import MeanAccumulator
from sparsify.training.phases import PhaseTimes
from sparsify.training.tracking import Tracker

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What changes during a run (the config never does)."""

    step: int = 0
    """Optimizer steps done."""
    samples_seen: int = 0
    """Sequences trained on, over all DDP ranks."""
    device_seconds: float = 0.0
    """Wall seconds x DDP ranks of the training loop before `loop_start` (the earlier runs of a
    resumed one), plus this run's once `stop_clock` ran."""
    loop_start: float | None = None
    """`time.perf_counter()` when this process's training loop started; None when not running."""
    times: PhaseTimes = field(default_factory=PhaseTimes)
    """Wall seconds per phase (`time/...` metrics), over resumes."""

    def tokens_seen(self, n_ctx: int) -> int:
        return self.samples_seen * n_ctx

    def start_clock(self) -> None:
        self.loop_start = time.perf_counter()

    def stop_clock(self, world_size: int, device: torch.device | None = None) -> None:
        """Add the loop's wall seconds since `start_clock`, x `world_size`, to `device_seconds`;
        under torch.distributed (collective) the slowest rank's, so every rank reports the same."""
        self.device_seconds = self.device_seconds_now(world_size)
        self.loop_start = None
        if dist.is_available() and dist.is_initialized():
            slowest = torch.tensor(self.device_seconds, dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            self.device_seconds = slowest.item()

    def device_seconds_now(self, world_size: int) -> float:
        """`device_seconds` including the running loop's time so far (rank-local wall clock)."""
        running = 0.0 if self.loop_start is None else time.perf_counter() - self.loop_start
        return self.device_seconds + running * world_size


class TrainWindow:
    """Loss terms of every micro-batch since the last log, kept on the device: nothing here
    waits for the GPU until `check_finite` or `flush` (one sync per log, not per step)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.rows: list[tuple[int, torch.Tensor]] = []
        self.n_tokens = 0
        self.start = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], total: torch.Tensor, n_tokens: int, step: int) -> None:
        """Record one micro-batch's unweighted terms and total at optimizer step `step`."""
        self.keys = [*terms, "total"]
        self.rows.append((step, torch.stack([*terms.values(), total]).detach()))
        self.n_tokens += n_tokens

    def to_json(self) -> dict[str, Any]:
        """The window as JSON, for a checkpoint (float32 values round-trip through JSON exactly).
        Collective under torch.distributed: the rows are averaged over ranks, as `flush` would."""
        rows = torch.stack([row for _, row in self.rows]) if self.rows else torch.zeros(0)
        if self.rows and dist.is_available() and dist.is_initialized():
            rows = rows / dist.get_world_size()
            dist.all_reduce(rows)
        steps = [step for step, _ in self.rows]
        return {
            "keys": self.keys,
            "n_tokens": self.n_tokens,
            "rows": list(zip(steps, rows.tolist(), strict=True)),
        }

    def load_json(self, saved: dict[str, Any], device: torch.device) -> None:
        """Restore a window saved by `to_json` (its clock restarts now)."""
        self.keys = list(saved["keys"])
        self.n_tokens = saved["n_tokens"]
        self.rows = [
            (step, torch.tensor(row, dtype=torch.float32, device=device)) for step, row in saved["rows"]
        ]

    def check_finite(self) -> None:
        """Raises DivergedError naming the first micro-batch's step and term that was NaN/inf
        (on any DDP rank: every rank raises, so none waits at the next all-reduce)."""
        if not self.rows:
            return
        stacked = torch.stack([row for _, row in self.rows])
        if dist.is_available() and dist.is_initialized():
            # mean over ranks: NaN/inf spread to every rank; halves first, so no finite sum overflows
            stacked = stacked / dist.get_world_size()
            dist.all_reduce(stacked)
        finite = torch.isfinite(stacked)
        if bool(finite.all()):
            return
        row, col = (~finite).nonzero()[0].tolist()
        raise DivergedError(self.rows[row][0], self.keys[col], stacked[row, col].item())

    def flush(
        self, grad_norm: torch.Tensor | None, lr: float, sae_metrics: dict[str, float]
    ) -> dict[str, float]:
        """Mean loss terms over the window, tokens/s, lr, grad norm (before clipping) and
        `sae_metrics` (L0, explained variance: from the window's last micro-batch), each
        averaged over DDP ranks (equal batches per rank), so rank 0 reports the global values."""
        values: dict[str, float] = {}
        if self.rows:
            means = torch.stack([row for _, row in self.rows]).mean(0).tolist()
            values = {names.loss_term(k): v for k, v in zip(self.keys[:-1], means[:-1], strict=True)}
            values[names.LOSS] = means[-1]
        device = self.rows[-1][1].device if self.rows else torch.device("cpu")
        over_ranks = MeanAccumulator(device)
        over_ranks.add({**values, **sae_metrics}, weight=1.0)
        values = over_ranks.means()  # all-reduced when distributed
        elapsed = max(time.perf_counter() - self.start, 1e-9)  # after the sync above
        values[names.LR] = lr
        values[names.TOKENS_PER_S] = self.n_tokens / elapsed
        if grad_norm is not None:
            values[names.GRAD_NORM] = grad_norm.item()
        self.__init__()  # type: ignore[misc]
        return names.with_prefix(names.TRAIN, values)


@dataclass(frozen=True)
class Due:
    log: bool
    eval: bool
    save: bool
    alive: bool
    """Count alive dictionary elements (`collect_act_frequency_every_n_samples`)."""

    @property
    def any(self) -> bool:
        return self.log or self.eval or self.save


def _crossed(every: int | None, before: int, after: int) -> bool:
    return every is not None and after // every > before // every


def due_after_step(cfg: TrainConfig, state: TrainState) -> Due:
    """What the step just taken (`state.step` done) must be followed by; nothing at the last
    step, whose work `train` does at the end."""
    last = state.step == cfg.n_grad_steps
    before = state.samples_seen - cfg.samples_per_step
    return Due(
        log=state.step % cfg.log_every_n_grad_steps == 0 and not last,
        eval=_crossed(cfg.eval_every_n_samples, before, state.samples_seen) and not last,
        save=_crossed(cfg.save_every_n_samples, before, state.samples_seen) and not last,
        alive=_crossed(cfg.collect_act_frequency_every_n_samples, before, state.samples_seen) and not last,
    )


def train_state_json(
    state: TrainState,
    window: TrainWindow,
    optimizer: torch.optim.Optimizer,
    world_size: int,
    tracker: Tracker,
) -> dict[str, Any]:
    """The trainer's part of a checkpoint (JSON): what `restore` restores besides the tensors,
    and the W&B run id a resumed run continues. Collective under torch.distributed (the log
    window is averaged over ranks)."""
    return {
        "step": state.step,
        "samples_seen": state.samples_seen,
        "device_seconds": state.device_seconds_now(world_size),
        "phase_seconds": state.times.metrics(),
        "world_size": world_size,
        "lr": optimizer.param_groups[0]["lr"],
        "window": window.to_json(),
        "wandb_run_id": tracker.run_id,
    }


def save_step_checkpoint(
    run_dir: Path,
    model: SAETransformer,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    step: int,
    json_state: dict[str, Any],
) -> Path:
    """Write a mid-run resume checkpoint, and the SAEs into the run folder (as every save
    does). Returns the checkpoint folder."""
    clear_final_state(run_dir)  # the run folder no longer holds a finished run
    sae_state = model.saes.state_dict()
    save_run(run_dir, sae_state, cfg, {})
    return save_checkpoint(run_dir, step, sae_state, cfg, json_state, optimizer.state_dict())


def restore(
    resume: ResumeState,
    model: SAETransformer,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    window: TrainWindow,
    cfg: TrainConfig,
    world_size: int,
) -> str | None:
    """Load a checkpoint into a freshly built model, optimizer, state and log window.

    Returns:
        The W&B run id the interrupted run logged to (None if it had none).

    Raises:
        ConfigError: a checkpoint of another number of DDP ranks (each rank's data shard would
            differ), or a finished run's final state (no Adam state) with steps left to train.
    """
    saved = resume.train_state
    if saved["world_size"] != world_size:
        raise ConfigError(
            f"resume_from: {resume.folder} was written by {saved['world_size']} DDP ranks; "
            f"resume it with as many (got {world_size})"
        )
    if resume.optimizer_state is None and saved["step"] < cfg.n_grad_steps:
        raise ConfigError(f"resume_from: {resume.folder} holds no optimizer state, so it cannot train on")
    model.saes.load_state_dict(resume.sae_state)
    if resume.optimizer_state is not None:
        optimizer.load_state_dict(resume.optimizer_state)
    for group in optimizer.param_groups:
        group["lr"] = saved["lr"]  # the next step sets it from the schedule; the final log reads it
    state.step, state.samples_seen = saved["step"], saved["samples_seen"]
    state.device_seconds = float(saved.get("device_seconds", 0.0))  # absent before it was recorded
    state.times.restore(saved.get("phase_seconds", {}))  # added to this attempt's model load
    window.load_json(saved["window"], model.model_device)
    logger.info("resumed from %s at step %d (%d samples)", resume.folder, state.step, state.samples_seen)
    return saved.get("wandb_run_id")
