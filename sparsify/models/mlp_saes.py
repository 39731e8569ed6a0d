"""Local and e2e SAEs on the hidden layers of a trained digits MLP:
`python -m sparsify.models.mlp_saes cfg.yaml`.

The MLP (from `python -m sparsify.models.mlp`) is frozen; SAEs sit at chosen hidden
activations (`hidden.0`, ...) and replace them (`sparsify.models.mlp_splice`). Metrics (docs/design.md §5) are computed on the MLP's test
split, one "token" being one image. Writes a run folder: `sae.safetensors`, `config.yaml`,
`metrics.json`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml
from jaxtyping import Float, Int
from pydantic import Field, model_validator
from torch import Tensor, nn

from sparsify import metric_names as names
from sparsify import metrics
from sparsify.atomic import atomic_write_text
from sparsify.cli import run_config_command
from sparsify.config import LossConfig
from sparsify.errors import DivergedError
from sparsify.losses import weighted_total
from sparsify.models.mlp import (
    ACCURACY,
    CE_LOSS,
    MLPConfig,
    classification_metrics,
    load_digits_split,
    load_mlp,
    one_thread,
)
from sparsify.models.mlp_splice import MLPWithSAEs, in_to_orig_hooks, loss_terms
from sparsify.schema import SAFE_NAME, Seed, StrictModel, read_yaml, validate_model
from sparsify.training import checkpoint
from sparsify.training.checkpoint import (
    CONFIG_FILE,
    METRICS_FILE,
    SAE_WEIGHTS,
    load_sae_weights,
    save_sae_weights,
)
from sparsify.training.schedule import lr_factor

logger = logging.getLogger(__name__)

ACCURACY_ORIG = "accuracy_orig"
"""Test accuracy of the MLP without SAEs (fraction of images)."""
ACCURACY_SAE = "accuracy_sae"
"""Test accuracy with every SAE spliced in."""


class MLPSAEsConfig(StrictModel):
    mlp_dir: str
    """Run folder of a trained MLP (written by `python -m sparsify.models.mlp`)."""
    sae_positions: list[str] = Field(min_length=1)
    """Hidden activations to put SAEs at: `hidden.0` is the ReLU output of the first hidden layer."""
    dict_size_to_input_ratio: float = Field(default=4.0, gt=0)
    """Dictionary size = round(ratio * layer width)."""
    loss: LossConfig
    """Loss terms as in the LM case; `in_to_orig.hook_positions: later_resid_pre` means every
    hidden layer after the last SAE."""
    n_steps: int = Field(gt=0)
    """Optimizer steps (batches of training-split images)."""
    batch_size: int = Field(default=256, gt=0)
    """Images per step (the training split has 1437 at the default test_fraction)."""
    lr: float = Field(default=3e-3, gt=0)
    """Adam learning rate (Adam as in the reference; 3e-3 suits these 64-wide layers)."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    min_lr_factor: float = Field(default=0.1, ge=0, le=1)
    """Final lr as a fraction of lr (cosine/linear)."""
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=None, gt=0)
    """Clip gradients to this norm."""
    seed: Seed = 0
    """Seeds SAE init and batch order."""
    log_every_n_steps: int = Field(default=500, gt=0)
    save_dir: str | None = "runs"
    """Folder for run outputs; null writes nothing."""
    run_name: str | None = Field(default=None, pattern=SAFE_NAME)
    """Run folder name; default from the positions, ratio, coefficients and seed."""

    @model_validator(mode="after")
    def _consistent(self) -> MLPSAEsConfig:
        if len(set(self.sae_positions)) != len(self.sae_positions):
            raise ValueError(f"sae_positions: each position at most once (got {self.sae_positions})")
        if self.warmup_steps > self.n_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed n_steps ({self.n_steps})")
        if self.loss.l0_penalty is not None:  # the MLP's SAEs are ReLU SAEs (`sparsify.sae.SAE`)
            raise ValueError(
                "loss.l0_penalty: the MLP's SAEs are relu SAEs; their sparsity term is loss.sparsity"
            )
        return self


