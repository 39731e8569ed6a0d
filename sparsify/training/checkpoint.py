"""Run folders and checkpoints. A run folder (`run_dir_for` builds its path, for every kind of
run) holds SAE weights (safetensors) + resolved config + metrics, written atomically (temp
file in the same folder, then `os.replace`).

A resume checkpoint (`save_checkpoint`, `load_checkpoint`) adds what a run needs to continue
exactly where it stopped: Adam's tensors (safetensors) and the trainer's state (JSON: step,
samples seen, the open log window, Adam's scalars). Nothing is pickled."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sparsify import saelens_import
from sparsify.atomic import atomic_write_text, atomic_write_with, check_writable, current_umask, storage_error
from sparsify.config import LossConfig, SAEsConfig, TrainConfig, config_to_yaml, load_config
from sparsify.errors import ConfigError
from sparsify.hooks import hook_to_key

SAE_WEIGHTS = "sae.safetensors"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
EVAL_PER_SEQUENCE_FILE = "eval_per_sequence.json"
"""In a finished run folder with eval data: the final eval's per-sequence values
(`TrainResult.eval_per_sequence`: `{"eval/L0": [...], ...}`, in eval-stream order)."""


def run_dir_for(save_dir: str | None, run_name: str | None, default_name: Callable[[], str]) -> Path | None:
    """The one place a run folder path is built (SAE, MLP and LM runs alike): save_dir /
    (run_name or default_name()); None when save_dir is None (the run writes nothing)."""
    if save_dir is None:
        return None
    return Path(save_dir) / (run_name or default_name())


def sae_run_name(
    positions: Sequence[str],
    dict_size_to_input_ratio: float,
    loss: LossConfig,
    seed: int,
    architecture: str = "relu",
    k: int | None = None,
) -> str:
    """Default name of an SAE run folder from what tells runs apart:
    `blocks-6-hook_resid_pre_ratio4_sparsity1.5_logits_kl1_seed0` (positions, dictionary size
    ratio, the nonzero loss coefficients, seed); an architecture other than relu is named after
    the ratio, with its k (`..._ratio4_topk32_out_to_in1_seed0`), so runs that differ only in it
    do not share a folder."""
    coeffs = "_".join(f"{term}{v:g}" for term, v in loss.coeffs().items() if v)
    arch = "" if architecture == "relu" else f"_{architecture}{'' if k is None else k}"
    return (
        f"{'+'.join(hook_to_key(p) for p in positions)}_ratio{dict_size_to_input_ratio:g}{arch}_{coeffs}"
        f"_seed{seed}"
    )


def make_folder(folder: Path) -> None:
    """Create a folder a run will write into (and its parents) now, after every other check,
    and check that it takes a file: a save_dir that cannot hold the run (read-only storage, a
    full disk) fails here in one line, not after training.

    Raises:
        ConfigError: `save_dir: ...` when a parent is a file, or the folder cannot be created
            or written.
    """
    for path in (folder, *folder.parents):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"save_dir: {path} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"save_dir: cannot create {folder} ({exc.strerror})") from None
    try:
        check_writable(folder)
    except OSError as exc:
        raise ConfigError(f"save_dir: {folder} is not writable ({exc.strerror})") from None


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
    eval_per_sequence: dict[str, list[float]] | None = None,
) -> None:
    """Write (or overwrite) a run folder: weights, resolved config, metrics, and the final
    eval's per-sequence values (`EVAL_PER_SEQUENCE_FILE`) when given; without them an older
    such file is removed, so it never describes other weights than those beside it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_sae_weights(run_dir / SAE_WEIGHTS, sae_state)
    atomic_write_text(run_dir / CONFIG_FILE, config_to_yaml(cfg))
    atomic_write_text(run_dir / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True))
    per_sequence_file = run_dir / EVAL_PER_SEQUENCE_FILE
    if eval_per_sequence is None:
        per_sequence_file.unlink(missing_ok=True)
    else:
        atomic_write_text(per_sequence_file, json.dumps(eval_per_sequence, sort_keys=True))


