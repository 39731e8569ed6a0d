"""`train(cfg)`: the SAE training loop (docs/design.md §4-5, §11). Knows nothing of Ray: it takes a
`report` callback.

One micro-batch: forward (the original model where a term needs it, then the model with SAEs)
-> loss terms -> backward; when gradient accumulation completes, an optimizer step, then the
end-of-step work (`end_of_step`: log, eval, alive counts, checkpoint, report). What a step
computes is `sparsify.training.objective`; where batches come from, `batches`; what changes
during the run and how it is checkpointed, `state`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sparsify import metric_names as names
from sparsify.config import TrainConfig
from sparsify.data import check_data_budget
from sparsify.flops import training_flops_per_sequence
from sparsify.losses import weighted_total
from sparsify.sae_transformer import ForwardOutput, SAETransformer
from sparsify.training.activation_cache import wants_activation_cache
from sparsify.training.alive import count_alive
from sparsify.training.batches import MicroBatch, micro_batches, per_rank_batch_size
from sparsify.training.build import build_model, run_dir_for
from sparsify.training.checkpoint import load_checkpoint, make_folder, save_final_state, save_run
from sparsify.training.evaluation import batch_sae_metrics, evaluate_without_alive
from sparsify.training.objective import LossPlan, loss_terms, make_loss_plan
from sparsify.training.schedule import lr_factor
from sparsify.training.state import (
    Due,
    TrainState,
    TrainWindow,
    due_after_step,
    restore,
    save_step_checkpoint,
    train_state_json,
)
from sparsify.training.tracking import Tracker, make_tracker

logger = logging.getLogger(__name__)

ReportFn = Callable[[dict[str, float], "Path | None"], None]
"""`report(metrics, checkpoint_or_None)`: called on every rank after each eval, each checkpoint
save and at the end (same count on every rank; `metrics` is empty at a save without eval). On
rank 0, `checkpoint` is the folder of a checkpoint just written (`sparsify.training.checkpoint`):
a mid-run one, or at the end the run folder, which is then itself a (finished) checkpoint."""


def _no_report(metrics: dict[str, float], checkpoint: Path | None) -> None:
    pass


@dataclass
class TrainResult:
    run_dir: Path | None
    metrics: dict[str, float]
    """Final metrics, prefixed (`eval/L0`, `train/loss`, ...), with the eval metrics' standard
    errors (`eval_se/L0`, ...; docs/design.md §5)."""
    model: SAETransformer
    eval_per_sequence: dict[str, list[float]] = field(default_factory=dict)
    """The final eval's value of each eval sequence, in eval-stream order, for the metrics of
    `metric_names.KEPT_PER_SEQUENCE` (`eval/L0`, `eval/ce_loss_increase`, `eval/kl`); empty
    without `eval_data`. Also in the run folder's `eval_per_sequence.json`."""


