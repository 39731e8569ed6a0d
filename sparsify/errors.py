"""User-facing errors: each carries one line naming the file, the field and what is allowed."""

from __future__ import annotations


class SparsifyError(Exception):
    """A user mistake. `python -m` entry points print `error: <message>` and exit 2.

    A sweep trial that raises one is recorded as an error at once, not retried: the same config
    fails the same way again. Subclasses with `transient = True` (the hub was unreachable) are
    retried like a crashed worker.
    """

    transient = False


class ConfigError(SparsifyError):
    """A config file or value is invalid."""


class DataError(SparsifyError):
    """Training or eval data is missing, unreadable or too small."""


class DataUnavailableError(DataError):
    """A hub dataset could not be loaded: maybe the network, so a sweep retries the trial."""

    transient = True


class HookNameError(SparsifyError):
    """A hook name that the model does not have."""


class MissingPackageError(SparsifyError):
    """An optional package is needed; the message says how to install it."""


class StorageError(SparsifyError, OSError):
    """The storage refused a write: `cannot write <filename>: <strerror>`.

    Also an OSError (`errno`, `strerror`, `filename`), so code that handles OSError still
    does; as a SparsifyError the command lines print it as one line and a sweep records the
    trial as an error at once instead of retrying it.
    """

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


class DivergedError(Exception):
    """A loss became NaN or inf. Not a user mistake: the sweep records the trial as diverged.

    Args:
        step: the optimizer step at which it happened.
        term: the loss term (or "total") that was not finite.
    """

    def __init__(self, step: int, term: str, value: float):
        super().__init__(f"loss term {term!r} is {value} at step {step}")
        self.step = step
        self.term = term
        self.value = value

    def __reduce__(self) -> tuple:
        # Ray ships worker exceptions between processes by pickling them
        return (DivergedError, (self.step, self.term, self.value))
