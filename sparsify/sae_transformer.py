"""SAETransformer: a frozen TransformerLens model with SAEs spliced in at hook points.

`forward_raw` runs the original model; `forward` (or calling the module) replaces the activation
at each SAE position by that SAE's output, so gradients of downstream losses reach the SAEs
through the frozen layers (DESIGN.md §3). Hooks only splice or capture: losses are computed by
the caller from the returned tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from sparsify.hooks import block_index, check_hook_names, hook_to_key
from sparsify.sae import SAE


@dataclass
class SAEActivations:
    """One SAE's tensors from a forward pass: input (batch, pos, d_in), codes (batch, pos,
    n_dict) and output (batch, pos, d_in)."""

    sae_in: Float[Tensor, "batch pos d_in"]
    codes: Float[Tensor, "batch pos n_dict"]
    sae_out: Float[Tensor, "batch pos d_in"]


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

    Raises:
        HookNameError: a position the model does not have (closest names listed).
    """

    def __init__(
        self,
        tlens_model: Any,
        sae_positions: Sequence[str],
        dict_size_to_input_ratio: float,
        skip_first_position: bool = False,
    ):
        super().__init__()
        check_hook_names(sae_positions, tlens_model.hook_dict, "saes.sae_positions")
        self.tlens_model = tlens_model
        self.tlens_model.eval()
        self.tlens_model.requires_grad_(False)
        self.sae_positions = list(sae_positions)
        self.first_position = 1 if skip_first_position else 0
        widths = self._activation_widths(self.sae_positions)
        device = self.model_device
        self.saes = nn.ModuleDict(
            {
                hook_to_key(name): SAE(widths[name], round(dict_size_to_input_ratio * widths[name]))
                for name in self.sae_positions
            }
        ).to(device)

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

    def sae(self, hook_name: str) -> SAE:
        """The SAE at an exact hook name."""
        return self.saes[hook_to_key(hook_name)]  # type: ignore[return-value]

    @torch.no_grad()
    def init_decoder_bias_from_data(self, tokens: Int[Tensor, "batch pos"]) -> None:
        """Set each SAE's decoder bias to the mean of its input over `tokens` (the original
        model's activations; skipped positions left out)."""
        stop = self.stop_layer_for(self.sae_positions)
        raw = self.forward_raw(tokens, capture=self.sae_positions, stop_at_layer=stop)
        for name in self.sae_positions:
            acts = raw.acts[name][:, self.first_position :].float()
            self.sae(name).decoder.bias.copy_(acts.mean(dim=(0, 1)))

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
    ) -> Tensor | None:
        out = self.tlens_model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, stop_at_layer=stop_at_layer)
        return None if stop_at_layer is not None else out

    def forward_raw(
        self,
        tokens: Int[Tensor, "batch pos"],
        capture: Sequence[str] = (),
        stop_at_layer: int | None = None,
    ) -> ForwardOutput:
        """Run the original model (no SAEs, no gradients).

        Args:
            tokens: token ids.
            capture: exact hook names whose activations to return.
            stop_at_layer: stop before this block (logits are then None); see `stop_layer_for`.
        """
        acts: dict[str, Tensor] = {}
        hooks = [(name, _capture_into(acts, name)) for name in capture]
        with torch.no_grad():
            logits = self._run(tokens, hooks, stop_at_layer)
        return ForwardOutput(logits=logits, acts=acts)

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        capture: Sequence[str] = (),
        stop_at_layer: int | None = None,
    ) -> ForwardOutput:
        """Run the model with every SAE's output replacing the activation at its position.

        Args:
            tokens: token ids.
            capture: further hook names to return (with gradients), e.g. in_to_orig hooks.
            stop_at_layer: stop before this block (logits are then None).
        """
        sae_acts: dict[str, SAEActivations] = {}
        acts: dict[str, Tensor] = {}
        hooks = [(name, self._splice_into(sae_acts, name)) for name in self.sae_positions]
        hooks += [(name, _capture_into(acts, name)) for name in capture]
        logits = self._run(tokens, hooks, stop_at_layer)
        return ForwardOutput(logits=logits, acts=acts, sae_acts=sae_acts)

    def _splice_into(self, store: dict[str, SAEActivations], hook_name: str) -> Any:
        sae = self.sae(hook_name)

        def splice(activation: Tensor, hook: Any) -> Tensor:
            # SAEs train in float32 even when the frozen model runs in bf16
            sae_in = activation[:, self.first_position :].float()
            codes, sae_out = sae(sae_in)
            store[hook_name] = SAEActivations(sae_in=sae_in, codes=codes, sae_out=sae_out)
            if self.first_position:
                kept = activation[:, : self.first_position]
                return torch.cat([kept, sae_out.to(activation.dtype)], dim=1)
            return sae_out.to(activation.dtype)

        return splice


def _capture_into(store: dict[str, Tensor], hook_name: str) -> Any:
    # keyed by the requested name: the bridge reports aliases (hook_resid_pre) by canonical name
    def capture(activation: Tensor, hook: Any) -> None:
        store[hook_name] = activation

    return capture
