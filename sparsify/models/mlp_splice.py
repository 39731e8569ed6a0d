"""A frozen MLP with SAEs spliced into its hidden layers, and the loss terms of one batch.

The SAE output REPLACES the hidden activation at its position (docs/design.md §3), so e2e losses
train the SAEs through the frozen later layers. Loss terms are those of the LM case (docs/design.md
§4, `sparsify.losses`), with the class distribution in place of the next-token distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from sparsify.config import LATER_RESID_PRE, LossConfig
from sparsify.errors import ConfigError, HookNameError
from sparsify.hooks import check_hook_names, hook_to_key
from sparsify.models.mlp import MLP, MLPRun
from sparsify.sae import SAE
from sparsify.training.objective import SAETermInputs, assemble_terms


@dataclass
class SplicedRun:
    """A forward pass with SAEs spliced in. Shapes: logits (batch, n_classes); hidden, sae_in
    (= hidden at the SAE), sae_out (batch, width); codes (batch, n_dict)."""

    logits: Float[Tensor, "batch n_classes"]
    hidden: dict[str, Float[Tensor, "batch width"]]
    codes: dict[str, Float[Tensor, "batch n_dict"]]
    sae_out: dict[str, Float[Tensor, "batch width"]]


class MLPWithSAEs(nn.Module):
    """A frozen MLP with SAEs at some hidden activations (seed torch before building).

    Raises:
        HookNameError: an SAE position the MLP does not have (listing the close ones).
        ConfigError: a dictionary size that rounds to 0.
    """

    def __init__(self, mlp: MLP, sae_positions: list[str], dict_size_to_input_ratio: float):
        super().__init__()
        check_hook_names(sae_positions, mlp.hidden_names, "sae_positions")
        self.mlp = mlp.requires_grad_(False).eval()
        # in MLP order, so summed metrics and saved keys do not depend on the YAML's order
        self.sae_positions = [n for n in mlp.hidden_names if n in sae_positions]
        saes = {}
        for name in self.sae_positions:
            n_dict = round(dict_size_to_input_ratio * mlp.width(name))
            if n_dict < 1:
                raise ConfigError(f"dict_size_to_input_ratio: gives 0 dictionary elements at {name}")
            saes[hook_to_key(name)] = SAE(mlp.width(name), n_dict)
        self.saes = nn.ModuleDict(saes)

    def sae(self, name: str) -> SAE:
        return self.saes[hook_to_key(name)]  # type: ignore[return-value]

    @torch.no_grad()
    def forward_raw(self, x: Float[Tensor, "batch d_in"]) -> MLPRun:
        """The original MLP, no SAEs."""
        return self.mlp.run(x)

    def forward(self, x: Float[Tensor, "batch d_in"]) -> SplicedRun:
        """The MLP with each SAE's output replacing the activation at its position (docs/design.md §3)."""
        codes: dict[str, Tensor] = {}
        sae_out: dict[str, Tensor] = {}

        def splice_at(name: str):
            def splice(sae_in: Tensor) -> Tensor:  # only splices and captures; losses come later
                codes[name], sae_out[name] = self.sae(name)(sae_in)
                return sae_out[name]

            return splice

        run = self.mlp.run(x, replace={name: splice_at(name) for name in self.sae_positions})
        return SplicedRun(run.logits, run.hidden, codes, sae_out)


def in_to_orig_hooks(loss: LossConfig, sae_positions: list[str], hidden_names: list[str]) -> list[str]:
    """The hidden activations of the in_to_orig term, checked to lie after every SAE.

    Raises:
        HookNameError: an unknown name, one not downstream of the SAEs, or `later_resid_pre`
            with no hidden layer after the last SAE.
    """
    if loss.in_to_orig is None:
        return []
    field = "loss.in_to_orig.hook_positions"
    last_sae = max(hidden_names.index(p) for p in sae_positions)
    if loss.in_to_orig.hook_positions == LATER_RESID_PRE:
        hooks = hidden_names[last_sae + 1 :]
        if not hooks:
            raise HookNameError(f"{field}: no hidden layer follows the last SAE ({hidden_names[last_sae]})")
        return hooks
    hooks = list(loss.in_to_orig.hook_positions)
    check_hook_names(hooks, hidden_names, field)
    for hook in hooks:
        if hidden_names.index(hook) <= last_sae:
            raise HookNameError(
                f"{field}: {hook!r} is not downstream of the SAEs (last SAE at {hidden_names[last_sae]}); "
                f"its MSE would not train them"
            )
    return hooks


def loss_terms(
    loss: LossConfig, out: SplicedRun, raw: MLPRun, downstream: list[str]
) -> dict[str, Float[Tensor, ""]]:
    """Unweighted value of every configured loss term for one batch (docs/design.md §4), assembled
    by `sparsify.training.objective.assemble_terms` as in the transformer case.

    sparsity (mean over images of ||codes||_p / d_in), out_to_in (MSE of SAE output vs input) and
    out_to_orig are summed over SAE positions; in_to_orig is the mean MSE over the `downstream`
    hidden activations (so `weighted_total` weights each hook total_coeff / n_hooks); logits_kl
    is KL(P_orig || P_sae) of the class distributions in nats, mean over images.
    """
    saes = (
        SAETermInputs(codes, out.hidden[pos], out.sae_out[pos], raw.hidden[pos])
        for pos, codes in out.codes.items()
    )
    pairs = [(out.hidden[h], raw.hidden[h]) for h in downstream]
    return assemble_terms(loss, saes, pairs, (raw.logits, out.logits), torch.zeros(()))
