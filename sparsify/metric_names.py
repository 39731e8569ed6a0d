"""Every metric name, defined once (docs/design.md §5).

Torch-free on purpose: `sweep.pareto` and `sweep.report` import these names without pulling in
torch. Metric functions in `sparsify.metrics` return plain numbers keyed by the bare names; the
`train/` or `eval/` prefix is added once, at logging, by `prefixed`.

Aggregates over several SAE positions: `L0` and `alive_dict_elements` are SUMS over positions
(active latents per token across all SAEs; alive elements across all dictionaries), so with one
SAE they equal that SAE's value. Per-position values use `per_hook(name, hook)`.

Uncertainty (docs/design.md §5): every eval metric but `alive_dict_elements` comes with a standard
error named `se_name(name)`, e.g. `eval_se/L0`, `eval_se/L0/blocks.6.hook_resid_pre`,
`eval_se/loss/sparsity`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

V = TypeVar("V")

TRAIN = "train"
EVAL = "eval"
EVAL_SE = "eval_se"
"""Prefix of the eval metrics' standard errors (`se_name`); not `eval/`, so nothing that picks the
eval metrics by their prefix (objectives, Tune reports) takes a standard error for one."""

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

COST = "cost"
"""Prefix of what a run cost (final metrics only; `sparsify.flops`, docs/design.md §14)."""
COST_TRAIN_FLOPS = "cost/train_flops"
"""FLOPs the training steps spent, counted from shapes (`sparsify.flops`): model forwards and
the frozen-model backward where run, SAE forward and backward. Eval FLOPs are not included. A
cached local run counts the model forward it read from the activation cache, as a fresh run
pays it (`COST_CACHED_MODEL_FLOPS`)."""
COST_CACHED_MODEL_FLOPS = "cost/cached_model_flops"
"""The part of `COST_TRAIN_FLOPS` the activation cache served instead of the model (0 without
it): what the run computed itself is the difference."""
COST_DEVICE_SECONDS = "cost/device_seconds"
"""Wall seconds of the training loop (over every resume) x the number of devices (DDP ranks);
periodic evals and checkpoints inside the loop included, model loading and the final eval not."""
TIME = "time"
"""Prefix of where a run's wall seconds went, by phase (final metrics only; rank 0's clock;
summed over resumes; `sparsify.training.phases`)."""
TIME_MODEL_LOAD_S = "time/model_load_s"
"""Loading the frozen model (imports on first use included) and building the SAEs."""
TIME_DATA_S = "time/data_s"
"""The data checks before training and the batch stream's start: token stream, the activation
cache (built or opened), the data-mean decoder-bias init."""
TIME_TRAIN_STEPS_S = "time/train_steps_s"
"""The training loop without the evals, alive counts and checkpoints inside it: forward,
backward, optimizer steps, reading batches and logging."""
TIME_EVAL_S = "time/eval_s"
"""Held-out evals (periodic and final), without their alive counts."""
TIME_ALIVE_S = "time/alive_s"
"""Counting alive dictionary elements over `act_frequency_n_tokens` eval tokens."""
TIME_SAVE_S = "time/save_s"
"""Writing checkpoints and the run folder."""
TIME_METRICS = (TIME_MODEL_LOAD_S, TIME_DATA_S, TIME_TRAIN_STEPS_S, TIME_EVAL_S, TIME_ALIVE_S, TIME_SAVE_S)

TIME_FIT_START_S = "time/fit_start_s"
"""Sweep trials: from the trial building its `TorchTrainer` to rank 0's worker function
starting (Ray Train's controller and worker group, the worker's imports, the process group)."""
TIME_WORKER_PROCESS_S = "time/worker_process_s"
"""Sweep trials: from rank 0's worker process starting to its worker function starting (Ray's
worker start-up and the imports of unpickling the function; a pooled process's idle time too)."""
TIME_WORKER_FN_S = "time/worker_fn_s"
"""Sweep trials: rank 0's worker function, start to return (the `train` phases and what lies
between them: the final save, tracker, config, environment)."""
TIME_FIT_END_S = "time/fit_end_s"
"""Sweep trials: from rank 0's worker function returning to `TorchTrainer.fit()` returning."""
FIT_TIME_METRICS = (TIME_FIT_START_S, TIME_WORKER_PROCESS_S, TIME_WORKER_FN_S, TIME_FIT_END_S)
"""Where a sweep trial's `TorchTrainer.fit()` spent its wall time, from wall-clock stamps of
the trial and its rank-0 worker (`sweep.cost.fit_times`)."""

COST_METRICS = (
    COST_TRAIN_FLOPS,
    COST_CACHED_MODEL_FLOPS,
    COST_DEVICE_SECONDS,
    *TIME_METRICS,
    *FIT_TIME_METRICS,
)
"""Costs, which add up: a point of `seeds: N` replicates costs their sum, not their mean (the
time a point's trainings spent in each phase too)."""


def prefixed(split: str, name: str) -> str:
    """`prefixed("eval", "L0") == "eval/L0"`."""
    return f"{split}/{name}"


def per_hook(name: str, hook_name: str) -> str:
    """Per-SAE-position metric name: `per_hook("L0", "blocks.6.hook_resid_pre")`."""
    return f"{name}/{hook_name}"


def loss_term(term: str) -> str:
    """Name of one loss term's (unweighted) value: `loss_term("sparsity") == "loss/sparsity"`."""
    return f"{LOSS}/{term}"


def se_name(name: str) -> str:
    """Name of an eval metric's standard error, from its bare or `eval/`-prefixed name:
    `se_name("L0") == se_name("eval/L0") == "eval_se/L0"`."""
    bare = name.removeprefix(f"{EVAL}/")
    return prefixed(EVAL_SE, bare)


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

PER_SEQUENCE_METRICS = (L0, CE_ORIG, CE_SAE, CE_LOSS_INCREASE, KL, TOP1_AGREEMENT, TOTAL_VARIATION)
"""Eval metrics that are means of per-token values, so each eval sequence has its own value (the
mean over the sequence's tokens; `L0` also per position); their standard error is over sequences."""

KEPT_PER_SEQUENCE = (EVAL_L0, EVAL_CE_LOSS_INCREASE, EVAL_KL)
"""The per-sequence eval values a run keeps (`TrainResult.eval_per_sequence`, the run folder's
`eval_per_sequence.json`, sweep trial records): one list per name, in eval-sequence order."""


def with_prefix(split: str, values: Mapping[str, V]) -> dict[str, V]:
    """Every key of `values` under `split`: `with_prefix("eval", {"L0": 3.0}) == {"eval/L0": 3.0}`."""
    return {prefixed(split, name): value for name, value in values.items()}
