"""A small ReLU MLP classifier trained on scikit-learn's digits: `python -m sparsify.models.mlp cfg.yaml`.

The digits data set (1797 8x8 grey images, pixels 0-16, 10 classes) ships inside scikit-learn,
so no download is needed. The MLP is the frozen model that `sparsify.models.mlp_saes` puts SAEs
into; its hidden activations `hidden.0`, `hidden.1`, ... are the SAE positions.

Writes a run folder: `model.safetensors`, the resolved `config.yaml`, `metrics.json`
(accuracy and CE on the train and test splits; `eval/` means the test split).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
import yaml
from jaxtyping import Float, Int
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sparsify.atomic import atomic_write_text, atomic_write_with
from sparsify.cli import run_config_command
from sparsify.errors import ConfigError, MissingPackageError
from sparsify.metric_names import EVAL, TRAIN, prefixed
from sparsify.schema import SAFE_NAME, Seed, StrictModel, read_yaml, validate_model
from sparsify.training import checkpoint

MODEL_WEIGHTS = "model.safetensors"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
ACCURACY = "accuracy"
"""Fraction of samples whose most likely class is the label."""
CE_LOSS = "ce_loss"
"""Cross-entropy of the class distribution against the label, nats per sample."""
N_PIXELS = 64
N_CLASSES = 10
PIXEL_MAX = 16.0
"""Digits pixels are integers 0-16; inputs are divided by this (parameter-free scaling)."""


class MLPConfig(StrictModel):
    hidden_sizes: list[Annotated[int, Field(gt=0)]] = Field(default=[64, 64], min_length=1)
    """Width of each hidden layer; the SAE positions are `hidden.0`, `hidden.1`, ..."""
    n_epochs: int = Field(default=30, gt=0)
    """Passes over the training split."""
    batch_size: int = Field(default=64, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    """AdamW learning rate (constant)."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW decoupled weight decay."""
    seed: Seed = 0
    """Seeds the weight init and the batch order."""
    split_seed: Seed = 0
    """Seeds the stratified train/test split (SAE runs on this MLP reuse the same split)."""
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    """Fraction of the 1797 images held out as the test split."""
    save_dir: str | None = "runs"
    """Folder for run outputs; null writes nothing."""
    run_name: str | None = Field(default=None, pattern=SAFE_NAME)
    """Run folder name; default `mlp_digits_<sizes>_seed<seed>`."""


@dataclass(frozen=True)
class DigitsSplit:
    """Scaled digits images and labels of both splits: x (n, 64) in [0, 1], y (n,) in 0-9."""

    x_train: Float[Tensor, "n_train 64"]
    y_train: Int[Tensor, " n_train"]
    x_test: Float[Tensor, "n_test 64"]
    y_test: Int[Tensor, " n_test"]


def load_digits_split(split_seed: int, test_fraction: float) -> DigitsSplit:
    """scikit-learn's digits, split stratified by class with `split_seed`, pixels / 16.

    Raises:
        MissingPackageError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise MissingPackageError("the digits MLP needs scikit-learn: pip install scikit-learn") from None
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=split_seed, stratify=labels
    )

    def as_x(a):
        return torch.tensor(a, dtype=torch.float32) / PIXEL_MAX

    def as_y(a):
        return torch.tensor(a, dtype=torch.long)

    return DigitsSplit(as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test))


@dataclass
class MLPRun:
    """One forward pass: class logits and every hidden activation.

    `hidden[name]` is the activation computed at that layer, (batch, width), before any
    `replace` function swapped it (so at an SAE position it is the SAE input).
    """

    logits: Float[Tensor, "batch n_classes"]
    hidden: dict[str, Float[Tensor, "batch width"]]


def hidden_name(index: int) -> str:
    """Name of the i-th hidden activation (the SAE position): `hidden_name(0) == "hidden.0"`."""
    return f"hidden.{index}"


class MLP(nn.Module):
    """x -> ReLU(Linear) per hidden layer -> Linear readout to class logits.

    The activation `hidden.i` is the ReLU output of hidden layer i, shape (batch, hidden_sizes[i]).

    Args:
        d_in: input width (64 for 8x8 digits).
        hidden_sizes: width of each hidden layer.
        n_classes: number of classes (10 for digits).
    """

    def __init__(self, d_in: int, hidden_sizes: list[int], n_classes: int):
        super().__init__()
        sizes = [d_in, *hidden_sizes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.readout = nn.Linear(sizes[-1], n_classes)

    @property
    def hidden_names(self) -> list[str]:
        return [hidden_name(i) for i in range(len(self.layers))]

    def width(self, name: str) -> int:
        """Width of the hidden activation `name`."""
        layer = self.layers[self.hidden_names.index(name)]
        assert isinstance(layer, nn.Linear)
        return layer.out_features

    def run(
        self,
        x: Float[Tensor, "batch d_in"],
        replace: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
    ) -> MLPRun:
        """Forward pass; `replace[name]` maps the activation at `name` to what flows on (the
        splice: docs/design.md §3, the SAE output REPLACES the activation)."""
        replace = replace or {}
        hidden: dict[str, Tensor] = {}
        act = x
        for name, layer in zip(self.hidden_names, self.layers, strict=True):
            act = F.relu(layer(act))
            hidden[name] = act
            if name in replace:
                act = replace[name](act)
        return MLPRun(self.readout(act), hidden)

    def forward(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch n_classes"]:
        return self.run(x).logits


@torch.no_grad()
def classification_metrics(
    logits: Float[Tensor, "n n_classes"], labels: Int[Tensor, " n"]
) -> dict[str, float]:
    """Accuracy (fraction) and CE (nats per sample) of class logits."""
    return {
        ACCURACY: (logits.argmax(-1) == labels).float().mean().item(),
        CE_LOSS: F.cross_entropy(logits.float(), labels).item(),
    }


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block (restored after).

    The matrices here are 64 wide: splitting them over threads costs more in synchronization than
    it saves (measured 2.5x slower with 2 threads on a busy 2-core machine).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_dir_for(cfg: MLPConfig) -> Path | None:
    """An MLP's run folder: save_dir / (run_name or `mlp_digits_<widths>_seed<seed>`)."""
    return checkpoint.run_dir_for(
        cfg.save_dir,
        cfg.run_name,
        lambda: f"mlp_digits_{'x'.join(map(str, cfg.hidden_sizes))}_seed{cfg.seed}",
    )


