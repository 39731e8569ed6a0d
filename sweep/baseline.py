"""Which arm the verdict compares the others with (docs/design.md §7, §8). Used by the search
space's validation and by the report (which reads the recorded space): no Ray, no torch."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

BASELINE_EXCLUDES = ("logits_kl", "in_to_orig")
"""Loss terms that make an arm not a local SAE: a baseline arm has none of them."""


def baseline_arm(
    losses: Mapping[str, Mapping[str, Any]],
    searched: Mapping[str, Sequence[str]] | None = None,
    named: str | None = None,
    fixed: Mapping[str, Mapping[str, Any]] | None = None,
    fine_tunes: Collection[str] = (),
) -> str | None:
    """The arm every other arm is compared with.

    `named` if given; otherwise the one arm whose loss has no `logits_kl` and no `in_to_orig`
    term (a term counts when its section, after the arm's fixed `loss.*` values, has a nonzero
    `coeff`/`total_coeff`, or when a path under it is searched). A space with one arm has no
    baseline. A fine-tune arm (`init_from`: it starts from another arm's SAEs) is never
    picked, only named.

    Args:
        losses: Arm -> its `loss` section.
        searched: Arm -> its searched dotted paths (a searched `loss.logits_kl.coeff` counts).
        named: The search space's `baseline` field.
        fixed: Arm -> its `set` values by dotted path (`loss.logits_kl.coeff: 0` turns it off).
        fine_tunes: The arms with `init_from`: left out of the unnamed choice.

    Returns:
        The baseline arm's name, or None for a single-arm space.

    Raises:
        ValueError: `named` is not an arm, or (unnamed) no arm or several arms qualify.
    """
    arms = list(losses)
    if named is not None:
        if named not in losses:
            raise ValueError(f"baseline {named!r} is not an arm; arms: {', '.join(arms)}")
        return named
    if len(arms) < 2:
        return None

    def has_term(arm: str, term: str) -> bool:
        section = losses[arm].get(term)
        for path, value in (fixed or {}).get(arm, {}).items():
            if path == f"loss.{term}":
                section = value
            elif path.startswith(f"loss.{term}."):
                section = {**(section if isinstance(section, Mapping) else {}), path.split(".", 2)[2]: value}
        if isinstance(section, Mapping):
            coeff = section.get("coeff", section.get("total_coeff", 1.0))
            if coeff is None or coeff != 0:
                return True
        return any(path.startswith(f"loss.{term}.") for path in (searched or {}).get(arm, ()))

    local = [
        arm
        for arm in arms
        if arm not in fine_tunes and not any(has_term(arm, term) for term in BASELINE_EXCLUDES)
    ]
    if len(local) != 1:
        found = f"arms {', '.join(local)} all qualify" if local else "no arm qualifies"
        raise ValueError(
            f"cannot tell the baseline arm ({found}: it is the arm without logits_kl and in_to_orig "
            "terms); name it with `baseline: <arm>`"
        )
    return local[0]
