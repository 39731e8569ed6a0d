"""The model a training run trains, and where the run writes: `build_model` (the frozen language
model with fresh or pretrained SAEs) and `run_dir_for` (the run folder of a `TrainConfig`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from sparsify.architectures import SparseAutoencoder, sae_factory
from sparsify.config import TrainConfig
from sparsify.errors import ConfigError
from sparsify.model_loading import autocast_dtype, load_tlens_model, resolve_device
from sparsify.sae_transformer import SAETransformer
from sparsify.training import checkpoint

logger = logging.getLogger(__name__)


def run_dir_for(cfg: TrainConfig) -> Path | None:
    """The run folder of an SAE training run: save_dir / (run_name or e.g.
    `blocks-6-hook_resid_pre_ratio4_sparsity1.5_logits_kl1_seed0`); None when save_dir is null."""
    saes = cfg.saes
    return checkpoint.run_dir_for(
        cfg.save_dir,
        cfg.run_name,
        lambda: checkpoint.sae_run_name(
            saes.sae_positions, saes.dict_size_to_input_ratio, cfg.loss, cfg.seed, saes.architecture, saes.k
        ),
    )


def build_model(cfg: TrainConfig, tlens_model: Any | None = None) -> SAETransformer:
    """Load the frozen language model (unless given) and add SAEs: freshly initialized (seeded
    by `cfg.seed`), or loaded from `saes.pretrained_sae_paths` (frozen unless `retrain_saes`).

    Raises:
        ConfigError: an unloadable model or SAE file, data n_ctx above the model's context, or
            nothing left to train.
        HookNameError: an SAE position the model does not have.
    """
    if tlens_model is None:
        tlens_model = load_tlens_model(cfg.model_name, resolve_device(cfg.device), cfg.model_dtype)
    assert tlens_model is not None
    torch.manual_seed(cfg.seed)
    device = next(tlens_model.parameters()).device
    autocast = autocast_dtype(cfg.autocast, device)
    if device.type == "cuda":
        # with autocast on, the SAE's float32 matmuls may use TF32 tensor cores too (weights,
        # gradients and Adam state stay float32); off, every matmul is exact float32
        torch.backends.cuda.matmul.allow_tf32 = autocast is not None
    model = SAETransformer(
        tlens_model,
        cfg.saes.sae_positions,
        cfg.saes.dict_size_to_input_ratio,
        cfg.saes.skip_first_position,
        autocast,
        make_sae=sae_factory(cfg.saes),
    )
    _load_pretrained(model, cfg)
    if cfg.saes.architecture == "jumprelu" and cfg.loss.l0_penalty is None:
        logger.warning("a jumprelu SAE without loss.l0_penalty: nothing makes it sparse")
    if cfg.compile:
        for name in model.sae_positions:
            sae = model.sae(name)
            sae.compile()  # in place: the state dict keeps its names
            if type(sae).forward_with_penalties is not SparseAutoencoder.forward_with_penalties:
                # JumpReLU trains through its own method, which does not call the compiled forward
                sae.forward_with_penalties = torch.compile(sae.forward_with_penalties)  # type: ignore[method-assign]
    for field_name in ("train_data", "eval_data"):
        data = getattr(cfg, field_name)
        if data is not None and data.n_ctx > model.n_ctx:
            raise ConfigError(
                f"{field_name}.n_ctx: {data.n_ctx} exceeds the model's context of {model.n_ctx} tokens"
            )
    return model


def _load_pretrained(model: SAETransformer, cfg: TrainConfig) -> None:
    for path in cfg.saes.pretrained_sae_paths or []:
        try:
            state = checkpoint.load_sae_state(path, cfg.saes)
        except ConfigError as exc:
            raise ConfigError(f"saes.pretrained_sae_paths: {exc}") from None
        model.load_saes(state, path, freeze=not cfg.saes.retrain_saes)
    if not any(p.requires_grad for p in model.saes.parameters()):
        raise ConfigError(
            "saes.retrain_saes: every SAE is pretrained and frozen, so nothing would train; "
            "set retrain_saes: true or add an SAE position"
        )
