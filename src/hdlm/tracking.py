"""Experiment tracking: the rows of ``metrics.jsonl``, also sent to TensorBoard, Weights & Biases or Trackio.

``train.logger`` chooses the backend (``none`` by default); every backend receives exactly the
rows that :class:`hdlm.train.Metrics` appends to ``metrics.jsonl`` (one row per ``log_every``
training steps and one per validation), each numeric field as a scalar named ``SPLIT/FIELD``
(``train/loss``, ``valid/loss``, ``train/lr``, …) at the row's ``step``. Nothing else is logged,
so the file and the dashboard cannot disagree.

- ``tensorboard``: ``torch.utils.tensorboard`` event files in ``RUN/tensorboard`` (needs the
  ``tensorboard`` package); a resumed run purges the steps after its checkpoint.
- ``wandb``: a W&B run in ``RUN/wandb``, offline unless ``WANDB_MODE`` says otherwise (sync it
  later with ``wandb sync``); its id is derived from the run folder, so a resumed run continues it.
- ``trackio``: a local Trackio project (``trackio show``), stored where ``TRACKIO_DIR`` points.

``train.logger_project`` names the W&B / Trackio project. Only rank 0 logs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Protocol

from .config import LOGGERS
from .errors import HDLMError

_SKIP = ("step", "split")


def scalars(row: dict) -> dict[str, float]:
    """The scalars of one metrics row: ``{"SPLIT/FIELD": value}`` for its numeric fields (bools excluded)."""
    split = row.get("split", "train")
    return {f"{split}/{k}": float(v) for k, v in row.items()
            if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker(Protocol):
    def log(self, row: dict) -> None: ...

    def close(self) -> None: ...


class NoTracker:
    """``train.logger = none``: metrics.jsonl only."""

    def log(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    def __init__(self, out_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step is not None else None)

    def log(self, row: dict) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, out_dir: Path, project: str, config: dict) -> None:
        import wandb

        run_id = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:16]
        (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=project, dir=str(out_dir), id=run_id, resume="allow", config=config,
                              name=out_dir.name, mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    def __init__(self, out_dir: Path, project: str, config: dict) -> None:
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=project, name=out_dir.name, config=config, resume="allow")

    def log(self, row: dict) -> None:
        self.trackio.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.trackio.finish()


def make_tracker(kind: str, out_dir: str | Path, *, project: str = "hdlm", config: dict | None = None,
                 resume_step: int | None = None) -> Tracker:
    """The tracker ``kind`` (one of :data:`LOGGERS`) for the run folder ``out_dir``.

    ``resume_step``: the last step already logged (a resumed run); ``config``: the run's config,
    recorded by W&B and Trackio. A backend whose package is missing is one clear error.
    """
    if kind not in LOGGERS:
        raise HDLMError(f"train.logger = {kind!r}: must be one of {', '.join(LOGGERS)}")
    out_dir = Path(out_dir)
    if kind == "none":
        return NoTracker()
    try:
        if kind == "tensorboard":
            return TensorBoardTracker(out_dir, resume_step)
        if kind == "wandb":
            return WandbTracker(out_dir, project, config or {})
        return TrackioTracker(out_dir, project, config or {})
    except ImportError as e:
        package = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}[kind]
        raise HDLMError(f"train.logger = {kind}: the '{package}' package is not installed "
                        f"(pip install {package}; {e})") from None


__all__ = ["LOGGERS", "Tracker", "make_tracker", "scalars"]
