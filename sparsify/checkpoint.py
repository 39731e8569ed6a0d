"""Run folders and checkpoints: SAE weights (safetensors) + resolved config + metrics, written
atomically (temp file in the same folder, then `os.replace`)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sparsify.atomic import atomic_write_text, atomic_write_with
from sparsify.config import TrainConfig, config_to_yaml, load_config
from sparsify.errors import ConfigError

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


def load_sae_state(path: str | Path) -> dict[str, torch.Tensor]:
    """SAE weights from a run folder (its `sae.safetensors`), a `.safetensors` file, or a
    reference-library `.pt` state dict (DESIGN.md §12), keyed `<hook-key>.encoder.0.weight`,
    `.encoder.0.bias`, `.decoder.weight` (d_in, n_dict), `.decoder.bias`.

    Decoder columns are normalized to unit L2 norm: some released checkpoints store decoders
    that are not (the SAE normalizes inside forward, so behaviour is unchanged; the stored
    weights then equal the dictionary elements). A `saes.` key prefix is dropped.

    Raises:
        ConfigError: a missing file, an unknown file type, or a file that is not a state dict.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SAE_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"{path}: no such SAE file (give a run folder, .safetensors or .pt file)")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        elif path.suffix == ".pt":
            # weights_only: a .pt from elsewhere must not run code when it is read
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ConfigError(f"{path}: unknown SAE file type; allowed: a run folder, .safetensors, .pt")
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: cannot read SAE weights: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: not a state dict of tensors")
    state = {k.removeprefix("saes."): v for k, v in state.items()}
    for key, value in state.items():
        if key.endswith(".decoder.weight"):
            state[key] = F.normalize(value.float(), dim=0)
    return state


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved `config.yaml` of one of our run folders.

    Raises:
        ConfigError: no config.yaml, or one that no longer validates.
    """
    return load_config(Path(run_dir) / CONFIG_FILE)
