"""`python -m sparsify.export RUN_DIR OUT_DIR`: our trained SAEs in SAELens's on-disk format.

One folder per SAE position, named by its hook (`OUT_DIR/blocks.6.hook_resid_pre/`), holding
`cfg.json` and `sae_weights.safetensors` as SAELens 6.54.12 writes them;
`sae_lens.SAE.load_from_disk(folder)` loads it and its encode, decode and forward equal ours
(docs/design.md §3, §12). Each architecture becomes the SAELens one that computes the same
function (source: `sae_lens/saes/{standard,topk,jumprelu}_sae.py`):

| ours | SAELens | SAELens encode |
|---|---|---|
| relu | `standard` | c = ReLU(x @ W_enc + b_enc) |
| topk | `topk`, `k`, `rescale_acts_by_decoder_norm: false` | c = ReLU(TopK_k(x @ W_enc + b_enc)) |
| jumprelu | `jumprelu`, `threshold` = exp(log_threshold) | c = ReLU(pre) * 1[pre > threshold] |
| batchtopk | `jumprelu`, `threshold` = max(theta, 0) repeated per latent | the same |

and decode x^ = c @ W_dec + b_dec everywhere. BatchTopK is written in its eval rule,
c = ReLU(pre) * 1[pre > theta]: SAELens has no inference BatchTopK class (its own BatchTopK
training SAE saves as `jumprelu` with the threshold repeated, `BatchTopKTrainingSAE.
process_state_dict_for_saving_inference`), and for theta >= 0 ReLU(pre) * 1[pre > theta] =
pre * 1[pre > theta] while for theta < 0 it is ReLU(pre), which threshold 0 gives. The batch
rule used in training is not exported. User mistakes print `error: ...` and exit 2.
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

from sparsify.architectures import (
    BatchTopKSAE,
    JumpReLUSAE,
    SAEFactory,
    SparseAutoencoder,
    TopKSAE,
    sae_factory,
)
from sparsify.atomic import atomic_write_text, atomic_write_with
from sparsify.config import TrainConfig
from sparsify.errors import ConfigError, HookNameError, SparsifyError
from sparsify.hooks import hook_to_key
from sparsify.redaction import redact
from sparsify.saelens_import import SAELENS_CFG, SAELENS_WEIGHTS
from sparsify.training import checkpoint

SAELENS_FORMAT_VERSION = "6.54.12"
"""The SAELens release whose layout we write. SAELens reads `metadata.sae_lens_version` to pick
its reader: below 6.0 it would treat cfg.json as the old flat layout."""


def saelens_architecture(sae: SparseAutoencoder) -> str:
    """The SAELens architecture our SAE is written as (the module docstring's table)."""
    if isinstance(sae, (JumpReLUSAE, BatchTopKSAE)):
        return "jumprelu"
    return "topk" if isinstance(sae, TopKSAE) else "standard"


def saelens_state(sae: SparseAutoencoder) -> dict[str, Tensor]:
    """Our SAE's weights under SAELens's names (no input centering: `apply_b_dec_to_input` false).

    W_enc is our encoder weight transposed and W_dec our unit-norm dictionary elements
    transposed: the stored decoder weight need not have unit columns, the SAE normalizes them
    inside forward (docs/design.md §3), so exporting it raw would change the outputs.

    Returns:
        `W_enc` (d_in, n_dict), `b_enc` (n_dict), `W_dec` (n_dict, d_in), `b_dec` (d_in), and
        for SAELens `jumprelu` `threshold` (n_dict): JumpReLU's exp(log_threshold), BatchTopK's
        max(theta, 0) in every entry; float32, contiguous, on the CPU.
    """
    with torch.no_grad():
        tensors = {
            "W_enc": sae.encoder[0].weight.T,
            "b_enc": sae.encoder[0].bias,
            "W_dec": sae.dict_elements.T,
            "b_dec": sae.decoder.bias,
        }
        if isinstance(sae, JumpReLUSAE):
            tensors["threshold"] = sae.threshold
        elif isinstance(sae, BatchTopKSAE):
            theta = sae.get_buffer("threshold").clamp(min=0)
            tensors["threshold"] = theta.expand(sae.n_dict)
        return {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}


def saelens_config(cfg: TrainConfig, hook_name: str, sae: SparseAutoencoder) -> dict[str, Any]:
    """The `cfg.json` of one SAE: the fields of SAELens 6's `<Architecture>SAEConfig.to_dict()`
    (`TopKSAEConfig` adds `k` and `rescale_acts_by_decoder_norm`).

    `apply_b_dec_to_input` is false (our encoder reads the activation as it is) and
    `normalize_activations` is `none` (we train on raw activations). `prepend_bos` is false: our
    sequences are cut from one token stream with EOS between documents, no BOS in front. An SAE
    trained with `skip_first_position` gets `seqpos_slice` [1, null], SAELens's way to say which
    positions it saw. `metadata.sparsify_architecture` records ours (SAELens ignores it).
    """
    fields: dict[str, Any] = {
        "architecture": saelens_architecture(sae),
        "d_in": sae.d_in,
        "d_sae": sae.n_dict,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if isinstance(sae, TopKSAE):
        fields |= {"k": sae.k, "rescale_acts_by_decoder_norm": False}  # W_dec is unit-norm already
    return {
        **fields,
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,  # trained by sparsify, not by SAELens
            "exported_by": "sparsify-e2e",
            "sparsify_architecture": sae.architecture,
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
    make_sae = sae_factory(cfg.saes)
    written = []
    for name in positions:
        sae = _sae_from_state(state, name, weights, make_sae)
        folder = out_dir / _folder_name(name)
        tensors = saelens_state(sae)
        atomic_write_with(folder / SAELENS_WEIGHTS, lambda tmp, t=tensors: save_file(t, tmp))
        # cfg.json last: a folder with a cfg.json has its weights too
        sae_cfg = saelens_config(cfg, name, sae)
        atomic_write_text(folder / SAELENS_CFG, json.dumps(sae_cfg, indent=2) + "\n")
        written.append(folder)
    return written


def _sae_from_state(
    state: dict[str, Tensor], hook_name: str, source: Path, make_sae: SAEFactory
) -> SparseAutoencoder:
    """The run's SAE at one position, in eval mode (BatchTopK's threshold rule)."""
    key = hook_to_key(hook_name)
    weight = state.get(f"{key}.encoder.0.weight")
    if weight is None:
        raise ConfigError(f"{source}: no SAE weights for {hook_name} (missing {key}.encoder.0.weight)")
    n_dict, d_in = weight.shape
    sae = make_sae(d_in, n_dict)
    missing = [f"{key}.{t}" for t in sae.state_dict() if f"{key}.{t}" not in state]
    if missing:
        raise ConfigError(f"{source}: no SAE weights for {hook_name} (missing {', '.join(missing)})")
    sae.load_state_dict({t: state[f"{key}.{t}"].float() for t in sae.state_dict()})
    return sae.eval()


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
