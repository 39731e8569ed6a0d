"""SAELens-format SAE folders (`cfg.json` + `sae_weights.safetensors`) as our state dicts, so a
public SAE can start a run through `saes.pretrained_sae_paths` (docs/design.md §12).

SAELens 6.54.12 (`sae_lens/saes/{standard,topk,jumprelu}_sae.py`, `sae.py`) computes, for an
input x (..., d_in), with `W_enc` (d_in, d_sae), `b_enc` (d_sae), `W_dec` (d_sae, d_in), `b_dec`
(d_in) and n_i = ||W_dec[i]||:

    pre  = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
    standard:  c = ReLU(pre)
    topk:      c = ReLU(TopK_k(pre))             rescale_acts_by_decoder_norm: TopK_k(pre * n)
    jumprelu:  c = ReLU(pre) * 1[pre > threshold]     (threshold (d_sae), one per latent)
    x^   = c @ W_dec + b_dec                      rescale_acts_by_decoder_norm: (c / n) @ W_dec + b_dec

Ours (`sparsify.architectures.base`): pre = W_e x + b_e, x^ = D c + b_d, D = W_d with unit
columns. The conversion is exact (outputs equal up to float rounding):

- Centering folds into the encoder bias: W_enc^T (x - b_dec) + b_enc = W_enc^T x + (b_enc - W_enc^T b_dec).
- Decoder norms move into the codes: our c_i = n_i c'_i with the unit column W_dec[i] / n_i, so
  row i of W_e and b_e is multiplied by n_i. ReLU and the JumpReLU step commute with a positive
  scale (the jumprelu threshold is multiplied by n_i too); a TopK selection does not, so a topk
  SAE is accepted only with `rescale_acts_by_decoder_norm: true` (its selection already sees
  pre * n) or decoder rows of one common norm. A zero row keeps scale 1 (it adds nothing).
- SAELens's jumprelu with threshold t equals c = pre * 1[pre > max(t, 0)], our JumpReLU with
  log_threshold = log(n t) where every n t is positive; and with one threshold shared by every
  latent (how SAELens saves a trained BatchTopK SAE), our BatchTopK's eval rule
  c = ReLU(pre) * 1[pre > theta].

What cannot be honoured is refused in one line: input normalization, hook_z reshaping, a head
index, an architecture other than standard / topk / jumprelu, or one that differs from the
config's `saes.architecture`, and a topk `k` other than the config's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from sparsify.config import SAEsConfig
from sparsify.errors import ConfigError
from sparsify.hooks import hook_to_key

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
OUR_ARCHITECTURES = {"standard": ("relu",), "topk": ("topk",), "jumprelu": ("jumprelu", "batchtopk")}
"""SAELens architecture -> ours it can become (a shared-threshold jumprelu is a BatchTopK SAE)."""
NORM_RTOL = 1e-3
"""Relative spread within which decoder row norms (topk) or scaled thresholds (batchtopk) count
as one value (a decoder normalized in float32 or float16 stays well inside)."""
BATCHTOPK_THRESHOLD_UPDATES = 100
"""`threshold_updates` of an imported BatchTopK SAE: its threshold is already a trained estimate,
so further training moves it by the steady EMA weight (1/100), not the 1/(n+1) of a fresh one."""


def is_saelens_folder(path: str | Path) -> bool:
    """A folder holding SAELens's `cfg.json` and `sae_weights.safetensors`."""
    path = Path(path)
    return (path / SAELENS_CFG).is_file() and (path / SAELENS_WEIGHTS).is_file()


@dataclass(frozen=True)
class SAELensConfig:
    """The fields of a SAELens `cfg.json` the import uses (SAELens 6 layout; pre-6 flat configs
    are read the way SAELens's `handle_pre_6_0_config` reads them)."""

    architecture: str
    d_in: int
    d_sae: int
    hook_name: str
    apply_b_dec_to_input: bool
    k: int | None
    rescale_acts_by_decoder_norm: bool


