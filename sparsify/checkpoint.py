"""Run folders and checkpoints: SAE weights (safetensors) + resolved config + metrics, written
atomically (temp file in the same folder, then `os.replace`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sparsify.atomic import atomic_write_text, atomic_write_with
from sparsify.config import TrainConfig, config_to_yaml

SAE_WEIGHTS = "sae.safetensors"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"


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
) -> None:
    """Write (or overwrite) a run folder: weights, resolved config, metrics."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_sae_weights(run_dir / SAE_WEIGHTS, sae_state)
    atomic_write_text(run_dir / CONFIG_FILE, config_to_yaml(cfg))
    atomic_write_text(run_dir / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True))
