"""How many trials each sampler needs to put a trial at every L0 target (`strategy: match`).

    python -m bench.match_vs_tpe                 # stand-in objectives: seconds, no torch
    python -m bench.match_vs_tpe --tiny          # also a tiny random Llama, trained for real

The stand-in is a cheap deterministic model of one arm: L0(c) = A·c^(-alpha) and CE increase
B·c^beta, each times exp(0.05·N(0, 1)) noise seeded by (seed, c), over the quickstart's
coefficient ranges (`search_spaces/quickstart.yaml`: local 1..10, e2e 0.1..2). An Optuna
study is driven directly (ask/tell, no Ray), objectives (eval L0, eval CE increase) both
minimized as the sweep does, with each sampler: `MatchSampler` (the sweep's `strategy: match`),
multi-objective `TPESampler(seed)` (the sweep's default), `QMCSampler(seed)` and
`RandomSampler(seed)`. A run counts the trials until every target has a trial within 15% in
L0 (capped), over several seeds; `match x4` asks 4 trials before it tells any (4 concurrent
trials).

`--tiny` does the same with a real objective: a local 2x SAE on the tiny 3-layer random Llama
the tests use (a local corpus, no download), trained with `sparsify.train` directly (1024
sequences of 16 tokens, ~0.3 s a run on 2 CPU cores); its L0 is not a power law (it saturates
near 30 at small coefficients and drops to 0 by 0.1).
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution

from sparsify import metric_names as names
from sweep.match import HIT_TOLERANCE, MatchSampler

PARAM = "loss.sparsity.coeff"
TARGETS = (10.0, 20.0, 40.0, 80.0)
CAP = 60
SEEDS = tuple(range(10))
NOISE = 0.05


@dataclass(frozen=True)
class StandIn:
    """One arm's stand-in: its coefficient range and its L0 and CE-increase curves."""

    low: float
    high: float
    l0_scale: float
    l0_power: float
    ce_scale: float
    ce_power: float

    def __call__(self, c: float, seed: int) -> tuple[float, float]:
        """(L0, CE increase) at coefficient c: deterministic in (seed, c)."""
        rng = random.Random(f"{seed}:{c!r}")
        l0 = self.l0_scale * c ** (-self.l0_power) * math.exp(NOISE * rng.gauss(0, 1))
        ce = self.ce_scale * c**self.ce_power * math.exp(NOISE * rng.gauss(0, 1))
        return l0, ce


STAND_INS = {
    # L0 7.5..150 over 1..10 (the local SAE needs a larger coefficient: MSE in the residual)
    "local": StandIn(low=1.0, high=10.0, l0_scale=150.0, l0_power=1.3, ce_scale=0.05, ce_power=1.0),
    # L0 9.3..252 over 0.1..2
    "e2e": StandIn(low=0.1, high=2.0, l0_scale=20.0, l0_power=1.1, ce_scale=0.1, ce_power=0.8),
}


def make_sampler(name: str, low: float, high: float, seed: int, targets: Sequence[float]) -> Any:
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if name.startswith("match"):
        return MatchSampler(PARAM, low, high, True, names.EVAL_L0, 0, targets, seed=seed)
    return {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }[name]()


def all_hit(l0s: Sequence[float], targets: Sequence[float]) -> bool:
    return all(any(abs(m / t - 1) <= HIT_TOLERANCE for m in l0s) for t in targets)


def run_study(
    sampler_name: str,
    low: float,
    high: float,
    evaluate: Callable[[float], tuple[float, float]],
    targets: Sequence[float] = TARGETS,
    seed: int = 0,
    cap: int = CAP,
    concurrency: int = 1,
) -> list[float]:
    """The L0 of each trial, until every target has one within 15% or `cap` trials ran."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        directions=["minimize", "minimize"], sampler=make_sampler(sampler_name, low, high, seed, targets)
    )
    distribution: dict[str, BaseDistribution] = {PARAM: FloatDistribution(low, high, log=True)}
    l0s: list[float] = []
    while len(l0s) < cap:
        batch = [study.ask(distribution) for _ in range(min(concurrency, cap - len(l0s)))]
        for trial in batch:
            l0, ce = evaluate(trial.params[PARAM])
            study.tell(trial, [l0, ce])
            l0s.append(l0)
            if all_hit(l0s, targets):
                return l0s
    return l0s


def targets_hit(l0s: Sequence[float], targets: Sequence[float]) -> int:
    return sum(any(abs(m / t - 1) <= HIT_TOLERANCE for m in l0s) for t in targets)


SAMPLERS = {"match": 1, "match x4": 4, "tpe": 1, "qmc": 1, "random": 1}
"""Sampler name -> trials asked before any is told."""


def stand_in_table(seeds: Sequence[int] = SEEDS, cap: int = CAP) -> list[dict[str, Any]]:
    rows = []
    for arm, stand_in in STAND_INS.items():
        for name, concurrency in SAMPLERS.items():
            runs = [
                run_study(
                    name, stand_in.low, stand_in.high, functools.partial(stand_in, seed=seed),
                    seed=seed, cap=cap, concurrency=concurrency,
                )
                for seed in seeds
            ]  # fmt: skip
            rows.append(row(arm, name, runs, TARGETS, cap))
    return rows


def row(
    arm: str, sampler: str, runs: Sequence[Sequence[float]], targets: Sequence[float], cap: int
) -> dict[str, Any]:
    """One table row from each seed's L0s."""
    counts = [len(l0s) if all_hit(l0s, targets) else None for l0s in runs]
    hit = [n for n in counts if n is not None]
    mean_hit = statistics.mean(targets_hit(l0s, targets) for l0s in runs)
    return {
        "arm": arm,
        "sampler": sampler,
        "hit all": f"{len(hit)}/{len(counts)}",
        "targets hit": f"{mean_hit:.1f}/{len(targets)}",
        "median": statistics.median(n if n is not None else cap + 1 for n in counts),
        "max": max(hit) if len(hit) == len(counts) else f">{cap}",
        "counts": " ".join(str(n) if n is not None else "-" for n in counts),
    }


