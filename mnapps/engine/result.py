"""What :func:`mnapps.engine.loop.fit` returns: :class:`FitResult` and its per-epoch :class:`EpochRecord`.

This module owns the typed record of a training run, as the engine knows it (no task): each
epoch's mean loss terms, learning rate, speed and time (:class:`EpochStats`), the metrics the
task's evaluation gave, and the run's best value and checkpoints. Checkpoints keep the history
as plain dicts (``weights_only`` loading, and the files older versions wrote), so an
:class:`EpochRecord` converts to and from that form (:meth:`EpochRecord.to_dict`,
:meth:`EpochRecord.from_dict`) and nowhere else is the dict read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EpochStats", "EpochRecord", "FitResult"]


@dataclass(frozen=True)
class EpochStats:
    """One epoch of training, as this rank (or, under DDP, every rank together) saw it.

    Attributes:
        losses: the mean of each loss term over the epoch's steps, ``"loss"`` (their sum) first.
        lr: the learning rate of the epoch's last step.
        images_per_s: training images per second over all ranks.
        time_s: the epoch's training time (evaluation not included).
    """

    losses: dict[str, float]
    lr: float
    images_per_s: float
    time_s: float

    @property
    def loss(self) -> float:
        """The mean summed loss of the epoch."""
        return self.losses["loss"]

    def to_dict(self) -> dict[str, float]:
        """The checkpoint's form: the loss terms, then ``lr``, ``images_per_s`` and ``time_s``."""
        return {**self.losses, "lr": self.lr, "images_per_s": self.images_per_s, "time_s": self.time_s}


@dataclass
class EpochRecord:
    """One epoch of the run's history.

    Attributes:
        epoch: the 1-based epoch number.
        train: what training that epoch measured.
        metrics: the task's evaluation after the epoch; empty when none ran.
    """

    epoch: int
    train: EpochStats
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The form a checkpoint stores: ``{"epoch", "train": {terms, lr, images_per_s, time_s}, "metrics"}``."""
        return {"epoch": self.epoch, "train": self.train.to_dict(), "metrics": dict(self.metrics)}

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> EpochRecord:
        """Read one history entry of a checkpoint (:meth:`to_dict`'s form; figures it lacks are NaN)."""
        losses = dict(entry.get("train") or {})
        extras = {name: float(losses.pop(name, math.nan)) for name in ("lr", "images_per_s", "time_s")}
        stats = EpochStats(losses=losses, **extras)
        return cls(epoch=int(entry["epoch"]), train=stats, metrics=dict(entry.get("metrics") or {}))


@dataclass(frozen=True)
class FitResult:
    """What :func:`mnapps.engine.loop.fit` achieved.

    Attributes:
        epochs_run: epochs trained by this call (fewer than ``history`` holds after a resume).
        history: every epoch of the whole run, resumed epochs included.
        best: the best value of ``best_metric`` so far (None: never evaluated, or no best metric).
        best_metric: the metric that selects ``best.pt`` (None: none).
        last_metrics: the latest evaluation's metrics (empty when none ran).
        checkpoint: ``last.pt``.
        best_checkpoint: ``best.pt``, or None when it was never written.
    """

    epochs_run: int
    history: list[EpochRecord]
    best: float | None
    best_metric: str | None
    last_metrics: dict[str, float]
    checkpoint: Path
    best_checkpoint: Path | None

    @property
    def epochs_trained_here(self) -> list[EpochRecord]:
        """The epochs this call trained (the last ``epochs_run`` of ``history``)."""
        return self.history[len(self.history) - self.epochs_run:] if self.epochs_run else []
