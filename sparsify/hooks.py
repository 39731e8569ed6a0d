"""Hook-name checks and the hook name <-> module key mapping, defined once."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from sparsify.errors import HookNameError

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def hook_to_key(hook_name: str) -> str:
    """`blocks.6.hook_resid_pre` -> `blocks-6-hook_resid_pre` (ModuleDict keys cannot hold dots)."""
    return hook_name.replace(".", "-")


def block_index(hook_name: str) -> int | None:
    """Layer index of a `blocks.N.` hook; None for hooks outside the blocks (embed, ln_final)."""
    match = _BLOCK.match(hook_name)
    return int(match.group(1)) if match else None


def check_hook_names(names: Iterable[str], valid: Iterable[str], field: str) -> None:
    """Raise if any name is not an exact hook of the model.

    Raises:
        HookNameError: naming the field, the bad name and the closest valid names.
    """
    valid = list(valid)
    valid_set = set(valid)
    for name in names:
        if name not in valid_set:
            close = difflib.get_close_matches(name, valid, n=4, cutoff=0.6)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise HookNameError(f"{field}: the model has no hook {name!r}{hint}")


def later_resid_pre_hooks(sae_positions: Iterable[str], n_layers: int) -> list[str]:
    """Every `blocks.N.hook_resid_pre` after the last SAE's block (the paper's e2e+ds hooks).

    Raises:
        HookNameError: if an SAE position is not inside a block.
    """
    layers = []
    for name in sae_positions:
        layer = block_index(name)
        if layer is None:
            raise HookNameError(
                f"loss.in_to_orig.hook_positions: 'later_resid_pre' needs SAEs inside blocks "
                f"(got {name!r}); list the hooks explicitly"
            )
        layers.append(layer)
    return [f"blocks.{n}.hook_resid_pre" for n in range(max(layers) + 1, n_layers)]
