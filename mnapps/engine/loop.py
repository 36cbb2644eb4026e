"""The training loop shared by every mnapps head: :func:`fit` and its checkpoint/resume logic.

This module owns one epoch loop with no model-specific code: the task supplies a
``loss_fn(model, batch, device) -> {"loss_name": scalar tensor}`` (the engine sums the terms
and logs each) and optionally an ``evaluate(model, epoch) -> {"metric": float}`` callback.
Around that it does device placement and channels_last, AMP on CUDA, gradient clipping,
per-iteration lr scheduling, tqdm progress bars, DistributedDataParallel under ``torchrun``,
``last.pt``/``best.pt`` checkpoints written atomically, exact resume (model, optimiser,
scheduler, AMP scaler, history and every RNG state), and stopping on a non-finite loss
before anything is saved.

Distributed policy: ``evaluate`` runs on rank 0 only (on the unwrapped model) and its
metrics are broadcast, so every rank keeps the same history and best value; epoch loss means
are averaged over ranks; only rank 0 shows bars, prints and writes checkpoints.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mnapps.config import TrainConfig, to_dict
from mnapps.engine.checkpoint import load_checkpoint, save_checkpoint
from mnapps.engine.distributed import DistInfo, current_dist_info
from mnapps.engine.optim import build_optimizer, build_scheduler

__all__ = [
    "NonFiniteLossError",
    "fit",
    "to_device",
    "capture_rng_state",
    "restore_rng_state",
    "seed_everything",
]

LossFn = Callable[[nn.Module, Any, torch.device], Mapping[str, torch.Tensor]]
EvaluateFn = Callable[[nn.Module, int], Mapping[str, float]]


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


# ------------------------------------------------------------------------------------------
# RNG state


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and every GPU) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG state this process uses: torch, cuda (all GPUs), numpy, python."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (a missing entry leaves that RNG untouched)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "python" in state:
        random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn(
                f"checkpoint holds RNG states for {len(state['cuda'])} GPU(s) but {torch.cuda.device_count()} "
                f"are visible; CUDA RNGs were not restored",
                stacklevel=2,
            )


# ------------------------------------------------------------------------------------------
# helpers


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _default_batch_size(batch: Any) -> int:
    """Images in a batch: a tensor's first dimension, else the length of its first element."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()))
        return _default_batch_size(batch)
    if isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
        return first.shape[0] if isinstance(first, torch.Tensor) else len(first)
    return len(batch)


def _set_epoch(loader: Any, epoch: int) -> None:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if hasattr(batch_sampler, "set_epoch"):
        batch_sampler.set_epoch(epoch)


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.4f}"


def _format_terms(values: Mapping[str, float]) -> str:
    """The total ``loss`` and, when there are several, each term."""
    if len(values) == 2 and "loss" in values:  # a single term would only repeat the total
        values = {"loss": values["loss"]}
    return " ".join(f"{k} {v:.4f}" for k, v in values.items())


def _format_metrics(metrics: Mapping[str, Any], limit: int = 6) -> str:
    shown = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))][:limit]
    return " ".join(f"{k} {_format_number(v)}" for k, v in shown)


def _check_loss_dict(losses: Any, epoch: int) -> None:
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


class _Progress:
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