def read_saelens_config(folder: Path) -> SAELensConfig:
    """Parse `folder/cfg.json`, refusing what our SAEs cannot reproduce.

    Raises:
        ConfigError: unreadable JSON, a missing field, or a setting we cannot honour.
    """
    path = folder / SAELENS_CFG
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read SAELens config: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a SAELens config (a JSON object)")
    meta: dict[str, Any] = raw["metadata"] if isinstance(raw.get("metadata"), dict) else {}
    major = str(raw.get("sae_lens_version") or meta.get("sae_lens_version") or "0").split(".")[0]
    legacy = not major.isdigit() or int(major) < 6
    if legacy:  # before 6.0: flat, older names, centering on by default
        meta = {
            **raw,
            "hook_name": raw.get("hook_name", raw.get("hook_point")),
            "hook_head_index": raw.get("hook_head_index", raw.get("hook_point_head_index")),
        }
        raw = {"apply_b_dec_to_input": True, **raw}
        activation = raw.get("activation_fn", raw.get("activation_fn_str", "relu"))
        kwargs = raw.get("activation_fn_kwargs") or {}
        if activation == "topk" and "k" in kwargs:
            raw = {**raw, "architecture": "topk", "k": kwargs["k"]}
        elif activation != "relu":
            raise ConfigError(f"{path}: activation_fn {activation!r} is not one we can import (relu, topk)")
    architecture = raw.get("architecture", "standard")
    if architecture not in OUR_ARCHITECTURES:
        raise ConfigError(
            f"{path}: SAELens architecture {architecture!r} cannot be imported; "
            f"allowed: {', '.join(OUR_ARCHITECTURES)}"
        )
    normalize = raw.get("normalize_activations", "none")
    if normalize not in ("none", None, False):
        raise ConfigError(
            f"{path}: normalize_activations {normalize!r} is not supported (our SAEs read raw activations; "
            "only none)"
        )
    if raw.get("reshape_activations", "none") != "none":
        raise ConfigError(
            f"{path}: reshape_activations {raw['reshape_activations']!r} is not supported (only none)"
        )
    if meta.get("hook_head_index") is not None:
        raise ConfigError(
            f"{path}: hook_head_index {meta['hook_head_index']} is not supported (whole hooks only)"
        )
    hook_name = meta.get("hook_name")
    if not isinstance(hook_name, str) or not hook_name:
        raise ConfigError(f"{path}: no metadata.hook_name, so the SAE's position is unknown")
    try:
        d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{path}: needs integer d_in and d_sae") from None
    k = raw.get("k", 100) if architecture == "topk" else None  # 100: TopKSAEConfig's default
    return SAELensConfig(
        architecture=architecture,
        d_in=d_in,
        d_sae=d_sae,
        hook_name=hook_name,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),  # SAEConfig's default
        k=None if k is None else int(k),
        rescale_acts_by_decoder_norm=bool(raw.get("rescale_acts_by_decoder_norm", False)),
    )


