"""Train a small causal LM (Llama or GPT-2 architecture) from scratch: `python -m sparsify.models.lm cfg.yaml`.

The run folder is a Hugging Face model folder (`config.json`, `model.safetensors`, tokenizer
files) plus the resolved `lm_config.yaml` and `metrics.json` (the loss curve). It loads through
TransformerBridge by path (`sparsify.model_loading.load_tlens_model`), so an SAE training
config's `model_name` can name it (`configs/sae_on_custom_lm.yaml`). Data and tokenizer default
to the embedded State of the Union speeches and SmolLM2's tokenizer (docs/design.md §10).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sparsify.atomic import current_umask
from sparsify.cli import run_config_command
from sparsify.data import check_section_budgets, iter_batches
from sparsify.errors import ConfigError, DivergedError
from sparsify.metric_names import EVAL, LOSS, LR, TOKENS_PER_S, TOKENS_SEEN, TRAIN, prefixed
from sparsify.models.lm_config import LMTrainConfig, load_lm_config
from sparsify.training import checkpoint
from sparsify.training.schedule import lr_factor

logger = logging.getLogger(__name__)

CONFIG_FILE = "lm_config.yaml"
"""The resolved LMTrainConfig (next to Hugging Face's own `config.json`)."""
METRICS_FILE = "metrics.json"
CE_LOSS = "ce_loss"
"""Next-token cross-entropy, nats per predicted token."""
CE_LOSS_START = "ce_loss_start"
"""`ce_loss` of the freshly initialized model (about ln(vocab) nats)."""
WALL_S = "wall_s"
N_PARAMS = "n_params"


def run_dir_for(cfg: LMTrainConfig) -> Path | None:
    """An LM's run folder: save_dir / (run_name or `lm_<architecture>_L<layers>_d<width>_seed<seed>`)."""
    return checkpoint.run_dir_for(
        cfg.save_dir,
        cfg.run_name,
        lambda: f"lm_{cfg.architecture}_L{cfg.n_layers}_d{cfg.d_model}_seed{cfg.seed}",
    )


def load_lm_tokenizer(cfg: LMTrainConfig) -> Any:
    """The tokenizer named by `cfg.tokenizer`.

    Raises:
        ConfigError: `tokenizer: cannot load ...` (one line).
    """
    from sparsify.model_loading import load_tokenizer

    try:
        return load_tokenizer(cfg.tokenizer)
    except ConfigError as exc:  # load_tokenizer names `model_name`; here the field is `tokenizer`
        raise ConfigError(f"tokenizer: {str(exc).removeprefix('model_name: ')}") from None


def build_lm(cfg: LMTrainConfig, tokenizer: Any) -> Any:
    """A freshly initialized Hugging Face causal LM for `cfg`, seeded by `cfg.seed`, dropout off
    (a seed then fixes the whole run). Vocabulary `len(tokenizer)`; BOS/EOS/pad ids from it."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    torch.manual_seed(cfg.seed)
    # fmt: off
    if cfg.architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(
            hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
            max_position_embeddings=cfg.n_ctx, **common))
    return GPT2LMHeadModel(GPT2Config(
        n_embd=cfg.d_model, n_inner=cfg.d_mlp, n_layer=cfg.n_layers, n_head=cfg.n_heads,
        n_positions=cfg.n_ctx, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common))
    # fmt: on


def next_token_ce(
    logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, ""]:
    """Mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1], nats per token."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