def print_table(rows: Sequence[dict[str, Any]], title: str) -> None:
    print(f"\n{title}")
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |")
    print("|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]).ljust(widths[c]) for c in columns) + " |")


# --- the tiny model ----------------------------------------------------------------------------

TINY_TARGETS = (2.0, 4.0, 8.0, 16.0)
TINY_RANGE = (1e-3, 0.1)
"""The coefficients over which the tiny local SAE's L0 goes from ~30 (its level without the
sparsity term) to ~0."""
TINY_SEEDS = tuple(range(5))
TINY_CAP = 20


def build_tiny_model(folder: Path) -> tuple[Path, Path]:
    """The tests' tiny model and corpus (`tests/tiny_model.py`): (model folder, corpus folder)."""
    from tests.tiny_model import build_tiny_llama, make_corpus

    make_corpus(folder / "corpus")
    return build_tiny_llama(folder / "tiny_llama"), folder / "corpus"


def tiny_objective(folder: Path) -> Callable[[float], tuple[float, float]]:
    """(eval L0, eval CE increase) of a local SAE (sparsity + MSE) at blocks.1.hook_resid_pre
    of the tiny model, trained with sparsity coefficient c."""
    import torch

    from sparsify import TrainConfig, train
    from sparsify.model_loading import load_tlens_model
    from tests.tiny_model import tiny_train_config

    model_dir, corpus = build_tiny_model(folder)
    model = load_tlens_model(str(model_dir), torch.device("cpu"))

    def evaluate(c: float) -> tuple[float, float]:
        loss = {"sparsity": {"coeff": c}, "out_to_in": {"coeff": 1.0}}
        cfg = TrainConfig.model_validate(
            tiny_train_config(
                model_dir,
                corpus,
                folder,
                loss=loss,
                n_samples=1024,
                batch_size=16,
                lr=1e-2,
                eval_n_samples=32,
                log_every_n_grad_steps=100,
            )  # fmt: skip
        )
        result = train(cfg, tlens_model=model, show_progress=False)
        return result.metrics[names.EVAL_L0], result.metrics[names.EVAL_CE_LOSS_INCREASE]

    return evaluate


def tiny_table(seeds: Sequence[int] = TINY_SEEDS, cap: int = TINY_CAP) -> list[dict[str, Any]]:
    """Trials until every tiny-model target is hit, per sampler, over `seeds` (a training run
    is deterministic in its coefficient, so runs are cached by coefficient)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="match-vs-tpe-") as tmp:
        measured: dict[float, tuple[float, float]] = {}
        real = tiny_objective(Path(tmp))

        def evaluate(c: float) -> tuple[float, float]:
            if c not in measured:
                measured[c] = real(c)
            return measured[c]

        for name in ("match", "tpe", "qmc"):
            start = time.perf_counter()
            runs = [
                run_study(name, *TINY_RANGE, evaluate, targets=TINY_TARGETS, seed=seed, cap=cap)
                for seed in seeds
            ]
            seconds = f"{time.perf_counter() - start:.0f}"
            rows.append({**row("tiny local", name, runs, TINY_TARGETS, cap), "seconds": seconds})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="also train the tiny model for real")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="stand-in seeds")
    parser.add_argument("--cap", type=int, default=CAP, help="trials per stand-in run")
    parser.add_argument("--tiny-seeds", type=int, default=len(TINY_SEEDS))
    parser.add_argument("--tiny-cap", type=int, default=TINY_CAP, help="trials per tiny-model run")
    args = parser.parse_args(argv)
    targets = ", ".join(f"{t:g}" for t in TARGETS)
    print_table(
        stand_in_table(range(args.seeds), args.cap),
        f"stand-in: trials until every L0 target ({targets}) has a trial within "
        f"{HIT_TOLERANCE:.0%}, {args.seeds} seeds, cap {args.cap} (median counts a miss as cap+1; targets hit: mean, at the end)",
    )
    if args.tiny:
        tiny_targets = ", ".join(f"{t:g}" for t in TINY_TARGETS)
        print_table(
            tiny_table(range(args.tiny_seeds), args.tiny_cap),
            f"tiny model (local SAE, coeff {TINY_RANGE[0]:g}..{TINY_RANGE[1]:g}, trained for real): "
            f"trials until every L0 target ({tiny_targets}) is hit, {args.tiny_seeds} seeds, "
            f"cap {args.tiny_cap} (targets hit: mean, at the end)",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
