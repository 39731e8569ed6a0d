"""Run folders and checkpoints: SAE weights (safetensors) + resolved config + metrics, written
atomically (temp file in the same folder, then `os.replace`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sparsify.atomic import atomic_write_text, atomic_write_with
from sparsify.config import TrainConfig, config_to_yaml

SAE_WEIGHTS = "sae.safetensors"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
STATE_FILE = "train_state.pt"


def save_sae_weights(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Save the SAEs' state dict (keys `<hook-key>.encoder.0.weight`, ...) as safetensors."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write_with(path, lambda tmp: save_file(tensors, tmp))


def load_sae_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_run(
    run_dir: Path,
    sae_state: dict[str, torch.Tensor],
    cfg: TrainConfig,
    metrics: dict[str, float],
    train_state: dict[str, Any] | None = None,
) -> None:
    """Write (or overwrite) a run folder: weights, resolved config, metrics, optional state.

    `train_state` (optimizer state, step, RNG) lets a run resume; it is saved with torch and
    read back with `weights_only=True`.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    save_sae_weights(run_dir / SAE_WEIGHTS, sae_state)
    atomic_write_text(run_dir / CONFIG_FILE, config_to_yaml(cfg))
    atomic_write_text(run_dir / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True))
    if train_state is not None:
        atomic_write_with(run_dir / STATE_FILE, lambda tmp: torch.save(train_state, tmp))


def load_train_state(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / STATE_FILE
    return torch.load(path, weights_only=True) if path.exists() else None
