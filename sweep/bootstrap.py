"""The points a verdict compares and their bootstrap resamples (docs/design.md §8): each
finished trial as replicates (seeds) of per-sequence eval values. Pure numpy: no Ray, no torch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparsify.metric_names import EVAL_ALIVE, EVAL_CE_LOSS_INCREASE, EVAL_L0


@dataclass(frozen=True)
class Replicate:
    """One trained SAE (one seed) of a point.

    Attributes:
        l0: Shape (n_seq,): eval L0 of each eval sequence (mean over its tokens, summed over
            SAE positions); a single value when the record kept no per-sequence values.
        ce_increase: Shape (n_seq,): eval CE-loss increase of each sequence, nats/token,
            paired with `l0` (same sequences, same order).
        alive: Alive dictionary elements (a count over the alive-token budget: no per-sequence
            values).
    """

    l0: np.ndarray
    ce_increase: np.ndarray
    alive: float


@dataclass(frozen=True)
class Point:
    """One finished search point: its replicates (one per seed)."""

    trial_id: str
    replicates: tuple[Replicate, ...]

    @property
    def resamplable(self) -> bool:
        """Whether a bootstrap can vary it: several replicates, or per-sequence eval values."""
        return len(self.replicates) > 1 or any(len(r.l0) > 1 for r in self.replicates)

    def means(self) -> tuple[float, float, float]:
        """(L0, CE-loss increase, alive), each the mean over replicates of the eval means."""
        reps = self.replicates
        return (
            float(np.mean([r.l0.mean() for r in reps])),
            float(np.mean([r.ce_increase.mean() for r in reps])),
            # like the record's means: over the replicates that counted alive elements
            float(np.nanmean([r.alive for r in reps]))
            if any(np.isfinite(r.alive) for r in reps)
            else math.nan,
        )


def _replicate(metrics: Mapping[str, Any], per_sequence: Mapping[str, Sequence[float]]) -> Replicate | None:
    l0, ce = per_sequence.get(EVAL_L0), per_sequence.get(EVAL_CE_LOSS_INCREASE)
    if not l0 or not ce or len(l0) != len(ce):  # an older record: its eval means only
        l0, ce = [metrics.get(EVAL_L0, math.nan)], [metrics.get(EVAL_CE_LOSS_INCREASE, math.nan)]
    alive = metrics.get(EVAL_ALIVE, math.nan)
    rep = Replicate(np.asarray(l0, dtype=float), np.asarray(ce, dtype=float), float(alive))
    if not (np.isfinite(rep.l0).all() and np.isfinite(rep.ce_increase).all()):
        return None
    return rep


def points_from_records(records: Sequence[Any]) -> dict[str, list[Point]]:
    """The finished points of each arm, from trial records (`sweep.records.TrialRecord`).

    A record's replicates are its `replicates` (a `seeds: N` sweep) or the record itself; a
    replicate without finite eval values is left out, and a point without any.
    """
    points: dict[str, list[Point]] = {}
    for record in records:
        if record.status != "finished":
            continue
        sources = getattr(record, "replicates", None) or [
            {"metrics": record.metrics, "eval_per_sequence": getattr(record, "eval_per_sequence", {})}
        ]
        reps = [_replicate(s.get("metrics") or {}, s.get("eval_per_sequence") or {}) for s in sources]
        kept = tuple(r for r in reps if r is not None)
        if kept:
            points.setdefault(record.arm, []).append(Point(record.trial_id, kept))
    return points


def sequence_draws(
    points: Sequence[Point], n: int, rng: np.random.Generator, into: dict[int, np.ndarray] | None = None
) -> dict[int, np.ndarray]:
    """One (n, n_seq) matrix of resampled eval-sequence indices per sequence count: every
    replicate evaluated on `n_seq` sequences uses the same rows, so a draw resamples the shared
    eval sequences once for all points (they are the same sequences: the eval stream and its
    seed are the sweep's), a paired bootstrap."""
    draws = {} if into is None else into
    for point in points:
        for rep in point.replicates:
            if len(rep.l0) not in draws:
                draws[len(rep.l0)] = rng.integers(0, len(rep.l0), size=(n, len(rep.l0)))
    return draws


def bootstrap_draws(
    points: Sequence[Point], n: int, rng: np.random.Generator, sequences: dict[int, np.ndarray] | None = None
) -> np.ndarray:
    """Resampled (L0, CE-loss increase, alive) of every point.

    Each draw picks, for each point, its replicates with replacement and, within each picked
    replicate, its eval sequences with replacement (`sequences`, from `sequence_draws`: the same
    indices for every replicate with as many sequences; L0 and CE increase of a sequence stay
    paired); the point's value is the mean over its picked replicates of their means.

    Returns:
        Shape (n, len(points), 3).
    """
    sequences = sequence_draws(points, n, rng, sequences)
    out = np.empty((n, len(points), 3))
    for p, point in enumerate(points):
        rep_means = np.empty((len(point.replicates), n, 3))
        for r, rep in enumerate(point.replicates):
            idx = sequences[len(rep.l0)]
            rep_means[r, :, 0] = rep.l0[idx].mean(axis=1)
            rep_means[r, :, 1] = rep.ce_increase[idx].mean(axis=1)
            rep_means[r, :, 2] = rep.alive
        picked = rng.integers(0, len(point.replicates), size=(n, len(point.replicates)))
        out[:, p, :] = rep_means[picked, np.arange(n)[:, None], :].mean(axis=1)
    return out
