"""What one training step of :func:`mnapps.engine.loop.fit` needs besides the loop itself.

This module owns moving batches to the device (:func:`to_device`), checking the loss dict a
task returns, stopping on a non-finite loss (:class:`NonFiniteLossError`), the running means
of an epoch (:class:`Progress`), the formatting of the per-epoch line, and running the
evaluation on rank 0 with its metrics broadcast (:func:`evaluate_on_main`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mnapps.engine.distributed import DistInfo

__all__ = [
    "NonFiniteLossError",
    "to_device",
    "unwrap",
    "default_batch_size",
    "set_epoch",
    "format_terms",
    "format_metrics",
    "check_loss_dict",
    "Progress",
    "raise_non_finite",
    "evaluate_on_main",
]


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the run stopped before saving anything.

    Attributes:
        epoch: 1-based epoch in which it happened.
        step: 1-based iteration counted over the whole run (what the lr schedule counts).
        batch_index: 0-based index of the offending batch within the epoch.
        losses: every loss term's value at that step (of the rank where it happened).
    """

    def __init__(self, message: str, *, epoch: int, step: int, batch_index: int, losses: dict[str, float]):
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.batch_index = batch_index
        self.losses = losses


def to_device(obj: Any, device: str | torch.device, channels_last: bool = False, non_blocking: bool = False) -> Any:
    """Move every tensor inside ``obj`` (nested lists, tuples, dicts) to ``device``.

    Args:
        obj: a tensor, or lists/tuples/dicts of them; other values are returned unchanged.
        device: target device.
        channels_last: store 4-D floating-point tensors (image batches) in
            ``torch.channels_last`` layout, as ``fit`` stores the model when
            ``cfg.channels_last`` is set; 3-D single images are left as they are.
        non_blocking: asynchronous host-to-GPU copies (useful with pinned memory).

    Returns:
        The same structure (a tuple stays a tuple, a dict keeps its keys) on ``device``.
    """
    if isinstance(obj, torch.Tensor):
        moved = obj.to(device, non_blocking=non_blocking)
        if channels_last and moved.dim() == 4 and moved.is_floating_point():
            moved = moved.contiguous(memory_format=torch.channels_last)
        return moved
    if isinstance(obj, Mapping):
        moved = {k: to_device(v, device, channels_last, non_blocking) for k, v in obj.items()}
        return type(obj)(moved) if isinstance(obj, dict) else moved
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(v, device, channels_last, non_blocking) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, channels_last, non_blocking) for v in obj)
    return obj


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def default_batch_size(batch: Any) -> int:
    """Images in a batch: a tensor's first dimension, else the length of its first element."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()))
        return default_batch_size(batch)
    if isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
        return first.shape[0] if isinstance(first, torch.Tensor) else len(first)
    return len(batch)


def set_epoch(loader: Any, epoch: int) -> None:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if hasattr(batch_sampler, "set_epoch"):
        batch_sampler.set_epoch(epoch)


def format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.4f}"


def format_terms(values: Mapping[str, float]) -> str:
    """The total ``loss`` and, when there are several, each term."""
    if len(values) == 2 and "loss" in values:  # a single term would only repeat the total
        values = {"loss": values["loss"]}
    return " ".join(f"{k} {v:.4f}" for k, v in values.items())


def format_metrics(metrics: Mapping[str, Any], limit: int = 6) -> str:
    shown = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))][:limit]
    return " ".join(f"{k} {format_number(v)}" for k, v in shown)


def check_loss_dict(losses: Any, epoch: int) -> None:
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError(
            f"loss_fn must return a non-empty dict of scalar loss tensors (e.g. {{'loss_cls': ...}}), "
            f"got {type(losses).__name__} in epoch {epoch}"
        )
    if "loss" in losses and len(losses) > 1:
        raise ValueError(
            f"loss_fn returned the terms {list(losses)}: 'loss' is the engine's name for their sum, "
            f"so give that term its own name (e.g. 'loss_main')"
        )
    for name, value in losses.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"loss_fn returned {name!r} = {shape}; every loss term must be a scalar tensor")


class Progress:
    """Running means of the loss terms and the image rate of one epoch."""

    def __init__(self, world_size: int) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.images = 0
        self.world_size = world_size
        self.start = time.perf_counter()

    def add(self, terms: dict[str, float], images: int) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps += 1
        self.images += images

    def means(self) -> dict[str, float]:
        return {name: total / max(1, self.steps) for name, total in self.sums.items()}

    def images_per_s(self) -> float:
        # Every rank loads the same number of images per step (drop_last), so the global
        # rate is this rank's rate times the number of ranks.
        return self.images * self.world_size / max(1e-9, time.perf_counter() - self.start)


def raise_non_finite(
    info: DistInfo, terms: dict[str, float], bad_here: bool, epoch: int, step: int, batch_index: int, last_path: Path
) -> None:
    """Build the NonFiniteLossError message (with the offending rank's values) and raise it."""
    rank, where_terms = info.rank, terms
    if info.world_size > 1:
        gathered: list[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, (info.rank, bad_here, terms))
        rank, _, where_terms = next(item for item in gathered if item[1])
    values = ", ".join(f"{k}={v:.6g}" for k, v in where_terms.items())
    place = f" on rank {rank}" if info.world_size > 1 else ""
    kept = f"the last good checkpoint {last_path} is intact" if last_path.is_file() else "no checkpoint was written"
    raise NonFiniteLossError(
        f"non-finite loss in epoch {epoch}, step {step} (batch {batch_index} of the epoch){place}: {values}; "
        f"training stopped and nothing was saved for this epoch, {kept}. Lower train.lr, add warm-up or "
        f"train.grad_clip_norm, or check that batch's data",
        epoch=epoch,
        step=step,
        batch_index=batch_index,
        losses=dict(where_terms),
    )


def evaluate_on_main(
    evaluate: Callable[[nn.Module, int], Mapping[str, float]], model: nn.Module, epoch: int, info: DistInfo
) -> dict[str, Any]:
    """Run ``evaluate`` on rank 0 and broadcast its metrics (or its failure) to every rank."""
    metrics: dict[str, Any] | None = None
    error: BaseException | None = None
    if info.is_main:
        try:
            result = evaluate(model, epoch)
            if not isinstance(result, Mapping):
                raise ValueError(f"evaluate(model, epoch) must return a dict of metrics, got {type(result).__name__}")
            numbers = (int, float, np.floating, np.integer)
            metrics = {k: float(v) if isinstance(v, numbers) else v for k, v in result.items()}
        except BaseException as exc:  # re-raised below, after the other ranks were told
            error = exc
    if info.world_size > 1:
        box = [metrics if error is None else {"__evaluation_failed__": repr(error)}]
        dist.broadcast_object_list(box, src=0)
        if not info.is_main:
            if "__evaluation_failed__" in box[0]:
                raise RuntimeError(f"evaluation failed on rank 0: {box[0]['__evaluation_failed__']}")
            metrics = box[0]
    if error is not None:
        raise error
    return metrics or {}