def train(
    cfg: TrainConfig,
    report: ReportFn = _no_report,
    tlens_model: Any | None = None,
    rank: int = 0,
    world_size: int = 1,
    show_progress: bool = True,
    resume_from: str | Path | None = None,
) -> TrainResult:
    """Train the SAEs of `cfg` on its data; eval and save at the end (docs/design.md §4-5).

    With `torch.distributed` initialized, gradients are averaged over ranks, each rank reads a
    disjoint shard of the data (`batch_size` is global: each rank's micro-batch holds
    batch_size / world_size sequences, so a step sees the same sequences as on 1 rank), and
    train and eval metrics are all-reduced; rank 0 logs and saves. Every `save_every_n_samples`
    rank 0 writes a resume checkpoint (`<run folder>/checkpoints/step_N`; only the latest is
    kept, and none once the run ends).

    Args:
        cfg: the run's config.
        report: `ReportFn`, called on every rank after each eval, save and at the end.
        tlens_model: the frozen model, if already loaded (else `cfg.model_name` is loaded).
        rank, world_size: this process's DDP rank and the number of ranks.
        show_progress: a tqdm bar on rank 0, counted in tokens.
        resume_from: a checkpoint folder, or a run folder (its latest checkpoint), to continue
            from: SAE weights, Adam state, step, samples seen, the lr schedule's position and
            the data stream's (the sequences already trained on are skipped; their order is a
            function of the data seed). The result equals an uninterrupted run's.

    Raises:
        ConfigError, DataError, HookNameError: user mistakes (one line each); for
            `resume_from`: no checkpoint there, or one written with another config or number
            of DDP ranks.
        DivergedError: a NaN/inf loss, naming the step and term.
    """
    state, window, wandb_id = TrainState(), TrainWindow(), None
    with state.times.timed(names.TIME_MODEL_LOAD_S):
        model = build_model(cfg, tlens_model)
    plan = make_loss_plan(model, cfg.loss, compiled=cfg.compile)
    optimizer = torch.optim.Adam([p for p in model.saes.parameters() if p.requires_grad], lr=cfg.lr)
    if resume_from is not None:
        wandb_id = restore(
            load_checkpoint(resume_from, cfg), model, optimizer, state, window, cfg, world_size
        )
    # every check before anything is created: a rejected config leaves no run folder or W&B run
    per_rank_batch_size(cfg, world_size)
    with state.times.timed(names.TIME_DATA_S):
        check_data_budget(cfg, model.tlens_model.tokenizer)
    run_dir = run_dir_for(cfg) if rank == 0 else None
    if run_dir is not None:
        make_folder(run_dir)
    tracker = _open_tracker(cfg, run_dir, state, resume_from, wandb_id) if rank == 0 else Tracker()
    run = TrainRun(cfg, model, plan, optimizer, state, window, tracker, run_dir, rank, world_size, report)
    with _closed_on_failure(tracker):
        done = state.step * cfg.grad_accum_steps  # micro-batches trained on before the checkpoint
        state.start_clock()  # cost/device_seconds (an activation cache built now counts)
        with state.times.timed(names.TIME_DATA_S):
            batches = micro_batches(model, cfg, rank, world_size, resumed=resume_from is not None, skip=done)
        state.times.start_loop()
        # closed on a crash too, so an error line is not redrawn over
        with _progress_bar(cfg, state, show=rank == 0 and show_progress) as progress:
            for micro_step, batch in enumerate(batches, start=done):
                terms, total, out = forward_backward(model, batch, plan, cfg)
                window.add(terms, total, batch.n_tokens * world_size, state.step)
                state.samples_seen += batch.n_seqs * world_size
                progress.update(batch.n_tokens * world_size)
                if (micro_step + 1) % cfg.grad_accum_steps:
                    del out  # frees the SAE activations before the next forward
                    continue
                grad_norm = optimizer_step(model, optimizer, cfg, state.step)
                state.step += 1
                due = due_after_step(cfg, state)
                if due.any:
                    window.check_finite()
                sae_metrics = batch_sae_metrics(out) if due.log else {}
                del out  # before eval and the next forward
                end_of_step(run, due, grad_norm, sae_metrics, progress)
        final, final_state = finish(run)
    tracker.close()
    per_sequence = run.eval_per_sequence if cfg.eval_data is not None else None
    if run_dir is not None:
        save_run(run_dir, model.saes.state_dict(), cfg, final, per_sequence)
        save_final_state(run_dir, final_state)
        logger.info("saved SAEs, config and metrics to %s", run_dir)
    report(final, run_dir)
    return TrainResult(run_dir=run_dir, metrics=final, model=model, eval_per_sequence=per_sequence or {})


