"""Where a sweep trial's `TorchTrainer.fit()` spends its wall time outside `train`'s own phases
(`metric_names.FIT_TIME_METRICS`; `train` records its phases as `metric_names.TIME_METRICS`).

Torch-, Ray- and pandas-free: `sweep.trial` imports it in every Train worker, where each import
is paid again.
"""

from __future__ import annotations

from collections.abc import Mapping

from sparsify.metric_names import TIME_FIT_END_S, TIME_FIT_START_S, TIME_WORKER_FN_S, TIME_WORKER_PROCESS_S


def fit_times(fit_started_at: float, fit_returned_at: float, worker: Mapping[str, float]) -> dict[str, float]:
    """Where one `TorchTrainer.fit()` spent its wall time (`metric_names.FIT_TIME_METRICS`).

    Args:
        fit_started_at, fit_returned_at: `time.time()` when the trial called `fit()` and when
            it returned.
        worker: rank 0's `time.time()` stamps: `process_started_at` (its process's creation),
            `entered_at` and `returned_at` (its worker function). Wall clocks of one machine;
            across nodes they differ by the clocks' offset.

    Returns:
        Seconds by metric name: fit start to the worker function, the worker process's start
        to its function, the worker function, the function's return to fit's.
    """
    return {
        TIME_FIT_START_S: worker["entered_at"] - fit_started_at,
        TIME_WORKER_PROCESS_S: worker["entered_at"] - worker["process_started_at"],
        TIME_WORKER_FN_S: worker["returned_at"] - worker["entered_at"],
        TIME_FIT_END_S: fit_returned_at - worker["returned_at"],
    }
