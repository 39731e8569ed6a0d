"""Where a training run's wall time goes: seconds per phase (`metric_names.TIME_METRICS`).

`train` times its phases with `PhaseTimes.timed` and records them with the final metrics
(`time/model_load_s`, `time/data_s`, `time/train_steps_s`, `time/eval_s`, `time/alive_s`,
`time/save_s`); a resume checkpoint carries them, so a resumed run's times add up over its
attempts as `cost/device_seconds` does. `bench/trial_time.py` reads them from sweep records.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from sparsify import metric_names as names

IN_LOOP = (names.TIME_EVAL_S, names.TIME_ALIVE_S, names.TIME_SAVE_S)
"""Phases the training loop enters between steps; `time/train_steps_s` is the loop without them."""


class PhaseTimes:
    """Wall seconds spent in each phase (`names.TIME_METRICS`), summed over the phase's entries;
    the training loop's own (`time/train_steps_s`) runs from `start_loop` to `stop_loop`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(names.TIME_METRICS, 0.0)
        self._loop: tuple[float, float] | None = None
        """(perf_counter, seconds in `IN_LOOP` phases) when the running loop started."""

    def start_loop(self) -> None:
        self._loop = (time.perf_counter(), self._in_loop_seconds())

    def stop_loop(self) -> None:
        self.seconds[names.TIME_TRAIN_STEPS_S] = self.train_steps_now()
        self._loop = None

    def train_steps_now(self) -> float:
        """`time/train_steps_s` including the running loop's so far (its evals, alive counts
        and checkpoints left out)."""
        done = self.seconds[names.TIME_TRAIN_STEPS_S]
        if self._loop is None:
            return done
        started, in_loop_then = self._loop
        return done + (time.perf_counter() - started) - (self._in_loop_seconds() - in_loop_then)

    def _in_loop_seconds(self) -> float:
        return sum(self.seconds[phase] for phase in IN_LOOP)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the block's wall seconds to `phase` (a `names.TIME_METRICS` name), also when it raises."""
        assert phase in self.seconds, phase
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def add(self, phase: str, seconds: float) -> None:
        assert phase in self.seconds, phase
        self.seconds[phase] += seconds

    def restore(self, saved: Mapping[str, float]) -> None:
        """Add the times a checkpoint recorded (`metrics()` of the earlier attempts) to this one's."""
        for phase, seconds in saved.items():
            if phase in self.seconds:
                self.seconds[phase] += float(seconds)

    def metrics(self) -> dict[str, float]:
        """`{time/<phase>_s: seconds}` for every phase (0.0 for one not entered), the running
        loop's time so far included."""
        return {**self.seconds, names.TIME_TRAIN_STEPS_S: self.train_steps_now()}