@dataclass
class TrainRun:
    """What `train` sets up once and the end of every step uses."""

    cfg: TrainConfig
    model: SAETransformer
    plan: LossPlan
    optimizer: torch.optim.Optimizer
    state: TrainState
    window: TrainWindow
    tracker: Tracker
    run_dir: Path | None
    """None on ranks other than 0, and when `save_dir` is null."""
    rank: int
    world_size: int
    report: ReportFn
    eval_per_sequence: dict[str, list[float]] = field(default_factory=dict)
    """The latest eval's per-sequence values of `names.KEPT_PER_SEQUENCE` (prefixed `eval/`)."""

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def evaluate(self) -> dict[str, float]:
        """Eval metrics, prefixed `eval/`, and their standard errors (`eval_se/`); keeps the
        per-sequence values in `eval_per_sequence` (collective under torch.distributed)."""
        tokenizer, times = self.model.tlens_model.tokenizer, self.state.times
        with times.timed(names.TIME_EVAL_S):
            result = evaluate_without_alive(
                self.model, self.cfg, tokenizer, self.plan, self.rank, self.world_size
            )
        with times.timed(names.TIME_ALIVE_S):
            alive = count_alive(self.model, self.cfg, tokenizer, self.rank, self.world_size, result.alive)
        result.metrics.update(alive)
        per_sequence = names.with_prefix(names.EVAL, result.per_sequence)
        self.eval_per_sequence = {k: per_sequence[k] for k in names.KEPT_PER_SEQUENCE if k in per_sequence}
        standard_errors = {names.se_name(k): v for k, v in result.standard_errors.items()}
        return names.with_prefix(names.EVAL, result.metrics) | standard_errors

    def checkpoint_state(self) -> dict[str, Any]:
        """The trainer's JSON part of a checkpoint (collective under torch.distributed)."""
        return train_state_json(self.state, self.window, self.optimizer, self.world_size, self.tracker)


def end_of_step(
    run: TrainRun, due: Due, grad_norm: torch.Tensor, sae_metrics: dict[str, float], progress: tqdm
) -> None:
    """The work after an optimizer step that is `due`: log the train window (with `sae_metrics`
    of the step's last micro-batch), eval or count alive dictionary elements, write a resume
    checkpoint, and report what was evaluated or saved. Collective under torch.distributed."""
    cfg, state = run.cfg, run.state
    if due.log:
        train_metrics = run.window.flush(grad_norm, run.lr, sae_metrics)
        run.tracker.log(train_metrics, state.step)
        progress.set_postfix(
            loss=f"{train_metrics['train/loss']:.4g}",
            L0=f"{train_metrics[names.prefixed(names.TRAIN, names.L0)]:.1f}",
            tok_s=f"{train_metrics[names.prefixed(names.TRAIN, names.TOKENS_PER_S)]:.0f}",
        )
    eval_metrics: dict[str, float] | None = None
    if due.eval and cfg.eval_data is not None:
        eval_metrics = run.evaluate()
        run.tracker.log(eval_metrics, state.step)
    elif due.alive and cfg.eval_data is not None:  # eval counts them too
        tokenizer = run.model.tlens_model.tokenizer
        with state.times.timed(names.TIME_ALIVE_S):
            alive = count_alive(run.model, cfg, tokenizer, run.rank, run.world_size)
        run.tracker.log(names.with_prefix(names.EVAL, alive), state.step)
    saves = due.save and cfg.save_dir is not None
    checkpoint = None
    if saves:
        with state.times.timed(names.TIME_SAVE_S):
            json_state = run.checkpoint_state()
            if run.run_dir is not None:
                checkpoint = save_step_checkpoint(
                    run.run_dir, run.model, run.optimizer, cfg, state.step, json_state
                )
    if eval_metrics is not None or saves:
        run.report(eval_metrics or {}, checkpoint)


def finish(run: TrainRun) -> tuple[dict[str, float], dict[str, Any]]:
    """The end of training: the last log window, the final eval and tokens seen, logged at the
    last step. Returns (final metrics, the finished run's checkpoint state)."""
    run.window.check_finite()
    run.state.stop_clock(run.world_size, run.model.model_device)  # the final eval is not training time
    run.state.times.stop_loop()
    # taken before the flush empties the log window: resuming the finished run gives the same metrics
    final_state = run.checkpoint_state()
    final = run.window.flush(None, run.lr, {}) if run.window.n_tokens else {}
    if run.cfg.eval_data is not None:
        final.update(run.evaluate())
    final[names.prefixed(names.TRAIN, names.TOKENS_SEEN)] = run.state.tokens_seen(run.cfg.train_data.n_ctx)
    final.update(cost_metrics(run))
    final.update(run.state.times.metrics())  # the final save, written with these metrics, not in them
    run.tracker.log(final, run.state.step)
    return final, final_state


