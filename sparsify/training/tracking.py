"""One `log(metrics, step)` over TensorBoard, W&B, or nothing (a null object)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from sparsify.errors import ConfigError, MissingPackageError

logger = logging.getLogger(__name__)

ENV_FILE = ".env"
"""W&B credentials (`WANDB_API_KEY`, `WANDB_ENTITY`) live here, next to the configs; see
`.env.example`. Git ignores it."""


def load_env_file(path: str | Path = ENV_FILE) -> bool:
    """Read `KEY=value` lines of a `.env` file into the environment, without overriding
    variables already set (python-dotenv). Values are never logged.

    Returns:
        Whether the file existed.
    """
    from dotenv import load_dotenv

    path = Path(path)
    if not path.is_file():
        return False
    load_dotenv(path, override=False)
    return True


class Tracker:
    """Null tracker: the loop calls `log` and `close` without asking what is on."""

    @property
    def run_id(self) -> str | None:
        """The W&B run id, kept in checkpoints so that a resumed run continues that W&B run."""
        return None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        """Flush and end the run; `failed`: training raised (W&B shows the run as failed)."""


class TensorBoardTracker(Tracker):
    """TensorBoard event files in `logdir`. `resumed_at`: the checkpoint step a resumed run
    continues after; the steps a crashed run logged beyond it are purged, so each step shows once."""

    def __init__(self, logdir: Path, resumed_at: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        purge_step = resumed_at + 1 if resumed_at is not None else None
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=purge_step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(name, value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """W&B run; its files go into the run folder (not ./wandb). Without network, set
    WANDB_MODE=offline and `wandb sync` later."""

    def __init__(
        self,
        project: str,
        run_name: str,
        config: dict[str, Any],
        run_dir: Path | None = None,
        resume_id: str | None = None,
    ):
        try:
            import wandb
        except ImportError:
            raise MissingPackageError(
                "wandb_project is set but wandb is not installed: pip install wandb"
            ) from None
        try:
            self.run = wandb.init(
                project=project,
                name=run_name,
                config=config,
                dir=str(run_dir) if run_dir is not None else None,
                settings=wandb.Settings(init_timeout=60),
                # a resumed run continues its W&B run; W&B drops steps it already has
                id=resume_id,
                resume="allow" if resume_id else None,
            )
        except Exception as exc:  # no network, bad key, ...: one line, not wandb's traceback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"wandb_project: cannot start W&B ({first}); set WANDB_MODE=offline to log locally"
            ) from None

    @property
    def run_id(self) -> str | None:
        return self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MultiTracker(Tracker):
    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    @property
    def run_id(self) -> str | None:
        return next((t.run_id for t in self.trackers if t.run_id is not None), None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.close(failed)


def make_tracker(
    run_dir: Path | None,
    tensorboard: bool,
    wandb_project: str | None,
    run_name: str,
    config: dict[str, Any],
    resumed_at: int | None = None,
    wandb_id: str | None = None,
) -> Tracker:
    """The tracker a config asks for (rank 0 only; other ranks get the null tracker).

    A resumed run (`resumed_at`: its checkpoint's step) purges what the interrupted run logged
    after that step to TensorBoard, and continues W&B run `wandb_id` (`Tracker.run_id` of the
    interrupted run, kept in its checkpoint)."""
    trackers: list[Tracker] = []
    if tensorboard and run_dir is not None:
        trackers.append(TensorBoardTracker(run_dir / "tensorboard", resumed_at))
    if wandb_project:
        trackers.append(WandbTracker(wandb_project, run_name, config, run_dir, wandb_id))
    return MultiTracker(trackers) if trackers else Tracker()