@torch.no_grad()
def evaluate(
    model: MLPWithSAEs,
    x: Float[Tensor, "n d_in"],
    labels: Int[Tensor, " n"],
    loss: LossConfig,
    downstream: list[str],
) -> dict[str, float]:
    """Metrics over all of `x` in one batch, un-prefixed (docs/design.md §5; one image = one token).

    L0 and alive dictionary elements per position and summed over positions (alive: fired on at
    least one of the images); explained variance of each SAE (output vs input) and of each
    in_to_orig hook; CE of both models (nats per image), the increase, KL, top-1 agreement, total
    variation, accuracy of both models; each configured loss term.
    """
    raw, out = model.forward_raw(x), model(x)
    values = {names.L0: 0.0, names.ALIVE: 0.0}
    for pos, codes in out.codes.items():
        firing = metrics.FiringCounter(codes.shape[-1])
        firing.update(codes)
        values[names.per_hook(names.L0, pos)] = metrics.l0(codes)
        values[names.per_hook(names.ALIVE, pos)] = firing.alive()
        values[names.per_hook(names.EXPLAINED_VARIANCE, pos)] = metrics.explained_variance(
            out.sae_out[pos], out.hidden[pos]
        )
        values[names.L0] += values[names.per_hook(names.L0, pos)]
        values[names.ALIVE] += firing.alive()
    for hook in downstream:
        values[names.per_hook(names.EXPLAINED_VARIANCE, hook)] = metrics.explained_variance(
            out.hidden[hook], raw.hidden[hook]
        )
    orig, sae = classification_metrics(raw.logits, labels), classification_metrics(out.logits, labels)
    values |= {
        names.CE_ORIG: orig[CE_LOSS],
        names.CE_SAE: sae[CE_LOSS],
        names.CE_LOSS_INCREASE: sae[CE_LOSS] - orig[CE_LOSS],
        names.KL: metrics.kl_divergence(raw.logits, out.logits),
        names.TOP1_AGREEMENT: metrics.top1_agreement(raw.logits, out.logits),
        names.TOTAL_VARIATION: metrics.total_variation(raw.logits, out.logits),
        ACCURACY_ORIG: orig[ACCURACY],
        ACCURACY_SAE: sae[ACCURACY],
    }
    terms = loss_terms(loss, out, raw, downstream)
    values[names.LOSS] = weighted_total(terms, loss).item()
    values |= {names.loss_term(k): v.item() for k, v in terms.items()}
    return values