def _raise_non_finite(
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


def _train_one_epoch(
    model: nn.Module,
    loader: Any,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    device: torch.device,
    info: DistInfo,
    epoch: int,
    steps_per_epoch: int,
    batch_size_fn: Callable[[Any], int],
    last_path: Path,
) -> dict[str, float]:
    """One pass over ``loader``; returns the epoch's mean loss terms, lr, images/s and time."""
    model.train()
    use_amp = scaler.is_enabled()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    progress = _Progress(info.world_size)
    step_lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(
        total=steps_per_epoch,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        disable=not info.is_main,
        dynamic_ncols=True,
        leave=False,
    )
    try:
        for batch_index, batch in enumerate(loader):
            step = epoch * steps_per_epoch + batch_index + 1
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                losses = loss_fn(model, batch, device)
            _check_loss_dict(losses, epoch + 1)
            # One host sync per step: needed anyway to stop on a NaN before it reaches the weights.
            host_values = torch.stack([v.detach().float().reshape(()) for v in losses.values()]).tolist()
            terms = dict(zip(losses.keys(), host_values))
            bad_here = not all(math.isfinite(v) for v in host_values)
            bad_anywhere = bad_here
            if info.world_size > 1:
                flag = torch.tensor([1.0 if bad_here else 0.0], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                bad_anywhere = bool(flag.item() > 0)
            if bad_anywhere:
                _raise_non_finite(info, terms, bad_here, epoch + 1, step, batch_index, last_path)
            total = sum(v.float().reshape(()) for v in losses.values())
            if not total.requires_grad:
                raise ValueError(
                    f"the losses returned by loss_fn ({', '.join(losses)}) do not depend on any trainable "
                    f"parameter; is the model frozen or are the losses detached?"
                )
            scaler.scale(total).backward()
            if cfg.grad_clip_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
            step_lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            with warnings.catch_warnings():
                # GradScaler skips the optimiser step after an overflow; the schedule still advances.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                scheduler.step()

            progress.add({"loss": sum(host_values), **terms}, batch_size_fn(batch))
            if info.is_main and (batch_index % cfg.log_every == 0 or batch_index + 1 == steps_per_epoch):
                bar.set_postfix_str(
                    f"{_format_terms(progress.means())} lr {step_lr:.2e} {progress.images_per_s():.1f} img/s",
                    refresh=False,
                )
            bar.update(1)
    finally:
        bar.close()

    means = progress.means()
    if info.world_size > 1 and means:
        # Average the per-rank means so every rank (and the history) holds the global figure.
        names = sorted(means)
        packed = torch.tensor([means[n] for n in names], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        means = {n: v / info.world_size for n, v in zip(names, packed.tolist())}
        means = {"loss": means.pop("loss"), **means}
    return {
        **means,
        "lr": step_lr,  # the lr of the epoch's last step
        "images_per_s": progress.images_per_s(),
        "time_s": time.perf_counter() - progress.start,
    }


def _evaluate_on_main(evaluate: EvaluateFn, model: nn.Module, epoch: int, info: DistInfo) -> dict[str, Any]:
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


def _gather_rng_states(info: DistInfo) -> list[dict[str, Any]]:
    state = capture_rng_state()
    if info.world_size == 1:
        return [state]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def _improved(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


# ------------------------------------------------------------------------------------------
# fit


def fit(
    model: nn.Module,
    train_loader: Any,
    cfg: TrainConfig,
    *,
    loss_fn: LossFn,
    output_dir: str | os.PathLike,
    evaluate: EvaluateFn | None = None,
    best_metric: str | None = None,
    checkpoint_meta: Mapping[str, Any] | None = None,
    resume: str | os.PathLike | bool | None = None,
    device: str | torch.device = "cpu",
    batch_size_fn: Callable[[Any], int] | None = None,
    best_mode: str = "max",
) -> dict[str, Any]:
    """Train ``model`` for ``cfg.epochs`` epochs, evaluating and checkpointing as it goes.

    Args:
        model: the plain (not DDP-wrapped) model. It is moved to ``device`` (and to
            channels_last when ``cfg.channels_last``); under ``torchrun`` it is wrapped in
            DistributedDataParallel (``cfg.find_unused_parameters``) for training.
        train_loader: yields batches; if it (or its sampler) has ``set_epoch`` it is called
            with the 0-based epoch first (see :func:`mnapps.engine.distributed.build_train_loader`).
        cfg: optimiser, schedule, AMP, clipping, CPU threads, logging and evaluation settings.
        loss_fn: ``loss_fn(model, batch, device) -> {"loss_name": scalar tensor}``. It moves the
            batch to ``device`` itself, typically with
            ``to_device(batch, device, channels_last=cfg.channels_last)``. The engine sums the
            terms, logs each one and runs it under autocast when AMP is on.
        output_dir: where ``last.pt`` (every epoch) and ``best.pt`` go.
        evaluate: ``evaluate(model, epoch) -> {"metric": float}``, called every
            ``cfg.eval_every`` epochs and after the last one, on rank 0 only, with the unwrapped
            model and the 1-based number of the epoch just finished. Its metrics are broadcast
            to the other ranks.
        best_metric: key of ``evaluate``'s result that selects ``best.pt``.
        checkpoint_meta: ``{"task", "head", "config"}`` (and any other plain values) stored in
            every checkpoint; ``config`` defaults to ``{"train": cfg}`` as a plain dict.
        resume: a checkpoint path, or True for ``output_dir/last.pt``: restores model,
            optimiser, scheduler, AMP scaler, history, best value and every RNG state, and
            continues with the next epoch, so the result equals an uninterrupted run.
        device: training device of this process (``DistInfo.device`` under torchrun).
        batch_size_fn: images in a batch, for the images/s figure; default: the first
            dimension (or length) of ``batch[0]``.
        best_mode: ``"max"`` (AP, accuracy) or ``"min"`` (a loss) for ``best_metric``.

    Returns:
        ``{"epochs_run": epochs trained by this call, "history": [{"epoch", "train": mean loss
        terms + lr/images_per_s/time_s, "metrics"}] over the whole run, "best": best value or
        None, "best_metric", "last_metrics": the latest evaluation's metrics, "checkpoint":
        path of last.pt, "best_checkpoint": path of best.pt or None}``.

    Raises:
        NonFiniteLossError: a loss term became NaN/inf (nothing saved for that epoch).
        FileNotFoundError: ``resume`` names a checkpoint that does not exist.
        ValueError: inconsistent arguments (e.g. ``best_metric`` without ``evaluate``, or a
            ``best_metric`` missing from the metrics).
    """
    if not callable(loss_fn):
        raise ValueError("fit: loss_fn must be callable as loss_fn(model, batch, device) -> dict of losses")
    if best_metric is not None and evaluate is None:
        raise ValueError(f"fit: best_metric={best_metric!r} needs an evaluate callback to produce it")
    if best_mode not in ("max", "min"):
        raise ValueError(f"fit: best_mode must be 'max' or 'min', got {best_mode!r}")
    if cfg.eval_every < 0:
        raise ValueError(f"train.eval_every must be >= 0 (0 = never), got {cfg.eval_every}")
    if cfg.log_every < 1:
        raise ValueError(f"train.log_every must be >= 1, got {cfg.log_every}")
    if cfg.grad_clip_norm is not None and cfg.grad_clip_norm <= 0:
        raise ValueError(f"train.grad_clip_norm must be > 0 or null, got {cfg.grad_clip_norm}")
    if cfg.num_threads is not None:
        if cfg.num_threads < 1:
            raise ValueError(f"train.num_threads must be >= 1 or null (torch's default), got {cfg.num_threads}")
        torch.set_num_threads(cfg.num_threads)
    try:
        steps_per_epoch = len(train_loader)
    except TypeError:
        raise ValueError("fit: train_loader must have a length (a DataLoader over a map-style dataset)") from None

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # DDP needs an explicit GPU index
    info = current_dist_info(device)
    output_dir = Path(output_dir)
    last_path, best_path = output_dir / "last.pt", output_dir / "best.pt"
    batch_size_fn = batch_size_fn or _default_batch_size
    meta = dict(checkpoint_meta or {})
    meta["config"] = to_dict(meta["config"]) if meta.get("config") is not None else {"train": to_dict(cfg)}

    model = _unwrap(model)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")

    history: list[dict[str, Any]] = []
    best: float | None = None
    last_metrics: dict[str, Any] = {}
    start_epoch = 0
    if resume:
        resume_path = last_path if resume is True else Path(resume)
        checkpoint = load_checkpoint(resume_path)
        missing = [k for k in ("model", "optimizer", "scheduler", "epoch") if k not in checkpoint]
        if missing:
            raise ValueError(
                f"{resume_path} is not a training checkpoint (lacks {', '.join(missing)}); resume needs the "
                f"last.pt or best.pt written by fit"
            )
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        history = list(checkpoint.get("history", []))
        last_metrics = dict(checkpoint.get("metrics") or {})
        if checkpoint.get("best_metric") == best_metric and checkpoint.get("best_mode", "max") == best_mode:
            best = checkpoint.get("best")
        start_epoch = int(checkpoint["epoch"])
        for name, now in (("steps_per_epoch", steps_per_epoch), ("world_size", info.world_size)):
            if checkpoint.get(name) not in (None, now):
                warnings.warn(
                    f"{resume_path} was written with {name}={checkpoint[name]} but this run has {now}; "
                    f"the schedule and data order will not match the interrupted run",
                    stacklevel=2,
                )
        rng_states = checkpoint.get("rng_per_rank") or [checkpoint.get("rng") or {}]
        restore_rng_state(rng_states[info.rank] if len(rng_states) == info.world_size else rng_states[0])
        if info.is_main:
            tqdm.write(f"resumed from {resume_path} after epoch {start_epoch}/{cfg.epochs}")
    else:
        # Dropout and any other in-loop randomness start from (seed, rank), not from whatever
        # the caller consumed before.
        seed_everything(cfg.seed + info.rank)

    train_model: nn.Module = model
    if info.world_size > 1:
        train_model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )

    epochs_run = 0
    for epoch in range(start_epoch, cfg.epochs):
        _set_epoch(train_loader, epoch)
        train_stats = _train_one_epoch(
            train_model, train_loader, loss_fn, optimizer, scheduler, scaler, cfg, device, info,
            epoch, steps_per_epoch, batch_size_fn, last_path,
        )
        epochs_run += 1
        epoch_number = epoch + 1
        metrics: dict[str, Any] = {}
        due = cfg.eval_every > 0 and (epoch_number % cfg.eval_every == 0 or epoch_number == cfg.epochs)
        if evaluate is not None and due:
            metrics = _evaluate_on_main(evaluate, model, epoch_number, info)
            last_metrics = metrics
        improved = False
        if best_metric is not None and metrics:
            if best_metric not in metrics:
                raise ValueError(
                    f"best_metric {best_metric!r} is not among the evaluation metrics {sorted(metrics)}"
                )
            value = float(metrics[best_metric])
            improved = math.isfinite(value) and _improved(value, best, best_mode)
            if improved:
                best = value
        history.append({"epoch": epoch_number, "train": train_stats, "metrics": metrics})

        rng_states = _gather_rng_states(info)  # collective: every rank takes part
        if info.is_main:
            payload = {
                **meta,
                "model": model.state_dict(),
                "epoch": epoch_number,
                "metrics": last_metrics,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_states[0],
                "rng_per_rank": rng_states,
                "history": history,
                "best": best,
                "best_metric": best_metric,
                "best_mode": best_mode,
                "train_config": to_dict(cfg),
                "steps_per_epoch": steps_per_epoch,
                "world_size": info.world_size,
            }
            # best first: a kill between the two writes then leaves last.pt one epoch behind,
            # and resuming re-runs that epoch instead of believing a best.pt that was never written.
            if improved:
                save_checkpoint(payload, best_path)
            save_checkpoint(payload, last_path)
            summary = (
                f"epoch {epoch_number}/{cfg.epochs}: "
                + _format_terms({k: v for k, v in train_stats.items() if k not in ("lr", "images_per_s", "time_s")})
                + f" | lr {train_stats['lr']:.2e} | {train_stats['images_per_s']:.1f} img/s | "
                f"{train_stats['time_s']:.0f} s"
            )
            if metrics:
                summary += f" | {_format_metrics(metrics)}"
            if improved:
                summary += f" | new best {best_metric} {best:.4f} -> {best_path}"
            tqdm.write(summary)

    if epochs_run == 0 and info.is_main:
        tqdm.write(f"nothing to train: the checkpoint already holds all {cfg.epochs} epochs")
    return {
        "epochs_run": epochs_run,
        "history": history,
        "best": best,
        "best_metric": best_metric,
        "last_metrics": last_metrics,
        "checkpoint": str(last_path),
        "best_checkpoint": str(best_path) if best_path.is_file() else None,
    }