def load_sae_state(path: str | Path, saes: SAEsConfig | None = None) -> dict[str, torch.Tensor]:
    """SAE weights from a run folder (its `sae.safetensors`), a `.safetensors` file, a
    reference-library `.pt` state dict (docs/design.md §12), or a SAELens-format folder
    (`cfg.json` + `sae_weights.safetensors`, converted by `sparsify.saelens_import`), keyed
    `<hook-key>.encoder.0.weight`, `.encoder.0.bias`, `.decoder.weight` (d_in, n_dict),
    `.decoder.bias`, plus an architecture's own tensors (`log_threshold`, `threshold`).

    Decoder columns are normalized to unit L2 norm: some released checkpoints store decoders
    that are not (the SAE normalizes inside forward, so behaviour is unchanged; the stored
    weights then equal the dictionary elements). A `saes.` key prefix is dropped.

    Args:
        path: the file or folder.
        saes: the config the SAEs will join; a SAELens folder must match its architecture and k.

    Raises:
        ConfigError: a missing file, an unknown file type, a file that is not a state dict, or
            a SAELens folder we cannot convert exactly.
    """
    path = Path(path)
    if path.is_dir() and saelens_import.is_saelens_folder(path):
        state = saelens_import.load_saelens_state(path, saes)
        return _unit_decoders(state)
    if path.is_dir() and saes is not None and (path / CONFIG_FILE).is_file():
        _check_same_architecture(path, saes)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.is_dir() and saelens_import.is_saelens_folder(p))
        if (
            inside and not (path / SAE_WEIGHTS).is_file()
        ):  # an export's top folder: one SAELens folder per hook
            raise ConfigError(
                f"{path}: holds SAELens folders, one per SAE position: give {path / inside[0]} (or each of them)"
            )
        path = path / SAE_WEIGHTS
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such SAE file (give a run folder, SAELens folder, .safetensors or .pt file)"
        )
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
    return _unit_decoders({k.removeprefix("saes."): v for k, v in state.items()})