def batch_indices(n: int, batch_size: int, n_steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """`n_steps` index batches: shuffled epochs of range(n), chained; a short last batch of an
    epoch is skipped so every step sees `batch_size` images (all of them if n < batch_size)."""
    step = 0
    while True:
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            if len(idx) < min(batch_size, n):
                continue
            if step == n_steps:
                return
            yield idx
            step += 1


def run_dir_for(cfg: MLPSAEsConfig) -> Path | None:
    """The run folder: save_dir / (run_name or e.g. `hidden-0_ratio4_sparsity0.5_logits_kl1_seed0`)."""
    return checkpoint.run_dir_for(
        cfg.save_dir,
        cfg.run_name,
        lambda: checkpoint.sae_run_name(cfg.sae_positions, cfg.dict_size_to_input_ratio, cfg.loss, cfg.seed),
    )


@dataclass
class MLPSAEsResult:
    model: MLPWithSAEs
    metrics: dict[str, float]
    """Prefixed: `eval/...` on the test split, `train/loss...` of the last step."""
    run_dir: Path | None


def build_model(cfg: MLPSAEsConfig) -> tuple[MLPWithSAEs, MLPConfig]:
    """Load the frozen MLP from `cfg.mlp_dir` and add fresh SAEs, seeded by `cfg.seed`.

    Returns:
        (the model, the MLP's own config: its split seed and test fraction give the data).
    """
    mlp, mlp_cfg = load_mlp(cfg.mlp_dir)
    torch.manual_seed(cfg.seed)
    return MLPWithSAEs(mlp, cfg.sae_positions, cfg.dict_size_to_input_ratio), mlp_cfg


def train_saes(cfg: MLPSAEsConfig) -> MLPSAEsResult:
    """Train the SAEs with Adam on the MLP's training split; evaluate on its test split; write the
    run folder.

    Raises:
        ConfigError, HookNameError: a missing MLP or a position it does not have.
        DivergedError: a loss term became NaN or inf.
    """
    model, mlp_cfg = build_model(cfg)
    downstream = in_to_orig_hooks(cfg.loss, model.sae_positions, model.mlp.hidden_names)
    data = load_digits_split(mlp_cfg.split_seed, mlp_cfg.test_fraction)
    optimizer = torch.optim.Adam(model.saes.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, cfg.n_steps, cfg.lr_schedule, cfg.warmup_steps, 0, cfg.min_lr_factor),
    )
    order = torch.Generator().manual_seed(cfg.seed)
    train_values: dict[str, float] = {}
    with one_thread():
        for step, idx in enumerate(batch_indices(len(data.y_train), cfg.batch_size, cfg.n_steps, order)):
            x = data.x_train[idx]
            terms = loss_terms(cfg.loss, model(x), model.forward_raw(x), downstream)
            total = weighted_total(terms, cfg.loss)
            for name, value in {**terms, "total": total}.items():
                if not torch.isfinite(value):
                    raise DivergedError(step, name, value.item())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if cfg.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.saes.parameters(), cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            train_values = {names.LOSS: total.item()} | {
                names.loss_term(k): v.item() for k, v in terms.items()
            }
            if step % cfg.log_every_n_steps == 0 or step == cfg.n_steps - 1:
                logger.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in train_values.items()))
        eval_values = evaluate(model, data.x_test, data.y_test, cfg.loss, downstream)
    result = {names.prefixed(names.TRAIN, k): v for k, v in train_values.items()}
    result |= {names.prefixed(names.EVAL, k): v for k, v in eval_values.items()}
    run_dir = run_dir_for(cfg)
    if run_dir is not None:
        save_run(run_dir, model, cfg, result)
    return MLPSAEsResult(model, result, run_dir)


def save_run(run_dir: Path, model: MLPWithSAEs, cfg: MLPSAEsConfig, values: dict[str, float]) -> None:
    """Write (or overwrite) the run folder atomically: SAE weights (keys `hidden-0.encoder.0.weight`,
    ...), resolved config, metrics."""
    checkpoint.make_folder(run_dir)
    save_sae_weights(run_dir / SAE_WEIGHTS, model.saes.state_dict())
    atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    atomic_write_text(run_dir / METRICS_FILE, json.dumps(values, indent=2, sort_keys=True))


def load_run(run_dir: str | Path) -> MLPWithSAEs:
    """The MLP with the trained SAEs of a run folder (its config names the MLP's folder).

    Raises:
        ConfigError: a missing or invalid file.
    """
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / CONFIG_FILE)
    model, _ = build_model(cfg)
    model.saes.load_state_dict(load_sae_weights(run_dir / SAE_WEIGHTS))
    return model


def load_config(path: str | Path) -> MLPSAEsConfig:
    """Read and validate an MLP-SAE config YAML.

    Raises:
        ConfigError: one line, `file: field: what is allowed`.
    """
    return validate_model(MLPSAEsConfig, read_yaml(path), str(path))


def main(argv: list[str] | None = None) -> int:
    return run_config_command(
        "python -m sparsify.models.mlp_saes",
        (__doc__ or "").splitlines()[0],
        "MLP-SAE config YAML",
        lambda config: train_saes(load_config(config)),
        argv,
        headline=lambda m: {k: v for k, v in m.items() if k.startswith("eval/") and "/hidden" not in k},
        interrupted="nothing was saved",
    )


if __name__ == "__main__":
    sys.exit(main())