def load_saelens_state(folder: str | Path, saes: SAEsConfig | None = None) -> dict[str, Tensor]:
    """One SAELens-format SAE folder as our state dict, keyed by its hook (`metadata.hook_name`).

    Args:
        folder: holds `cfg.json` and `sae_weights.safetensors` as SAELens writes them.
        saes: the config the SAE will join: its `architecture` (and `k`) must match the folder's;
            None converts to the architecture the folder names (standard -> relu).

    Returns:
        `<hook-key>.encoder.0.weight` (n_dict, d_in), `.encoder.0.bias` (n_dict),
        `.decoder.weight` (d_in, n_dict), `.decoder.bias` (d_in), float32; plus `.log_threshold`
        (n_dict) for jumprelu, or `.threshold` and `.threshold_updates` (scalars) for batchtopk.
        Formulas: the module docstring.

    Raises:
        ConfigError: anything the module docstring lists as refused, an architecture or k that
            differs from `saes`, or weights that do not fit the config.
    """
    folder = Path(folder)
    cfg = read_saelens_config(folder)
    ours = _target_architecture(cfg, folder, saes)
    tensors = _read_tensors(folder, cfg)
    W_enc, b_enc, W_dec, b_dec = (tensors[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if cfg.apply_b_dec_to_input:
        b_enc = b_enc - b_dec @ W_enc
    norms = W_dec.norm(dim=1)
    scale = torch.where(norms > 0, norms, torch.ones_like(norms))
    if cfg.architecture == "topk" and not cfg.rescale_acts_by_decoder_norm and not _one_value(norms):
        raise ConfigError(
            f"{folder}: a topk SAE whose decoder rows have different norms "
            f"({norms.min().item():.4g} .. {norms.max().item():.4g}) and rescale_acts_by_decoder_norm "
            "false picks its top k by unscaled pre-activations, which our unit-norm decoder cannot reproduce"
        )
    key = hook_to_key(cfg.hook_name)
    state = {
        "encoder.0.weight": W_enc.T * scale[:, None],
        "encoder.0.bias": b_enc * scale,
        "decoder.weight": W_dec.T,
        "decoder.bias": b_dec,
    }
    if cfg.architecture == "jumprelu":
        threshold = tensors["threshold"] * scale
        if ours == "batchtopk":
            if not _one_value(threshold):
                raise ConfigError(
                    f"{folder}: its jumprelu thresholds differ across latents "
                    f"({threshold.min().item():.4g} .. {threshold.max().item():.4g}, after absorbing the "
                    "decoder norms) but a batchtopk SAE has one; use saes.architecture: jumprelu"
                )
            state["threshold"] = threshold.mean()
            state["threshold_updates"] = torch.tensor(float(BATCHTOPK_THRESHOLD_UPDATES), dtype=torch.float64)
        else:
            if (threshold <= 0).any():
                raise ConfigError(
                    f"{folder}: {(threshold <= 0).sum().item()} jumprelu thresholds are <= 0; ours learns "
                    "log(threshold), so each must be positive"
                )
            state["log_threshold"] = threshold.log()
    return {f"{key}.{name}": value.float().contiguous() for name, value in state.items()}


def _target_architecture(cfg: SAELensConfig, folder: Path, saes: SAEsConfig | None) -> str:
    allowed = OUR_ARCHITECTURES[cfg.architecture]
    if saes is None:
        return allowed[0]
    if saes.architecture not in allowed:
        raise ConfigError(
            f"{folder} is a SAELens {cfg.architecture} SAE (imports as architecture "
            f"{' or '.join(allowed)}), but saes.architecture is {saes.architecture}"
        )
    if cfg.architecture == "topk" and cfg.k != saes.k:
        raise ConfigError(f"{folder} is a topk SAE with k {cfg.k}, but saes.k is {saes.k}")
    return saes.architecture


def _read_tensors(folder: Path, cfg: SAELensConfig) -> dict[str, Tensor]:
    path = folder / SAELENS_WEIGHTS
    try:
        raw = load_file(str(path))
    except (OSError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: cannot read SAE weights: {first}") from None
    # float64 while folding: the bias and norm products then round once, on the way to float32
    tensors = {name: value.double() for name, value in raw.items()}
    if "log_threshold" in tensors and "threshold" not in tensors:  # older SAELens jumprelu files
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not torch.equal(scaling, torch.ones_like(scaling)):
        raise ConfigError(f"{path}: a finetuning scaling_factor other than 1 is not supported")
    shapes: dict[str, tuple[int, ...]] = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (cfg.d_sae,)
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise ConfigError(
            f"{path}: a SAELens {cfg.architecture} SAE has {', '.join(shapes)}; "
            + "; ".join(
                p
                for p in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unexpected {', '.join(extra)}" if extra else "",
                )
                if p
            )
        )
    wrong = [
        f"{n} {tuple(tensors[n].shape)} (want {s})" for n, s in shapes.items() if tuple(tensors[n].shape) != s
    ]
    if wrong:
        raise ConfigError(
            f"{path}: shapes do not match cfg.json's d_in {cfg.d_in}, d_sae {cfg.d_sae}: {', '.join(wrong)}"
        )
    return tensors


def _one_value(values: Tensor) -> bool:
    """All entries equal to within `NORM_RTOL` of the largest magnitude."""
    spread = (values.max() - values.min()).abs().item()
    return spread <= NORM_RTOL * max(values.abs().max().item(), math.ulp(1.0))
