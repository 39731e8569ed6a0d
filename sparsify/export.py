"""`python -m sparsify.export RUN_DIR OUT_DIR`: our trained SAEs in SAELens's on-disk format.

One folder per SAE position, named by its hook (`OUT_DIR/blocks.6.hook_resid_pre/`), holding
`cfg.json` and `sae_weights.safetensors` as SAELens 6 writes them for a `standard` (ReLU) SAE;
`sae_lens.SAE.load_from_disk(folder)` loads it and gives our codes and outputs (docs/design.md §3).
User mistakes print `error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from sparsify.atomic import atomic_write_text, atomic_write_with
from sparsify.config import TrainConfig
from sparsify.errors import ConfigError, HookNameError, SparsifyError
from sparsify.hooks import hook_to_key
from sparsify.redaction import redact
from sparsify.sae import SAE
from sparsify.training import checkpoint

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.54.12"
"""The SAELens release whose layout we write. SAELens reads `metadata.sae_lens_version` to pick
its reader: below 6.0 it would treat cfg.json as the old flat layout."""
SAE_TENSORS = ("encoder.0.weight", "encoder.0.bias", "decoder.weight", "decoder.bias")


def saelens_state(sae: SAE) -> dict[str, Tensor]:
    """Our SAE's weights under SAELens's names, for `StandardSAE` (no input centering).

    SAELens computes codes = ReLU(x @ W_enc + b_enc) and sae_out = codes @ W_dec + b_dec, so
    W_enc is our encoder weight transposed and W_dec our unit-norm dictionary elements
    transposed: the stored decoder weight need not have unit columns, the SAE normalizes them
    inside forward (docs/design.md §3), so exporting it raw would change the outputs.

    Returns:
        `W_enc` (d_in, n_dict), `b_enc` (n_dict), `W_dec` (n_dict, d_in), `b_dec` (d_in); float32,
        contiguous, on the CPU.
    """
    with torch.no_grad():
        tensors = {
            "W_enc": sae.encoder[0].weight.T,
            "b_enc": sae.encoder[0].bias,
            "W_dec": sae.dict_elements.T,
            "b_dec": sae.decoder.bias,
        }
        return {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}


def saelens_config(cfg: TrainConfig, hook_name: str, d_in: int, n_dict: int) -> dict[str, Any]:
    """The `cfg.json` of one SAE: SAELens 6's `StandardSAEConfig.to_dict()` fields.

    `apply_b_dec_to_input` is false (our encoder reads the activation as it is) and
    `normalize_activations` is `none` (we train on raw activations). `prepend_bos` is false: our
    sequences are cut from one token stream with EOS between documents, no BOS in front. An SAE
    trained with `skip_first_position` gets `seqpos_slice` [1, null], SAELens's way to say which
    positions it saw.
    """
    return {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": n_dict,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,  # trained by sparsify, not by SAELens
            "exported_by": "sparsify-e2e",
            "model_name": cfg.model_name,
            "hook_name": hook_name,
            "hook_head_index": None,
            "prepend_bos": False,
            "context_size": cfg.train_data.n_ctx,
            "seqpos_slice": [1, None] if cfg.saes.skip_first_position else [None],
            "dataset_path": cfg.train_data.dataset_name,
        },
    }


def export_saelens(run_dir: str | Path, out_dir: str | Path, hook_name: str | None = None) -> list[Path]:
    """Write the SAEs of one of our run folders in SAELens's on-disk format.

    Args:
        run_dir: a run folder of `sparsify.train` (`config.yaml` + `sae.safetensors`).
        out_dir: where to write; gets one subfolder per SAE position, named by its hook name,
            holding `cfg.json` and `sae_weights.safetensors` (files written atomically; an
            earlier export of the same position is overwritten).
        hook_name: export only the SAE at this position (default: every SAE of the run).

    Returns:
        The SAE folders written, in the order of `saes.sae_positions`.

    Raises:
        ConfigError: a missing run folder, `sae.safetensors` or `config.yaml`, a config that no
            longer validates, or weights that lack an SAE of the config.
        HookNameError: `hook_name` is not one of the run's SAE positions.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    weights = run_dir / checkpoint.SAE_WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"{run_dir}: no {checkpoint.SAE_WEIGHTS}; give a run folder of sparsify.train")
    cfg = checkpoint.load_run_config(run_dir)
    positions = cfg.saes.sae_positions
    if hook_name is not None:
        if hook_name not in positions:
            raise HookNameError(
                f"hook_name: {run_dir} has no SAE at {hook_name!r}; its SAEs: {', '.join(positions)}"
            )
        positions = [hook_name]
    state = checkpoint.load_sae_state(weights)
    written = []
    for name in positions:
        sae = _sae_from_state(state, name, weights)
        folder = out_dir / _folder_name(name)
        tensors = saelens_state(sae)
        atomic_write_with(folder / SAELENS_WEIGHTS, lambda tmp, t=tensors: save_file(t, tmp))
        # cfg.json last: a folder with a cfg.json has its weights too
        sae_cfg = saelens_config(cfg, name, sae.d_in, sae.n_dict)
        atomic_write_text(folder / SAELENS_CFG, json.dumps(sae_cfg, indent=2) + "\n")
        written.append(folder)
    return written


def _sae_from_state(state: dict[str, Tensor], hook_name: str, source: Path) -> SAE:
    key = hook_to_key(hook_name)
    missing = [f"{key}.{t}" for t in SAE_TENSORS if f"{key}.{t}" not in state]
    if missing:
        raise ConfigError(f"{source}: no SAE weights for {hook_name} (missing {', '.join(missing)})")
    n_dict, d_in = state[f"{key}.encoder.0.weight"].shape
    sae = SAE(d_in, n_dict)
    sae.load_state_dict({t: state[f"{key}.{t}"].float() for t in SAE_TENSORS})
    return sae


def _folder_name(hook_name: str) -> str:
    # hook names become folder names; one that could leave out_dir is not a hook name
    if hook_name in ("", ".", "..") or Path(hook_name).name != hook_name:
        raise ConfigError(f"saes.sae_positions: {hook_name!r} cannot name an export folder")
    return hook_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsify.export", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("run_dir", help="run folder of sparsify.train (config.yaml + sae.safetensors)")
    parser.add_argument("out_dir", help="output folder: one SAELens folder per SAE position")
    parser.add_argument("--hook-name", help="export only the SAE at this hook (default: all)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        folders = export_saelens(args.run_dir, args.out_dir, args.hook_name)
    except SparsifyError as exc:
        if args.debug:
            raise
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    for folder in folders:
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