@torch.no_grad()
def eval_ce(model: Any, cfg: LMTrainConfig, tokenizer: Any, device: torch.device) -> float:
    """Next-token CE on the first `eval_n_samples` sequences of eval_data, nats per token
    (a token-weighted mean over batches).

    Raises:
        DataError: eval_data holds fewer than eval_n_samples sequences (names `eval_n_samples`).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for tokens in iter_batches(
        cfg.eval_data, tokenizer, cfg.batch_size, cfg.eval_n_samples, "eval_n_samples"
    ):
        tokens = tokens.to(device)
        n_pred = tokens[:, 1:].numel()
        total += next_token_ce(model(input_ids=tokens).logits, tokens).item() * n_pred
        count += n_pred
    model.train(was_training)
    return total / count


@dataclass
class LossCurve:
    """The loss curve in nats/token. `train`: a row per log (step, tokens_seen, loss = mean train
    CE over the steps since the previous log, lr, tokens_per_s); `eval`: a row per eval (step,
    tokens_seen, ce_loss)."""

    train: list[dict[str, float]] = field(default_factory=list)
    eval: list[dict[str, float]] = field(default_factory=list)
    window: list[Tensor] = field(default_factory=list, repr=False)
    since: float = field(default_factory=time.perf_counter, repr=False)

    def log_train(self, step: int, tokens_seen: int, lr: float, tokens_per_step: int) -> dict[str, float]:
        """Close the window of train losses into a row. Raises DivergedError on NaN/inf."""
        loss = torch.stack(self.window).mean().item()  # one device sync per log, not per step
        if not math.isfinite(loss):
            raise DivergedError(step, "loss", loss)
        tok_s = len(self.window) * tokens_per_step / max(time.perf_counter() - self.since, 1e-9)
        row = {"step": step, TOKENS_SEEN: tokens_seen, LOSS: loss, LR: lr, TOKENS_PER_S: tok_s}
        self.train.append(row)
        self.window, self.since = [], time.perf_counter()
        return row


@dataclass
class LMTrainResult:
    run_dir: Path | None
    metrics: dict[str, float]
    """`eval/ce_loss_start`, `eval/ce_loss` (end), `train/loss` (last window), tokens, wall time."""
    curve: LossCurve
    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)


def train_lm(cfg: LMTrainConfig, show_progress: bool = True) -> LMTrainResult:
    """Train a causal LM from scratch with AdamW on next-token CE; evaluate; write the run folder.

    Each step reads `batch_size` sequences of train_data.n_ctx tokens; the lr follows
    `sparsify.training.schedule.lr_factor` per optimizer step; eval CE at the start, every
    eval_every_n_samples and at the end.

    Raises:
        ConfigError: an unloadable tokenizer or an unwritable save_dir.
        DataError: data too small or unreadable (before any training step).
        DivergedError: a NaN/inf train loss, found at the next log.
    """
    from sparsify.model_loading import resolve_device

    start = time.perf_counter()
    device = resolve_device(cfg.device)
    tokenizer = load_lm_tokenizer(cfg)
    run_dir = run_dir_for(cfg)
    if run_dir is not None:
        checkpoint.make_folder(run_dir.parent)  # the run folder itself is renamed into place
    _check_data(cfg, tokenizer)
    model = build_lm(cfg, tokenizer).to(device)
    optimizer = _adamw(model, cfg)
    tokens_per_step = cfg.batch_size * cfg.train_data.n_ctx
    curve = LossCurve()
    curve.eval.append({"step": 0, TOKENS_SEEN: 0, CE_LOSS: eval_ce(model, cfg, tokenizer, device)})
    logger.info("eval CE at start: %.4f nats/token", curve.eval[0][CE_LOSS])
    batches = iter_batches(
        cfg.train_data, tokenizer, cfg.batch_size, cfg.n_steps * cfg.batch_size, "n_samples"
    )
    progress = tqdm(total=cfg.n_steps * tokens_per_step, unit="tok", unit_scale=True, desc="train lm",
                    disable=not show_progress, dynamic_ncols=True)  # fmt: skip
    model.train()
    for step, tokens in enumerate(batches):
        tokens = tokens.to(device)
        loss = next_token_ce(model(input_ids=tokens).logits, tokens)
        loss.backward()
        _optimizer_step(model, optimizer, cfg, step)
        curve.window.append(loss.detach())
        progress.update(tokens.numel())
        done, tokens_seen = step + 1, (step + 1) * tokens_per_step
        if done % cfg.log_every_n_steps == 0 or done == cfg.n_steps:
            row = curve.log_train(done, tokens_seen, optimizer.param_groups[0]["lr"], tokens_per_step)
            progress.set_postfix(loss=f"{row[LOSS]:.3f}", tok_s=f"{row[TOKENS_PER_S]:.0f}")
            logger.info(
                "step %d/%d: train loss %.4f nats/token, lr %.2e", done, cfg.n_steps, row[LOSS], row[LR]
            )
        every = cfg.eval_every_n_samples
        if done == cfg.n_steps or (every and done * cfg.batch_size // every > step * cfg.batch_size // every):
            ce = eval_ce(model, cfg, tokenizer, device)
            curve.eval.append({"step": done, TOKENS_SEEN: tokens_seen, CE_LOSS: ce})
    progress.close()
    model.eval()
    logger.info("eval CE at end: %.4f nats/token", curve.eval[-1][CE_LOSS])
    metrics = {
        prefixed(EVAL, CE_LOSS_START): curve.eval[0][CE_LOSS],
        prefixed(EVAL, CE_LOSS): curve.eval[-1][CE_LOSS],
        prefixed(TRAIN, LOSS): curve.train[-1][LOSS],
        prefixed(TRAIN, TOKENS_SEEN): float(cfg.n_steps * tokens_per_step),
        N_PARAMS: float(sum(p.numel() for p in model.parameters())),
        WALL_S: time.perf_counter() - start,
    }
    if run_dir is not None:
        record = {"metrics": metrics, "train_curve": curve.train, "eval_curve": curve.eval}
        save_lm(run_dir, model, tokenizer, cfg, record)
        logger.info("saved the model, tokenizer, config and loss curve to %s", run_dir)
    return LMTrainResult(run_dir, metrics, curve, model, tokenizer)


def _check_data(cfg: LMTrainConfig, tokenizer: Any) -> None:
    """Fail before training when local data is unreadable or too small, naming the section.
    Raises DataError."""
    needs = [
        ("train_data", "n_samples", cfg.train_data, cfg.n_steps * cfg.batch_size),
        ("eval_data", "eval_n_samples", cfg.eval_data, cfg.eval_n_samples),
    ]
    check_section_budgets(needs, tokenizer)


def _adamw(model: Any, cfg: LMTrainConfig) -> torch.optim.AdamW:
    # decay matrices and embeddings; norms' gains and biases (1-D) stay undecayed
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _optimizer_step(model: Any, optimizer: torch.optim.Optimizer, cfg: LMTrainConfig, step: int) -> None:
    """Clip, set the scheduled lr for optimizer step `step` (0-based), step, zero the gradients."""
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    warmup, cooldown = cfg.warmup_samples // cfg.batch_size, cfg.cooldown_samples // cfg.batch_size
    factor = lr_factor(step, cfg.n_steps, cfg.lr_schedule, warmup, cooldown, cfg.min_lr_factor)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * factor
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def save_lm(run_dir: Path, model: Any, tokenizer: Any, cfg: LMTrainConfig, record: dict[str, Any]) -> None:
    """Write (or replace) the run folder: Hugging Face weights (safetensors) + config.json,
    tokenizer files, `lm_config.yaml` and `metrics.json`.

    Everything is written into a temp folder next to `run_dir`, which is then renamed into
    place, so a crash never leaves a half-written model folder under the run's name.
    """
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.tmp-", dir=run_dir.parent))
    old = run_dir.parent / f"{tmp.name}.old"
    try:
        model.save_pretrained(tmp)  # transformers 5 always writes model.safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        (tmp / METRICS_FILE).write_text(json.dumps(record, indent=2))
        for path in tmp.iterdir():  # transformers writes the weights 0600; runs are for sharing
            path.chmod(0o666 & ~current_umask())
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700
        if run_dir.exists():
            os.replace(run_dir, old)  # a folder cannot be renamed over a non-empty one
        os.replace(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not run_dir.exists():
            os.replace(old, run_dir)  # the rename failed: keep the previous run
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    return run_config_command(
        "python -m sparsify.models.lm",
        "Train a small causal LM from scratch on a text corpus.",
        "LM training config YAML",
        _train_lm_from_file,
        argv,
        interrupted="nothing was saved",
    )


def _train_lm_from_file(config: str) -> Any:
    cfg = load_lm_config(config)
    from sparsify.model_loading import quiet_library_progress_bars

    quiet_library_progress_bars()
    with logging_redirect_tqdm():  # log lines above the progress bar, not glued to it
        return train_lm(cfg)


if __name__ == "__main__":
    sys.exit(main())