def _unit_decoders(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for key, value in state.items():
        if key.endswith(".decoder.weight"):
            state[key] = F.normalize(value.float(), dim=0)
    return state


def _check_same_architecture(run_dir: Path, saes: SAEsConfig) -> None:
    """Raises ConfigError (one line) when a run folder's SAEs are of another architecture or k
    than `saes`: their tensors may have the same names (relu and topk), so loading would go
    through and silently change what the SAE computes."""
    run = load_run_config(run_dir).saes
    if (run.architecture, run.k) != (saes.architecture, saes.k):

        def name(s: SAEsConfig) -> str:
            return s.architecture if s.k is None else f"{s.architecture} with k {s.k}"

        raise ConfigError(f"{run_dir} holds {name(run)} SAEs, but this config's saes are {name(saes)}")


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved `config.yaml` of one of our run folders.

    Raises:
        ConfigError: no config.yaml, or one that no longer validates.
    """
    return load_config(Path(run_dir) / CONFIG_FILE)


# --- resume checkpoints (docs/design.md §11: a trial's work is never lost) -------------------------

CHECKPOINTS_DIR = "checkpoints"
"""Sub-folder of a run folder holding its latest mid-run checkpoint (removed when the run ends)."""
OPTIMIZER_WEIGHTS = "optimizer.safetensors"
TRAIN_STATE_FILE = "train_state.json"
"""Step, samples seen, world size, the open log window and the optimizer's non-tensor state.
In a run folder it marks a finished run: written last, after the final weights and metrics."""
CHECKPOINT_FORMAT = 1
RESUME_FREE_FIELDS = ("save_dir", "run_name", "device", "tensorboard", "wandb_project", "compile")
"""Config fields a resumed run may change: where it writes and logs, the device, and whether
it is compiled (same maths)."""


def step_checkpoint_dir(run_dir: Path, step: int) -> Path:
    """The one place a mid-run checkpoint's path is built: `<run_dir>/checkpoints/step_<step>`."""
    return run_dir / CHECKPOINTS_DIR / f"step_{step:09d}"


@dataclass(frozen=True)
class ResumeState:
    """Everything a run needs to continue where a checkpoint left it (`load_checkpoint`)."""

    folder: Path
    config: TrainConfig
    sae_state: dict[str, torch.Tensor]
    train_state: dict[str, Any]
    """JSON part: `step`, `samples_seen`, `world_size`, `lr`, `window` (see the trainer)."""
    optimizer_state: dict[str, Any] | None
    """A torch optimizer `state_dict()`; None in a finished run's final state."""


def save_checkpoint(
    run_dir: Path,
    step: int,
    sae_state: dict[str, torch.Tensor],
    cfg: TrainConfig,
    train_state: dict[str, Any],
    optimizer_state: dict[str, Any],
) -> Path:
    """Write a mid-run checkpoint and delete the older ones of the run.

    The folder is written under a dot-named temp name and renamed into place, so a crash leaves
    either a whole checkpoint or none (plus a dot-named leftover the next save removes). It holds
    `sae.safetensors`, `config.yaml`, `optimizer.safetensors` (Adam's tensors, keyed
    `<param index>.<name>`) and `train_state.json` (the rest, JSON; nothing is pickled).

    Args:
        run_dir: the run folder (`sparsify.training.build.run_dir_for`).
        step: optimizer steps done.
        sae_state: the SAEs' state dict.
        cfg: the run's config.
        train_state: JSON-able trainer state (step, samples seen, log window, ...).
        optimizer_state: `optimizer.state_dict()`.

    Returns:
        The checkpoint folder, `step_checkpoint_dir(run_dir, step)`.

    Raises:
        StorageError: the storage refused the write (`cannot write <checkpoint folder>: No space
            left on device`, or read-only, ...); the previous checkpoint is kept whole and the
            partial one removed.
        OSError: the folder cannot be written for another reason.
    """
    final = step_checkpoint_dir(run_dir, step)
    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; checkpoints are for sharing
        tensors, optimizer_json = _split_optimizer_state(optimizer_state)
        atomic_write_with(tmp / OPTIMIZER_WEIGHTS, lambda path: save_file(tensors, path))
        _write_state_files(tmp, sae_state, cfg, {**train_state, "optimizer": optimizer_json})
        if final.exists():  # left by an attempt that crashed before its checkpoint was registered
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        # the checkpoint folder, not the temp file inside its temp folder that failed
        error = storage_error(exc, final) if isinstance(exc, Exception) else None
        if error is None:
            raise
        raise error from exc
    for old in final.parent.iterdir():
        if old != final and old.name.startswith(("step_", ".step_")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_final_state(run_dir: Path, train_state: dict[str, Any]) -> None:
    """Mark a run folder finished: write its `train_state.json` (after `save_run` wrote the final
    weights, config and metrics), then delete its mid-run checkpoints. The run folder is then
    itself a checkpoint that resumes with nothing left to train (no optimizer state)."""
    state = {"format": CHECKPOINT_FORMAT, **train_state, "optimizer": None}
    atomic_write_text(run_dir / TRAIN_STATE_FILE, json.dumps(state, indent=1, sort_keys=True))
    shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)


def clear_final_state(run_dir: Path) -> None:
    """Unmark a run folder as finished, before a run overwrites its weights mid-run (so its
    `train_state.json` never describes other weights than those beside it)."""
    (run_dir / TRAIN_STATE_FILE).unlink(missing_ok=True)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder `path` names: a checkpoint folder itself (it has a
    `train_state.json`: a mid-run checkpoint, a finished run folder, or Ray's copy of either),
    or a run folder, whose latest mid-run checkpoint is taken.

    Raises:
        ConfigError: no checkpoint there.
    """
    path = Path(path)
    if (path / TRAIN_STATE_FILE).is_file():
        return path
    steps = sorted((path / CHECKPOINTS_DIR).glob("step_*")) if path.is_dir() else []
    if steps:
        return steps[-1]
    raise ConfigError(
        f"resume_from: {path} holds no checkpoint (no {TRAIN_STATE_FILE}, nothing in {CHECKPOINTS_DIR}/); "
        "set save_every_n_samples to write checkpoints during training"
    )


def load_checkpoint(path: str | Path, cfg: TrainConfig) -> ResumeState:
    """Read the checkpoint `path` names (`find_checkpoint`) and check it belongs to `cfg`.

    Raises:
        ConfigError: no checkpoint, an unreadable one, or one written with another config
            (fields other than `RESUME_FREE_FIELDS` differ; the message names them).
    """
    folder = find_checkpoint(path)
    try:
        train_state = json.loads((folder / TRAIN_STATE_FILE).read_text())
        if train_state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {train_state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        sae_state = load_file(str(folder / SAE_WEIGHTS))
        optimizer_state = None
        if train_state["optimizer"] is not None:
            tensors = load_file(str(folder / OPTIMIZER_WEIGHTS))
            optimizer_state = _join_optimizer_state(tensors, train_state["optimizer"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:  # JSONDecodeError: ValueError
        raise ConfigError(f"resume_from: {folder}: not a readable checkpoint ({exc})") from None
    saved_cfg = load_run_config(folder)
    changed = _changed_fields(saved_cfg.model_dump(mode="json"), cfg.model_dump(mode="json"))
    changed = [path for path in changed if path.split(".")[0] not in RESUME_FREE_FIELDS]
    if changed:
        raise ConfigError(
            f"resume_from: {folder} was trained with another config ({', '.join(changed)} differ); "
            "resume with the config it was written with"
        )
    return ResumeState(folder, saved_cfg, sae_state, train_state, optimizer_state)


def _write_state_files(
    folder: Path, sae_state: dict[str, torch.Tensor], cfg: TrainConfig, train_state: dict[str, Any]
) -> None:
    save_sae_weights(folder / SAE_WEIGHTS, sae_state)
    atomic_write_text(folder / CONFIG_FILE, config_to_yaml(cfg))
    state = {"format": CHECKPOINT_FORMAT, **train_state}
    atomic_write_text(folder / TRAIN_STATE_FILE, json.dumps(state, indent=1, sort_keys=True))


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torch optimizer state dict as (tensors keyed `<param index>.<name>`, the JSON rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `_split_optimizer_state` (JSON lists back to tuples, as torch wrote them)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in rest["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def _changed_fields(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON config trees differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        changed = []
        for key in sorted(set(saved) | set(current)):
            changed += _changed_fields(saved.get(key), current.get(key), f"{prefix}{key}.")
        return changed
    return [] if saved == current else [prefix.rstrip(".")]
