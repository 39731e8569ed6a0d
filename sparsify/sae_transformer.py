"""SAETransformer: a frozen TransformerLens model with SAEs spliced in at hook points.

`forward_raw` runs the original model; `forward` (or calling the module) replaces the activation
at each SAE position by that SAE's output, so gradients of downstream losses reach the SAEs
through the frozen layers (docs/design.md §3). Hooks only splice or capture: losses are computed by
the caller from the returned tensors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from sparsify.architectures import SAEFactory, SparseAutoencoder, sae_factory
from sparsify.errors import ConfigError
from sparsify.hooks import block_index, check_hook_names, hook_to_key

logger = logging.getLogger(__name__)


@dataclass
class SAEActivations:
    """One SAE's tensors from a forward pass: input (batch, pos, d_in), codes (batch, pos,
    n_dict) and output (batch, pos, d_in)."""

    sae_in: Float[Tensor, "batch pos d_in"]
    codes: Float[Tensor, "batch pos n_dict"]
    sae_out: Float[Tensor, "batch pos d_in"]
    penalties: dict[str, Float[Tensor, ""]] = field(default_factory=dict)
    """Sparsity terms the architecture computes itself, by loss-term name (JumpReLU's
    `l0_penalty`); empty for the others."""


@dataclass
class ForwardOutput:
    """Result of `forward_raw` / `forward`.

    logits: (batch, pos, vocab), or None when the run stopped early.
    acts: captured activations keyed by exact hook name, (batch, pos, d).
    sae_acts: per SAE position (empty for `forward_raw`).
    """

    logits: Float[Tensor, "batch pos vocab"] | None
    acts: dict[str, Tensor] = field(default_factory=dict)
    sae_acts: dict[str, SAEActivations] = field(default_factory=dict)


class SAETransformer(nn.Module):
    """A frozen TransformerBridge plus one SAE per hook position; only SAE parameters train.

    Args:
        tlens_model: a TransformerLens 4 `TransformerBridge` (frozen here).
        sae_positions: exact hook names, e.g. `["blocks.6.hook_resid_pre"]`.
        dict_size_to_input_ratio: dictionary size = round(ratio * d_in) for each SAE.
        skip_first_position: leave position 0 as it is (SAE tensors then cover pos >= 1).
        autocast_dtype: run the frozen model's matrix products under `torch.autocast` in this
            dtype (bf16 on GPU); SAEs, their optimizer state and every loss stay float32.
        make_sae: (d_in, n_dict) -> SAE, from `sparsify.architectures.sae_factory(cfg.saes)`;
            default the ReLU SAE.

    Raises:
        HookNameError: a position the model does not have (closest names listed).
    """

    def __init__(
        self,
        tlens_model: Any,
        sae_positions: Sequence[str],
        dict_size_to_input_ratio: float,
        skip_first_position: bool = False,
        autocast_dtype: torch.dtype | None = None,
        make_sae: SAEFactory | None = None,
    ):
        super().__init__()
        self.autocast_dtype = autocast_dtype
        check_hook_names(sae_positions, tlens_model.hook_dict, "saes.sae_positions")
        self.tlens_model = tlens_model
        self.tlens_model.eval()
        self.tlens_model.requires_grad_(False)
        self.sae_positions = list(sae_positions)
        self.first_position = 1 if skip_first_position else 0
        widths = self._activation_widths(self.sae_positions)
        for name, width in widths.items():
            if round(dict_size_to_input_ratio * width) < 1:
                raise ConfigError(
                    f"saes.dict_size_to_input_ratio: {dict_size_to_input_ratio:g} x {width} (the width "
                    f"of {name}) rounds to a dictionary of 0 elements"
                )
        device = self.model_device
        make_sae = make_sae or sae_factory()
        self.saes = nn.ModuleDict(
            {
                hook_to_key(name): make_sae(widths[name], round(dict_size_to_input_ratio * widths[name]))
                for name in self.sae_positions
            }
        ).to(device)
        self.pretrained: set[str] = set()
        """SAE positions whose weights came from `load_saes` (data-mean bias init skips them)."""
        self.resume_hook = self._resume_hook()

    def _resume_hook(self) -> str | None:
        """`blocks.K.hook_resid_pre` of the first SAE's block K, when a forward resumed there
        from the original model's residual gives the same logits as a full one (checked on a
        probe, so an architecture whose blocks break the shortcut just runs in full)."""
        layers = [block_index(name) for name in self.sae_positions]
        if not layers or any(layer is None for layer in layers) or min(layers) == 0:  # type: ignore[type-var]
            return None
        hook = f"blocks.{min(layers)}.hook_resid_pre"  # type: ignore[type-var]
        if hook not in self.tlens_model.hook_dict:
            return None
        probe = torch.arange(1, 9, device=self.model_device).unsqueeze(0)
        full = self.forward_raw(probe, capture=[hook])
        try:
            resumed = self.forward_raw(probe, resume_from=(hook, full.acts[hook]))
        except Exception as exc:  # an architecture the shortcut does not know: run in full
            logger.info("resuming at %s is not supported (%s); every forward runs all blocks", hook, exc)
            return None
        assert full.logits is not None and resumed.logits is not None
        if not torch.allclose(full.logits.float(), resumed.logits.float(), rtol=1e-3, atol=1e-3):
            logger.info("resuming at %s changes the logits; every forward runs all blocks", hook)
            return None
        return hook

    @property
    def model_device(self) -> torch.device:
        return next(self.tlens_model.parameters()).device

    @property
    def n_layers(self) -> int:
        return int(self.tlens_model.cfg.n_layers)

    @property
    def n_ctx(self) -> int:
        return int(self.tlens_model.cfg.n_ctx)

    @property
    def hook_names(self) -> list[str]:
        return list(self.tlens_model.hook_dict)

    def sae(self, hook_name: str) -> SparseAutoencoder:
        """The SAE at an exact hook name."""
        return self.saes[hook_to_key(hook_name)]  # type: ignore[return-value]

    @torch.no_grad()
    def init_decoder_bias_from_data(self, tokens: Int[Tensor, "batch pos"]) -> None:
        """Set each SAE's decoder bias to the mean of its input over `tokens` (the original
        model's activations; skipped positions left out)."""
        stop = self.stop_layer_for(self.sae_positions)
        raw = self.forward_raw(tokens, capture=self.sae_positions, stop_at_layer=stop)
        self.init_decoder_bias_from_acts(raw.acts)

    @torch.no_grad()
    def init_decoder_bias_from_acts(self, acts: dict[str, Tensor]) -> None:
        """As `init_decoder_bias_from_data`, from activations (batch, pos, d_in) per SAE position."""
        for name in self.sae_positions:
            if name in self.pretrained:
                continue
            sae_in = acts[name][:, self.first_position :].float()
            self.sae(name).decoder.bias.copy_(sae_in.mean(dim=(0, 1)))

    def load_saes(self, state: dict[str, Tensor], source: str, freeze: bool = False) -> list[str]:
        """Copy trained SAE weights into the SAEs at the positions `state` names.

        Args:
            state: `<hook-key>.encoder.0.weight` (n_dict, d_in), `.encoder.0.bias` (n_dict),
                `.decoder.weight` (d_in, n_dict), `.decoder.bias` (d_in) per position, as from
                `sparsify.training.checkpoint.load_sae_state`.
            source: the file it came from, for error messages.
            freeze: stop gradients to the loaded SAEs (the reference's `retrain_saes: false`)
                and put them in eval mode, so that they stay the function they were (BatchTopK:
                the threshold rule, and no further threshold estimates).

        Returns:
            The hook names loaded.

        Raises:
            ConfigError: SAEs at positions this model has none at, missing tensors, or a
                dictionary size that differs from `dict_size_to_input_ratio`.
        """
        by_key = {hook_to_key(name): name for name in self.sae_positions}
        stored = sorted({k.split(".", 1)[0] for k in state})
        unknown = [k for k in stored if k not in by_key]
        if unknown:
            raise ConfigError(
                f"saes.pretrained_sae_paths: {source} has SAEs at {', '.join(unknown)}, not among "
                f"saes.sae_positions ({', '.join(self.sae_positions)})"
            )
        loaded = []
        for key in stored:
            sae = self.saes[key]
            own = sae.state_dict()
            given = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == key}
            if set(given) != set(own):
                missing = sorted(set(own) - set(given))
                raise ConfigError(f"saes.pretrained_sae_paths: {source}: {key} lacks {', '.join(missing)}")
            n_dict, d_in = given["encoder.0.weight"].shape
            if (n_dict, d_in) != (sae.n_dict, sae.d_in) or any(
                value.shape != own[name].shape for name, value in given.items()
            ):
                raise ConfigError(
                    f"saes.pretrained_sae_paths: {source}: {key} has a dictionary of {n_dict} x "
                    f"d_in {d_in}, this config's SAE {sae.n_dict} x d_in {sae.d_in} "
                    "(check saes.dict_size_to_input_ratio)"
                )
            sae.load_state_dict({k: v.to(own[k].dtype) for k, v in given.items()})
            sae.requires_grad_(not freeze)
            if freeze:  # a fixed function: BatchTopK's threshold rule, its threshold left as loaded
                sae.eval()
            self.pretrained.add(by_key[key])
            loaded.append(by_key[key])
        return loaded

    @classmethod
    def from_local_path(cls, path: str | Path, device: str = "auto") -> SAETransformer:
        """Load a trained run: the language model its config names, plus its SAEs.

        Args:
            path: one of our run folders (`config.yaml` + `sae.safetensors`), or a reference
                run folder (`final_config.yaml` + `*.pt` checkpoints; the one with the most
                samples is loaded, docs/design.md §12).
            device: `auto`, `cpu` or `cuda`.

        Returns:
            The model, its SAEs in eval mode (`SparseAutoencoder.eval()`).

        Raises:
            ConfigError: a folder that holds neither layout, or an unloadable model or SAE file.
        """
        from sparsify import compat
        from sparsify.model_loading import load_tlens_model, resolve_device
        from sparsify.training import checkpoint

        path = Path(path)
        if (path / checkpoint.CONFIG_FILE).is_file():
            cfg = checkpoint.load_run_config(path)
            tlens_model = load_tlens_model(cfg.model_name, resolve_device(device), cfg.model_dtype)
            weights = path / checkpoint.SAE_WEIGHTS
        elif (path / compat.REFERENCE_CONFIG_FILE).is_file():
            cfg, tlens_model = compat.load_reference_config(path / compat.REFERENCE_CONFIG_FILE, device)
            weights = compat.latest_checkpoint(path)
        else:
            raise ConfigError(
                f"{path}: not a run folder (expected {checkpoint.CONFIG_FILE} + "
                f"{checkpoint.SAE_WEIGHTS}, or the reference's {compat.REFERENCE_CONFIG_FILE} + *.pt)"
            )
        model = cls(
            tlens_model,
            cfg.saes.sae_positions,
            cfg.saes.dict_size_to_input_ratio,
            cfg.saes.skip_first_position,
            make_sae=sae_factory(cfg.saes),
        )
        model.load_saes(checkpoint.load_sae_state(weights), str(weights))
        # for inference: BatchTopK's threshold rule, not its batch rule (which also moves the
        # learned threshold on every forward); `model.saes.train()` to train on
        model.saes.eval()
        return model

    def apply_saes(self, acts: dict[str, Tensor]) -> ForwardOutput:
        """Every SAE on stored activations (batch, pos, d_in) of its position, e.g. from an
        activation cache: what `forward` gives the local loss terms, without running the model."""
        sae_acts = {
            name: self._run_sae(name, acts[name].to(self.model_device)) for name in self.sae_positions
        }
        return ForwardOutput(logits=None, sae_acts=sae_acts)

    def _run_sae(self, hook_name: str, activation: Tensor) -> SAEActivations:
        """The SAE at `hook_name` on an activation (batch, pos, d_in), positions before
        `first_position` left out; SAEs run in float32 even when the frozen model runs in bf16."""
        sae_in = activation[:, self.first_position :].float()
        with torch.autocast(activation.device.type, enabled=False):
            codes, sae_out, penalties = self.sae(hook_name).forward_with_penalties(sae_in)
        return SAEActivations(sae_in=sae_in, codes=codes, sae_out=sae_out, penalties=penalties)

    def _activation_widths(self, names: Sequence[str]) -> dict[str, int]:
        probe = torch.zeros((1, 2), dtype=torch.long, device=self.model_device)
        out = self.forward_raw(probe, capture=names, stop_at_layer=self.stop_layer_for(names))
        return {name: int(out.acts[name].shape[-1]) for name in names}

    def stop_layer_for(self, hook_names: Sequence[str]) -> int | None:
        """Smallest `stop_at_layer` that still fires every hook in `hook_names`.

        TransformerLens stops before block N runs, so hooks inside block N need N + 1. Hooks
        outside the blocks (ln_final, unembed) need the full run: None.
        """
        layers = [block_index(name) for name in hook_names]
        if not layers or any(layer is None for layer in layers):
            return None
        stop = max(layers) + 1  # type: ignore[type-var]
        return None if stop >= self.n_layers else stop

    def _run(
        self,
        tokens: Int[Tensor, "batch pos"],
        fwd_hooks: list[tuple[str, Any]],
        stop_at_layer: int | None,
        resume_from: tuple[str, Tensor] | None = None,
    ) -> Tensor | None:
        kwargs: dict[str, Any] = {}
        model_input: Tensor = tokens
        skipped: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if resume_from is not None:
            hook, residual = resume_from
            start = block_index(hook)
            assert start is not None and hook.endswith("hook_resid_pre"), hook
            model_input, kwargs["start_at_layer"] = residual, start
            skipped = _blocks_skipped(self.tlens_model.blocks[:start])
        device_type = self.model_device.type
        autocast = torch.autocast(device_type, self.autocast_dtype, enabled=self.autocast_dtype is not None)
        with skipped, autocast:
            out = self.tlens_model.run_with_hooks(
                model_input, fwd_hooks=fwd_hooks, stop_at_layer=stop_at_layer, **kwargs
            )
        return None if stop_at_layer is not None else out

    def forward_raw(
        self,
        tokens: Int[Tensor, "batch pos"],
        capture: Sequence[str] = (),
        stop_at_layer: int | None = None,
        resume_from: tuple[str, Tensor] | None = None,
    ) -> ForwardOutput:
        """Run the original model (no SAEs, no gradients).

        Args:
            tokens: token ids (batch, pos).
            capture: exact hook names whose activations to return.
            stop_at_layer: stop before this block (logits are then None); see `stop_layer_for`.
            resume_from: (`blocks.K.hook_resid_pre`, residual (batch, pos, d_model)): skip
                blocks < K and start from this residual, e.g. one captured by an earlier run.
        """
        acts: dict[str, Tensor] = {}
        hooks = [(name, _capture_into(acts, name)) for name in capture]
        with torch.no_grad():
            logits = self._run(tokens, hooks, stop_at_layer, resume_from)
        return ForwardOutput(logits=logits, acts=acts)

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        capture: Sequence[str] = (),
        stop_at_layer: int | None = None,
        resume_from: tuple[str, Tensor] | None = None,
    ) -> ForwardOutput:
        """Run the model with every SAE's output replacing the activation at its position.

        Args:
            tokens: token ids (batch, pos).
            capture: further hook names to return (with gradients), e.g. in_to_orig hooks.
            stop_at_layer: stop before this block (logits are then None).
            resume_from: as in `forward_raw`: the original model's residual at
                `self.resume_hook`, so the blocks before the first SAE are not run twice.
        """
        sae_acts: dict[str, SAEActivations] = {}
        acts: dict[str, Tensor] = {}
        hooks = [(name, self._splice_into(sae_acts, name)) for name in self.sae_positions]
        hooks += [(name, _capture_into(acts, name)) for name in capture]
        logits = self._run(tokens, hooks, stop_at_layer, resume_from)
        return ForwardOutput(logits=logits, acts=acts, sae_acts=sae_acts)

    def _splice_into(self, store: dict[str, SAEActivations], hook_name: str) -> Any:
        def splice(activation: Tensor, hook: Any) -> Tensor:
            acts = store[hook_name] = self._run_sae(hook_name, activation)
            sae_out = acts.sae_out.to(activation.dtype)
            if self.first_position:
                return torch.cat([activation[:, : self.first_position], sae_out], dim=1)
            return sae_out

        return splice


def _capture_into(store: dict[str, Tensor], hook_name: str) -> Any:
    # keyed by the requested name: the bridge reports aliases (hook_resid_pre) by canonical name
    def capture(activation: Tensor, hook: Any) -> None:
        store[hook_name] = activation

    return capture


@contextlib.contextmanager
def _blocks_skipped(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Make `blocks` return their input unchanged (the bridge's `start_at_layer` alone still
    runs them and then discards their output)."""

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        return args[0] if args else kwargs["hidden_states"]

    # object.__setattr__: bridge components forward plain attribute writes to the HF module
    for block in blocks:
        object.__setattr__(block, "forward", passthrough)
    try:
        yield
    finally:
        for block in blocks:
            object.__delattr__(block, "forward")