@dataclass
class TrainedMLP:
    model: MLP
    cfg: MLPConfig
    data: DigitsSplit
    metrics: dict[str, float]
    """`train/accuracy`, `train/ce_loss`, `eval/accuracy`, `eval/ce_loss` (eval = test split)."""
    run_dir: Path | None


def train_mlp(cfg: MLPConfig) -> TrainedMLP:
    """Train the MLP with AdamW and cross-entropy on the digits train split; write the run folder.

    Raises:
        MissingPackageError: scikit-learn is not installed.
    """
    data = load_digits_split(cfg.split_seed, cfg.test_fraction)
    torch.manual_seed(cfg.seed)
    model = MLP(N_PIXELS, cfg.hidden_sizes, N_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(cfg.seed)
    with one_thread():
        for _ in range(cfg.n_epochs):
            for idx in torch.randperm(len(data.y_train), generator=order).split(cfg.batch_size):
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    model.eval()
    metrics = {}
    for split, x, y in ((TRAIN, data.x_train, data.y_train), (EVAL, data.x_test, data.y_test)):
        for key, value in classification_metrics(model(x), y).items():
            metrics[prefixed(split, key)] = value
    run_dir = run_dir_for(cfg)
    if run_dir is not None:
        save_mlp(run_dir, model, cfg, metrics)
    return TrainedMLP(model, cfg, data, metrics, run_dir)


def save_mlp(run_dir: Path, model: MLP, cfg: MLPConfig, metrics: dict[str, float]) -> None:
    """Write (or overwrite) the run folder atomically: weights, resolved config, metrics."""
    checkpoint.make_folder(run_dir)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write_with(run_dir / MODEL_WEIGHTS, lambda tmp: save_file(tensors, tmp))
    atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    atomic_write_text(run_dir / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True))


def load_mlp(run_dir: str | Path, field: str = "mlp_dir") -> tuple[MLP, MLPConfig]:
    """Load a trained MLP (frozen, eval mode) and its config from a run folder.

    Raises:
        ConfigError: the folder has no trained MLP (naming `field`), or its files are invalid.
    """
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_WEIGHTS).is_file():
        raise ConfigError(
            f"{field}: no trained MLP in {run_dir} ({MODEL_WEIGHTS} missing); train one with "
            f"`python -m sparsify.models.mlp configs/mlp_digits.yaml`"
        )
    cfg = load_mlp_config(run_dir / CONFIG_FILE)
    model = MLP(N_PIXELS, cfg.hidden_sizes, N_CLASSES)
    try:
        model.load_state_dict(load_file(str(run_dir / MODEL_WEIGHTS)))
    except (RuntimeError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"{run_dir / MODEL_WEIGHTS}: does not match its config.yaml ({first_line})"
        ) from None
    model.requires_grad_(False)
    return model.eval(), cfg


def load_mlp_config(path: str | Path) -> MLPConfig:
    """Read and validate an MLP config YAML.

    Raises:
        ConfigError: one line, `file: field: what is allowed`.
    """
    return validate_model(MLPConfig, read_yaml(path), str(path))


def main(argv: list[str] | None = None) -> int:
    return run_config_command(
        "python -m sparsify.models.mlp",
        (__doc__ or "").splitlines()[0],
        "MLP config YAML",
        lambda config: train_mlp(load_mlp_config(config)),
        argv,
        interrupted="nothing was saved",
    )


if __name__ == "__main__":
    sys.exit(main())
