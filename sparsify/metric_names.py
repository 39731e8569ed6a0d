"""Every metric name, defined once (docs/design.md §5).

Torch-free on purpose: `sweep.pareto` and `sweep.report` import these names without pulling in
torch. Metric functions in `sparsify.metrics` return plain numbers keyed by the bare names; the
`train/` or `eval/` prefix is added once, at logging, by `prefixed`.

Aggregates over several SAE positions: `L0` and `alive_dict_elements` are SUMS over positions
(active latents per token across all SAEs; alive elements across all dictionaries), so with one
SAE they equal that SAE's value. Per-position values use `per_hook(name, hook)`.
"""

from __future__ import annotations

TRAIN = "train"
EVAL = "eval"

# bare metric names
L0 = "L0"
"""Mean over tokens of the number of nonzero codes (summed over SAE positions)."""
FRAC_ZERO = "frac_zero_codes"
ALIVE = "alive_dict_elements"
"""Dictionary elements that fired at least once over the alive-token budget (summed over positions)."""
CE_ORIG = "ce_loss_orig"
CE_SAE = "ce_loss_sae"
CE_LOSS_INCREASE = "ce_loss_increase"
"""CE(model with SAEs) - CE(original model), nats/token; positive when the SAEs hurt."""
KL = "kl"
TOP1_AGREEMENT = "top1_agreement"
TOTAL_VARIATION = "total_variation"
EXPLAINED_VARIANCE = "explained_variance"
EXPLAINED_VARIANCE_LN = "explained_variance_ln"
LOSS = "loss"
GRAD_NORM = "grad_norm"
LR = "lr"
TOKENS_SEEN = "tokens_seen"
TOKENS_PER_S = "tokens_per_s"


def prefixed(split: str, name: str) -> str:
    """`prefixed("eval", "L0") == "eval/L0"`."""
    return f"{split}/{name}"


def per_hook(name: str, hook_name: str) -> str:
    """Per-SAE-position metric name: `per_hook("L0", "blocks.6.hook_resid_pre")`."""
    return f"{name}/{hook_name}"


def loss_term(term: str) -> str:
    """Name of one loss term's (unweighted) value: `loss_term("sparsity") == "loss/sparsity"`."""
    return f"{LOSS}/{term}"


EVAL_L0 = prefixed(EVAL, L0)
EVAL_ALIVE = prefixed(EVAL, ALIVE)
EVAL_CE_LOSS_INCREASE = prefixed(EVAL, CE_LOSS_INCREASE)
EVAL_KL = prefixed(EVAL, KL)
EVAL_CE_SAE = prefixed(EVAL, CE_SAE)
EVAL_CE_ORIG = prefixed(EVAL, CE_ORIG)

# the sweep's default objectives (docs/design.md §7): both minimized
DEFAULT_OBJECTIVES = (EVAL_L0, EVAL_CE_LOSS_INCREASE)

PRODUCED_EVAL_METRICS = (
    EVAL_L0,
    EVAL_CE_LOSS_INCREASE,
    EVAL_ALIVE,
    EVAL_KL,
    EVAL_CE_SAE,
    prefixed(EVAL, TOP1_AGREEMENT),
    prefixed(EVAL, TOTAL_VARIATION),
)
"""Eval metrics every training run reports (summed over SAE positions), so a sweep's
objectives may name them."""


def with_prefix(split: str, values: dict[str, float]) -> dict[str, float]:
    """Every key of `values` under `split`: `with_prefix("eval", {"L0": 3.0}) == {"eval/L0": 3.0}`."""
    return {prefixed(split, name): value for name, value in values.items()}
