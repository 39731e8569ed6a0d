"""Ctrl-C during a sweep: one Ctrl-C stops the whole sweep (the running trials recorded
`interrupted`, resumed by a rerun), prints one line and exits 130; a second one exits at once.

Ray Tune takes SIGINT itself while an arm's Tuner runs: its handler ends the run gracefully
(experiment state saved with the running trials still running, the trials stopped) and
`fit()` returns as if the run were done. `sweep.tuner.CtrlCRelay` (a Tune callback) puts
`relay_ctrl_c` in front of Tune's handler so that `fit_arm` learns of it; outside Tune's runs
(checks, model loading, the report) `stop_on_ctrl_c` raises KeyboardInterrupt as Python would.
No Ray import here: `sweep.run` uses it before Ray starts.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

INTERRUPTED_LINE = "interrupted: finished trials are kept; rerun the same command to resume"
"""What a Ctrl-C'd sweep prints (stderr) before it exits with code 130."""
_interrupt_reported = False


def new_sweep_run() -> None:
    """Forget an earlier run's interrupt (`main` may be called more than once in a process)."""
    global _interrupt_reported
    _interrupt_reported = False


def report_interrupted() -> None:
    """Print `INTERRUPTED_LINE` to stderr, once per sweep run (`main`)."""
    global _interrupt_reported
    if not _interrupt_reported:
        _interrupt_reported = True
        print(INTERRUPTED_LINE, file=sys.stderr, flush=True)


def exit_at_once(signum: int, frame: Any) -> None:
    """SIGINT handler of a sweep that is already stopping: a second Ctrl-C does not wait for
    Tune and Ray to shut down. Ray's processes end with the driver (they share its fate)."""
    report_interrupted()
    os._exit(130)


def second_ctrl_c_exits_at_once() -> None:
    """After the first Ctrl-C: make the next one `exit_at_once` (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, exit_at_once)


def stop_on_ctrl_c(signum: int, frame: Any) -> None:
    """SIGINT handler of a sweep outside Tune's runs (checks, model loading, the report): stop
    with KeyboardInterrupt, as Python would; the next Ctrl-C exits at once. During an arm's run
    Tune takes the signal itself (`fit_arm`)."""
    second_ctrl_c_exits_at_once()
    raise KeyboardInterrupt


class _CtrlCState:
    """What `fit_arm` and `CtrlCRelay` share about the fit in progress (module state: Tune
    pickles callbacks with the Tuner, and a signal handler cannot be pickled)."""

    def __init__(self) -> None:
        self.received = False
        self.tune_handler: Any = None
        self.on_ctrl_c: Callable[[], None] | None = None


CTRL_C = _CtrlCState()


def relay_ctrl_c(signum: int, frame: Any) -> None:
    """SIGINT handler while Tune's is wrapped: note the Ctrl-C, let Tune's handler end the run
    gracefully (it puts back the handler that was there before the fit), then tell `fit_arm`'s
    caller at once (e.g. to make a second Ctrl-C exit at once)."""
    handler, CTRL_C.tune_handler = CTRL_C.tune_handler, None
    if not callable(handler):  # left behind by a fit that `fit_arm` did not run: Python's way
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt
    CTRL_C.received = True
    handler(signum, frame)
    if CTRL_C.on_ctrl_c is not None:
        CTRL_C.on_ctrl_c()


def _tune_handles_sigint() -> bool:
    return threading.current_thread() is threading.main_thread() and not int(
        os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") or 0
    )


def fit_arm(tuner: Any, on_ctrl_c: Callable[[], None] | None = None) -> bool:
    """Run `tuner.fit()`; return whether a Ctrl-C (SIGINT) ended it.

    Tune takes a Ctrl-C during the fit itself: its handler ends the run gracefully (the
    experiment state saved with the running trials still running, so a rerun resumes them;
    `TrialRecordCallback` records them `interrupted`) and `fit()` returns as if the run were
    done. `CtrlCRelay` calls `on_ctrl_c` the moment Tune takes the signal; a Tuner restored
    from a sweep folder written before the relay existed is caught afterwards: Tune's handler
    puts back the handler that was there before the fit, which a run that ends normally leaves
    in place. Either way the handler from before the fit is in place again after it (unless
    `on_ctrl_c` installed another).

    Args:
        tuner: The arm's `ray.tune.Tuner` (`arm_tuner`).
        on_ctrl_c: Called once, in the signal handler, right after Tune took a Ctrl-C.
    """
    tune_handles = _tune_handles_sigint()
    before = signal.getsignal(signal.SIGINT) if tune_handles else None
    CTRL_C.received, CTRL_C.tune_handler, CTRL_C.on_ctrl_c = False, None, on_ctrl_c
    try:
        tuner.fit()
    finally:
        CTRL_C.on_ctrl_c, CTRL_C.tune_handler = None, None
    interrupted = CTRL_C.received
    if tune_handles and before is not None:
        now = signal.getsignal(signal.SIGINT)
        if not interrupted and now is before:  # put back by Tune's own handler: no relay
            interrupted = True
            if on_ctrl_c is not None:
                on_ctrl_c()
        elif not interrupted:  # Tune leaves its (now idle) handler behind after a full run
            signal.signal(signal.SIGINT, before)
    return interrupted