def cost_metrics(run: TrainRun) -> dict[str, float]:
    """What the run cost (docs/design.md §14): `cost/train_flops` = FLOPs per training sequence
    (`sparsify.flops`) x sequences trained on (over ranks and resumes), the part of it a cached
    run read from the activation cache, and `cost/device_seconds` (`TrainState.device_seconds`)."""
    cfg, state = run.cfg, run.state
    per_sequence = training_flops_per_sequence(run.model, run.plan, cfg.train_data.n_ctx)
    n_used = cfg.n_grad_steps * cfg.samples_per_step // run.world_size  # as `micro_batches` decides
    cached = per_sequence.spliced_forward if wants_activation_cache(cfg, run.model, n_used) else 0
    return {
        names.COST_TRAIN_FLOPS: float(per_sequence.total * state.samples_seen),
        names.COST_CACHED_MODEL_FLOPS: float(cached * state.samples_seen),
        names.COST_DEVICE_SECONDS: state.device_seconds,
    }


def forward_backward(
    model: SAETransformer, batch: MicroBatch, plan: LossPlan, cfg: TrainConfig
) -> tuple[dict[str, torch.Tensor], torch.Tensor, ForwardOutput]:
    """One micro-batch: loss terms (`objective.loss_terms`), weighted total, backward of
    total / grad_accum_steps (docs/design.md §4). Waits for nothing on the GPU: finiteness is checked
    by `TrainWindow.check_finite` at the next log, eval or save.

    Returns:
        (unweighted terms, total loss, the SAE model's forward output).
    """
    terms, out = loss_terms(model, batch.tokens, plan, cached_acts=batch.acts)
    total = weighted_total(terms, cfg.loss)
    (total / cfg.grad_accum_steps).backward()
    return terms, total, out


def optimizer_step(
    model: SAETransformer, optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int
) -> torch.Tensor:
    """All-reduce gradients across ranks (if distributed), clip them to `max_grad_norm`, set the
    scheduled lr for `step`, step Adam and zero the gradients. Returns the gradient norm before
    clipping, as a 0-dim tensor (reading it would wait for the GPU)."""
    params = [p for p in model.saes.parameters() if p.grad is not None]
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        for p in params:
            assert p.grad is not None
            dist.all_reduce(p.grad)
            p.grad /= world
        # estimates kept in buffers (BatchTopK's threshold) follow each rank's own shard
        for buffer in model.saes.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= world
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    factor = lr_factor(
        step,
        cfg.n_grad_steps,
        cfg.lr_schedule,
        cfg.warmup_samples // cfg.samples_per_step,
        cfg.cooldown_samples // cfg.samples_per_step,
        cfg.min_lr_factor,
    )
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * factor
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _open_tracker(
    cfg: TrainConfig,
    run_dir: Path | None,
    state: TrainState,
    resume_from: str | Path | None,
    wandb_id: str | None,
) -> Tracker:
    # a resumed finished run logs its final metrics at its last step again: purge that step too
    resumed_at = None
    if resume_from is not None:
        resumed_at = state.step if state.step < cfg.n_grad_steps else state.step - 1
    name = run_dir.name if run_dir else ""
    config = cfg.model_dump(mode="json")
    return make_tracker(run_dir, cfg.tensorboard, cfg.wandb_project, name, config, resumed_at, wandb_id)


def _progress_bar(cfg: TrainConfig, state: TrainState, show: bool) -> tqdm:
    """One bar over the run's tokens (starting at those a resumed run has seen), tokens/s shown."""
    n_ctx = cfg.train_data.n_ctx
    return tqdm(total=cfg.n_grad_steps * cfg.samples_per_step * n_ctx, initial=state.tokens_seen(n_ctx),
                unit="tok", unit_scale=True, desc="train", disable=not show, dynamic_ncols=True)  # fmt: skip


@contextmanager
def _closed_on_failure(tracker: Tracker) -> Iterator[None]:
    """On a crash or divergence, close the tracker (TensorBoard flushes, W&B marks the run
    failed) and re-raise."""
    try:
        yield
    except BaseException:
        try:
            tracker.close(failed=True)
        except Exception as close_error:  # never hide the training error behind a logging one
            logger.warning("closing the tracker after a failed run failed too: %s", close_error)
        raise
