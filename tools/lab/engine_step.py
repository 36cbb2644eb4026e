"""Timing the engine's own training step, for the lab's benchmarks.

This module owns :func:`time_engine_steps`. It runs :func:`mnapps.engine.loop.fit` for one
epoch over one batch repeated, and reads each step's time from the moments the loop asks for
its next batch. What is timed is therefore the very step a training run takes (zero_grad,
autocast, the loss, the non-finite check, backward, clipping, the optimiser and schedule step,
the progress bar), with the run's own optimiser built from its :class:`TrainConfig`, and nothing
around it (optimiser construction, the epoch's checkpoint and log files). It also owns
:func:`detector_loss`, the loss a torchvision-style detector trains on: its own loss dict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from mnapps.config import TrainConfig
from mnapps.engine.loop import RunOptions, TaskHooks, fit

__all__ = ["time_engine_steps", "detector_loss"]


class _StampedBatches:
    """``count`` times the same batch; the clock is read each time the loop asks for the next one.

    The loop asks for batch ``i + 1`` right after finishing step ``i``, so the gaps between the
    stamps are the step times. On CUDA each stamp waits for the queued kernels first.
    """

    def __init__(self, batch: Any, count: int, device: torch.device) -> None:
        self.batch = batch
        self.count = count
        self.device = device
        self.stamps: list[float] = []

    def __len__(self) -> int:
        return self.count

    def _stamp(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.count):
            self._stamp()
            yield self.batch
        self._stamp()


def time_engine_steps(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any, torch.device], dict[str, Tensor]],
    cfg: TrainConfig,
    *,
    images: int,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeats: int = 3,
) -> list[float]:
    """Seconds of each of ``repeats`` engine training steps on ``batch``, after ``warmup`` untimed ones.

    Args:
        model: trained in place (``fit`` moves it to ``device``, channels_last when ``cfg`` says so).
        batch: what the loader would yield; ``loss_fn(model, batch, device)`` moves it to the device.
        loss_fn: the task's loss, as :class:`~mnapps.engine.loop.TaskHooks` takes it.
        cfg: the run's optimisation settings; the epochs become 1 and evaluation is off.
        images: images in ``batch`` (for the engine's progress figures).
        device: where the steps run.
        warmup: untimed steps first (allocator, oneDNN/cuDNN kernel choice).
        repeats: timed steps.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")
    device = torch.device(device)
    batches = _StampedBatches(batch, warmup + repeats, device)
    one_epoch = dataclasses.replace(cfg, epochs=1, eval_every=0, batch_size=images)
    hooks = TaskHooks(loss_fn, batch_size_fn=lambda _: images)
    with tempfile.TemporaryDirectory(prefix="mnapps-step-") as folder:
        # fit prints its epoch line on stdout; the benchmark's stdout is its table.
        with contextlib.redirect_stdout(sys.stderr):
            fit(model, batches, one_epoch, hooks, RunOptions(output_dir=folder, device=device))
    gaps = [later - earlier for earlier, later in zip(batches.stamps, batches.stamps[1:])]
    return gaps[warmup:]


def detector_loss(model: nn.Module, batch: tuple[list[Tensor], list[dict[str, Tensor]]],
                  device: torch.device) -> dict[str, Tensor]:
    """A torchvision-style detector's own loss dict on ``(images, targets)``, moved to ``device``."""
    images, targets = batch
    images = [image.to(device) for image in images]
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
    return model(images, targets)
