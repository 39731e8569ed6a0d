"""`train(cfg)`: the SAE training loop. Knows nothing of Ray: it takes a `report` callback."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sparsify import metric_names as names
from sparsify.activation_cache import activation_cache, wants_activation_cache
from sparsify.checkpoint import (
    ResumeState,
    clear_final_state,
    load_checkpoint,
    load_sae_state,
    save_checkpoint,
    save_final_state,
    save_run,
)
from sparsify.config import TrainConfig
from sparsify.data import check_data_budget, iter_batches
from sparsify.errors import ConfigError, DivergedError
from sparsify.evaluation import (
    LossPlan,
    MeanAccumulator,
    batch_sae_metrics,
    count_alive,
    evaluate,
    loss_terms,
    make_loss_plan,
)
from sparsify.losses import weighted_total
from sparsify.model_loading import autocast_dtype, load_tlens_model, resolve_device
from sparsify.sae_transformer import ForwardOutput, SAETransformer
from sparsify.schedule import lr_factor
from sparsify.tracking import Tracker, make_tracker

logger = logging.getLogger(__name__)

ReportFn = Callable[[dict[str, float], "Path | None"], None]
"""`report(metrics, checkpoint_or_None)`: called on every rank after each eval, each checkpoint
save and at the end (same count on every rank; `metrics` is empty at a save without eval). On
rank 0, `checkpoint` is the folder of a checkpoint just written (`sparsify.checkpoint`): a
mid-run one, or at the end the run folder, which is then itself a (finished) checkpoint."""


def _no_report(metrics: dict[str, float], checkpoint: Path | None) -> None:
    pass


@dataclass
class TrainState:
    """What changes during a run (the config never does)."""

    step: int = 0
    samples_seen: int = 0

    def tokens_seen(self, n_ctx: int) -> int:
        return self.samples_seen * n_ctx


@dataclass
class TrainResult:
    run_dir: Path | None
    metrics: dict[str, float]
    """Final metrics, prefixed (`eval/L0`, `train/loss`, ...)."""
    model: SAETransformer


def default_run_name(cfg: TrainConfig) -> str:
    """`blocks-6-hook_resid_pre_ratio4_sparsity1.5_logits_kl1_seed0`: positions, ratio, coeffs."""
    positions = "+".join(p.replace(".", "-") for p in cfg.saes.sae_positions)
    coeffs = "_".join(f"{k}{v:g}" for k, v in cfg.loss.coeffs().items() if v)
    return f"{positions}_ratio{cfg.saes.dict_size_to_input_ratio:g}_{coeffs}_seed{cfg.seed}"


def run_dir_for(cfg: TrainConfig) -> Path | None:
    """The one place a run folder path is built: save_dir / run_name."""
    if cfg.save_dir is None:
        return None
    return Path(cfg.save_dir) / (cfg.run_name or default_run_name(cfg))


def build_model(cfg: TrainConfig, tlens_model: Any | None = None) -> SAETransformer:
    """Load the frozen language model (unless given) and add SAEs: freshly initialized (seeded
    by `cfg.seed`), or loaded from `saes.pretrained_sae_paths` (frozen unless `retrain_saes`).

    Raises:
        ConfigError: an unloadable model or SAE file, data n_ctx above the model's context, or
            nothing left to train.
        HookNameError: an SAE position the model does not have.
    """
    if tlens_model is None:
        tlens_model = load_tlens_model(cfg.model_name, resolve_device(cfg.device), cfg.model_dtype)
    assert tlens_model is not None
    torch.manual_seed(cfg.seed)
    device = next(tlens_model.parameters()).device
    autocast = autocast_dtype(cfg.autocast, device)
    if device.type == "cuda":
        # with autocast on, the SAE's float32 matmuls may use TF32 tensor cores too (weights,
        # gradients and Adam state stay float32); off, every matmul is exact float32
        torch.backends.cuda.matmul.allow_tf32 = autocast is not None
    model = SAETransformer(
        tlens_model,
        cfg.saes.sae_positions,
        cfg.saes.dict_size_to_input_ratio,
        cfg.saes.skip_first_position,
        autocast,
    )
    _load_pretrained(model, cfg)
    if cfg.compile:
        for sae in model.saes.values():
            sae.compile()  # in place: the state dict keeps its names
    for field_name in ("train_data", "eval_data"):
        data = getattr(cfg, field_name)
        if data is not None and data.n_ctx > model.n_ctx:
            raise ConfigError(
                f"{field_name}.n_ctx: {data.n_ctx} exceeds the model's context of {model.n_ctx} tokens"
            )
    return model


def _load_pretrained(model: SAETransformer, cfg: TrainConfig) -> None:
    for path in cfg.saes.pretrained_sae_paths or []:
        try:
            state = load_sae_state(path)
        except ConfigError as exc:
            raise ConfigError(f"saes.pretrained_sae_paths: {exc}") from None
        model.load_saes(state, path, freeze=not cfg.saes.retrain_saes)
    if not any(p.requires_grad for p in model.saes.parameters()):
        raise ConfigError(
            "saes.retrain_saes: every SAE is pretrained and frozen, so nothing would train; "
            "set retrain_saes: true or add an SAE position"
        )


def train(
    cfg: TrainConfig,
    report: ReportFn = _no_report,
    tlens_model: Any | None = None,
    rank: int = 0,
    world_size: int = 1,
    show_progress: bool = True,
    resume_from: str | Path | None = None,
) -> TrainResult:
    """Train the SAEs of `cfg` on its data; eval and save at the end (DESIGN.md §4-5).

    With `torch.distributed` initialized, gradients are averaged over ranks, each rank reads a
    disjoint shard of the data (`batch_size` is global: each rank's micro-batch holds
    batch_size / world_size sequences, so a step sees the same sequences as on 1 rank), and
    train and eval metrics are all-reduced; rank 0 logs and saves. Every `save_every_n_samples`
    rank 0 writes a resume checkpoint (`<run folder>/checkpoints/step_N`; only the latest is
    kept, and none once the run ends).

    Args:
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
    model = build_model(cfg, tlens_model)
    plan = make_loss_plan(model, cfg.loss, compiled=cfg.compile)
    tokenizer = model.tlens_model.tokenizer
    device = model.model_device
    is_main = rank == 0
    run_dir = run_dir_for(cfg) if is_main else None
    optimizer = torch.optim.Adam([p for p in model.saes.parameters() if p.requires_grad], lr=cfg.lr)
    state = TrainState()
    window = TrainWindow()
    resumed = resume_from is not None
    wandb_id: str | None = None
    if resume_from is not None:
        checkpoint_state = load_checkpoint(resume_from, cfg)
        _resume(checkpoint_state, model, optimizer, state, window, cfg, world_size)
        wandb_id = checkpoint_state.train_state.get("wandb_run_id")
    n_ctx = cfg.train_data.n_ctx
    rank_batch_size = _per_rank(cfg.batch_size, world_size)
    check_data_budget(cfg, tokenizer, world_size)
    if run_dir is not None:
        _check_writable(run_dir)
    # created after every check: a rejected config leaves no TensorBoard or W&B run behind
    # a resumed finished run logs its final metrics at its last step again: purge that step too
    resumed_at = (state.step if state.step < cfg.n_grad_steps else state.step - 1) if resumed else None
    tracker = _tracker(cfg, run_dir, resumed_at, wandb_id) if is_main else Tracker()
    try:
        n_used = cfg.n_grad_steps * cfg.samples_per_step  # whole optimizer steps only
        batches = iter_batches(
            cfg.train_data, tokenizer, rank_batch_size, n_used // world_size, "n_samples", rank, world_size
        )
        cached: Iterator[dict[str, torch.Tensor]] | None = None
        if wants_activation_cache(cfg, model, n_used // world_size):
            cached = activation_cache(model, cfg, batches, rank).batches(rank_batch_size)
            batches = iter(())  # the cache replaces the token stream
        if cfg.saes.decoder_bias_init == "data_mean" and not resumed:
            if cached is not None:
                first_acts = next(cached)
                _init_decoder_bias(model, acts=first_acts)
                cached = itertools.chain([first_acts], cached)
            else:
                first = next(batches)
                _init_decoder_bias(model, tokens=first.to(device))
                batches = itertools.chain([first], batches)
        # micro-batches this rank trained on before the checkpoint: skipped, so the stream continues
        done = state.step * cfg.grad_accum_steps
        steps: Iterator[Any] = itertools.islice(cached if cached is not None else batches, done, None)
        progress = tqdm(total=n_used * n_ctx, initial=state.tokens_seen(n_ctx), unit="tok", unit_scale=True,
                        desc="train", disable=not (is_main and show_progress), dynamic_ncols=True)  # fmt: skip
        for micro_step, batch in enumerate(steps, start=done):
            if cached is not None:
                terms, total, out = forward_backward(model, None, plan, cfg, state.step, cached_acts=batch)
                shape = next(iter(batch.values())).shape
            else:
                terms, total, out = forward_backward(model, batch.to(device), plan, cfg, state.step)
                shape = batch.shape
            n_seqs, n_tokens = shape[0] * world_size, shape[0] * shape[1] * world_size
            window.add(terms, total, n_tokens, state.step)
            state.samples_seen += n_seqs
            progress.update(n_tokens)
            if (micro_step + 1) % cfg.grad_accum_steps:
                del out  # frees the SAE activations before the next forward
                continue
            grad_norm = optimizer_step(model, optimizer, cfg, state.step)
            state.step += 1
            due = _due(cfg, state)
            if due.log or due.eval or due.save:
                window.check_finite()
            if due.log:
                lr = optimizer.param_groups[0]["lr"]
                train_metrics = window.flush(grad_norm, lr, state, batch_sae_metrics(out))
                tracker.log(train_metrics, state.step)
                progress.set_postfix(
                    loss=f"{train_metrics['train/loss']:.4g}",
                    L0=f"{train_metrics[names.prefixed(names.TRAIN, names.L0)]:.1f}",
                    tok_s=f"{train_metrics[names.prefixed(names.TRAIN, names.TOKENS_PER_S)]:.0f}",
                )
            del out
            eval_metrics: dict[str, float] | None = None
            if due.eval and cfg.eval_data is not None:
                eval_metrics = _prefixed(names.EVAL, evaluate(model, cfg, tokenizer, plan, rank, world_size))
                tracker.log(eval_metrics, state.step)
            elif due.alive and cfg.eval_data is not None:  # eval counts them too
                alive = _prefixed(names.EVAL, count_alive(model, cfg, tokenizer, rank, world_size))
                tracker.log(alive, state.step)
            checkpoint = None
            if due.save and cfg.save_dir is not None:
                json_state = _train_state_json(state, window, optimizer, world_size, tracker)  # collective
                if run_dir is not None:
                    checkpoint = _save_checkpoint(run_dir, model, optimizer, cfg, state.step, json_state)
            if eval_metrics is not None or (due.save and cfg.save_dir is not None):
                report(eval_metrics or {}, checkpoint)
        progress.close()
        window.check_finite()
        # taken before the flush empties the log window: resuming the finished run gives the same metrics
        final_state = _train_state_json(state, window, optimizer, world_size, tracker)
        final = window.flush(None, optimizer.param_groups[0]["lr"], state, {}) if window.n_tokens else {}
        if cfg.eval_data is not None:
            final.update(_prefixed(names.EVAL, evaluate(model, cfg, tokenizer, plan, rank, world_size)))
        final[names.prefixed(names.TRAIN, names.TOKENS_SEEN)] = state.tokens_seen(n_ctx)
        tracker.log(final, state.step)
    except BaseException:  # a crash or divergence: TensorBoard flushes, W&B marks the run failed
        try:
            tracker.close(failed=True)
        except Exception as close_error:  # never hide the training error behind a logging one
            logger.warning("closing the tracker after a failed run failed too: %s", close_error)
        raise
    tracker.close()
    if run_dir is not None:
        save_run(run_dir, model.saes.state_dict(), cfg, final)
        save_final_state(run_dir, final_state)
        logger.info("saved SAEs, config and metrics to %s", run_dir)
    report(final, run_dir)
    return TrainResult(run_dir=run_dir, metrics=final, model=model)


def _train_state_json(
    state: TrainState,
    window: TrainWindow,
    optimizer: torch.optim.Optimizer,
    world_size: int,
    tracker: Tracker,
) -> dict[str, Any]:
    """The trainer's part of a checkpoint (JSON): what `_resume` restores besides the tensors,
    and the W&B run id a resumed run continues. Collective under torch.distributed (the log
    window is averaged over ranks)."""
    return {
        "step": state.step,
        "samples_seen": state.samples_seen,
        "world_size": world_size,
        "lr": optimizer.param_groups[0]["lr"],
        "window": window.to_json(),
        "wandb_run_id": tracker.run_id,
    }


def _save_checkpoint(
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


def _resume(
    resume: ResumeState,
    model: SAETransformer,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    window: TrainWindow,
    cfg: TrainConfig,
    world_size: int,
) -> None:
    """Load a checkpoint into a freshly built model, optimizer, state and log window.

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
    window.load_json(saved["window"], model.model_device)
    logger.info("resumed from %s at step %d (%d samples)", resume.folder, state.step, state.samples_seen)


def _check_writable(run_dir: Path) -> None:
    """Create the run folder now, after every other check: a save_dir that cannot hold it
    fails here in one line, not after training. Raises ConfigError."""
    for folder in (run_dir, *run_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"save_dir: {folder} is a file, not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"save_dir: cannot create {run_dir} ({exc.strerror})") from None


def _per_rank(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise ConfigError(
            f"batch_size ({batch_size}) must be divisible by the number of DDP ranks ({world_size})"
        )
    return batch_size // world_size


def _tracker(cfg: TrainConfig, run_dir: Path | None, resumed_at: int | None, wandb_id: str | None) -> Tracker:
    name = run_dir.name if run_dir else ""
    config = cfg.model_dump(mode="json")
    return make_tracker(run_dir, cfg.tensorboard, cfg.wandb_project, name, config, resumed_at, wandb_id)


def _init_decoder_bias(
    model: SAETransformer, tokens: torch.Tensor | None = None, acts: dict[str, torch.Tensor] | None = None
) -> None:
    if acts is not None:
        model.init_decoder_bias_from_acts(acts)
    else:
        assert tokens is not None
        model.init_decoder_bias_from_data(tokens)
    if dist.is_available() and dist.is_initialized():
        # ranks saw different batches; DDP needs identical parameters everywhere
        for name in model.sae_positions:
            bias = model.sae(name).decoder.bias.data
            dist.all_reduce(bias)
            bias /= dist.get_world_size()


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
        self, grad_norm: torch.Tensor | None, lr: float, state: TrainState, sae_metrics: dict[str, float]
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
        return _prefixed(names.TRAIN, values)


@dataclass(frozen=True)
class Due:
    log: bool
    eval: bool
    save: bool
    alive: bool
    """Count alive dictionary elements (`collect_act_frequency_every_n_samples`)."""


def _crossed(every: int | None, before: int, after: int) -> bool:
    return every is not None and after // every > before // every


def _due(cfg: TrainConfig, state: TrainState) -> Due:
    last = state.step == cfg.n_grad_steps
    before = state.samples_seen - cfg.samples_per_step
    return Due(
        log=state.step % cfg.log_every_n_grad_steps == 0 and not last,
        eval=_crossed(cfg.eval_every_n_samples, before, state.samples_seen) and not last,
        save=_crossed(cfg.save_every_n_samples, before, state.samples_seen) and not last,
        alive=_crossed(cfg.collect_act_frequency_every_n_samples, before, state.samples_seen) and not last,
    )


def forward_backward(
    model: SAETransformer,
    tokens: torch.Tensor | None,
    plan: LossPlan,
    cfg: TrainConfig,
    step: int,
    cached_acts: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, ForwardOutput]:
    """One micro-batch (batch, pos) of token ids, or of `cached_acts` from the activation cache
    (local losses): loss terms, weighted total, backward of total / grad_accum_steps
    (DESIGN.md §4). Waits for nothing on the GPU: finiteness is checked
    by `TrainWindow.check_finite` at the next log, eval or save.

    Returns:
        (unweighted terms, total loss, the SAE model's forward output).
    """
    terms, out = loss_terms(model, tokens, plan, cached_acts=cached_acts)
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


def _prefixed(split: str, values: dict[str, float]) -> dict[str, float]:
    return {names.prefixed(split, k): v for k, v in values.items()}
