"""The training loop shared by every mnapps task: :func:`fit`, its run folder and exact resume.

This module owns one epoch loop with no task-specific code: the task supplies a
``loss_fn(model, batch, device) -> {"loss_name": scalar tensor}`` (the engine sums the terms
and logs each) and optionally an ``evaluate(model, epoch) -> {"metric": float}`` callback.
Around that it does device placement and channels_last, AMP on CUDA, gradient clipping,
per-iteration lr scheduling, tqdm progress bars, DistributedDataParallel under ``torchrun``,
``last.pt``/``best.pt`` checkpoints written atomically (``last.pt`` before each evaluation, so
a crash there loses no training), exact resume (model, optimiser, scheduler, AMP scaler,
history and every RNG state, all stored as tensors and plain values so checkpoints load with
``weights_only``), refusing to start a new run over an old run's checkpoints
(:func:`check_run_folder`), and stopping on a non-finite loss before anything is saved.

The pieces of :func:`fit`, in order: ``_start_run`` builds the run state (:class:`_Run`),
``_resume`` restores it from a checkpoint, ``_train_one_epoch`` trains one epoch (with
``_host_terms`` and ``_optimizer_step`` per step), ``_finish_epoch`` checkpoints
(``_checkpoint_payload``), evaluates and prints ``_epoch_summary``.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mnapps.config import TrainConfig, to_dict
from mnapps.checkpoint import load_checkpoint, save_checkpoint
from mnapps.engine.distributed import DistInfo, current_dist_info
from mnapps.engine.optim import build_optimizer, build_scheduler
from mnapps.engine.run_log import log_epoch
from mnapps.files import remove_stale_temporaries

__all__ = [
    "NonFiniteLossError",
    "RunFolderError",
    "check_run_folder",
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
    """Every global RNG state this process uses: torch, cuda (all GPUs), numpy, python.

    Only tensors and plain Python values, so a checkpoint holding it loads with
    ``torch.load(weights_only=True)``: numpy's MT19937 state becomes ``{"name", "keys":
    int64 tensor[624], "pos", "has_gauss", "cached_gaussian"}``; python's is already a tuple
    of ints.
    """
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(saved: Any) -> Any:
    """numpy's ``set_state`` tuple from :func:`capture_rng_state`'s dict (a tuple passes through)."""
    if not isinstance(saved, Mapping):
        return saved
    keys = np.asarray(saved["keys"].numpy() if isinstance(saved["keys"], torch.Tensor) else saved["keys"])
    return (saved["name"], keys.astype(np.uint32), saved["pos"], saved["has_gauss"], saved["cached_gaussian"])


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (a missing entry leaves that RNG untouched)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        np.random.set_state(_numpy_state(state["numpy"]))
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


# ------------------------------------------------------------------------------------------
# the run folder


class RunFolderError(ValueError):
    """The run folder already holds a run's checkpoints and neither resume nor overwrite was asked."""


CHECKPOINT_NAMES = ("last.pt", "best.pt")


def check_run_folder(output_dir: str | os.PathLike, *, resume: Any, overwrite: bool) -> None:
    """Refuse to start a new run over the checkpoints of another one.

    Tasks call this before any data work, and :func:`fit` calls it again, so a re-run into an
    old folder stops at once instead of replacing its ``best.pt`` an epoch later.

    Args:
        output_dir: the run folder (need not exist yet).
        resume: the ``resume`` given to :func:`fit` (a path, True, or None/False).
        overwrite: start over in a folder that holds checkpoints (``fit`` then removes them).

    Raises:
        RunFolderError: ``output_dir`` is a file, both ``resume`` and ``overwrite`` were given,
            or it holds ``last.pt``/``best.pt`` and neither was given.
    """
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"the run folder {folder} is a file; give --output-dir a folder")
    if resume and overwrite:
        raise RunFolderError(
            f"--resume and --overwrite both given for {folder}: resume continues the run there, overwrite "
            f"starts it over; pick one"
        )
    if resume or overwrite:
        return
    found = [name for name in CHECKPOINT_NAMES if (folder / name).is_file()]
    if found:
        raise RunFolderError(
            f"{folder} already holds the checkpoints of a run ({', '.join(found)}); pass --resume to continue "
            f"it, --overwrite to start over, or --output-dir for a new folder"
        )


def _tidy_run_folder(folder: Path, overwrite: bool, resume: Any, info: DistInfo) -> None:
    """Rank 0: delete what a killed save left behind and, on ``overwrite``, the old checkpoints."""
    if not info.is_main:
        return
    for name in CHECKPOINT_NAMES:
        stale = remove_stale_temporaries(folder, name)
        if stale:
            tqdm.write(
                f"removed {len(stale)} temporary file(s) left in {folder} by a save that was interrupted: "
                + ", ".join(path.name for path in stale)
            )
    if overwrite and not resume:
        old = [folder / name for name in CHECKPOINT_NAMES if (folder / name).is_file()]
        for path in old:
            path.unlink()
        if old:
            tqdm.write(f"--overwrite: removed {', '.join(p.name for p in old)} of the previous run in {folder}")


# ------------------------------------------------------------------------------------------
# run state


@dataclass
class _Run:
    """What one :func:`fit` call trains with and has achieved so far.

    ``model`` is the plain model (checkpoints, evaluation); ``train_model`` is the same model
    or its DistributedDataParallel wrapper (training steps). ``history``, ``best`` and
    ``last_metrics`` are what a checkpoint records and a resume restores.
    """

    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    cfg: TrainConfig
    device: torch.device
    info: DistInfo
    steps_per_epoch: int
    batch_size_fn: Callable[[Any], int]
    output_dir: Path
    meta: dict[str, Any]
    best_metric: str | None
    best_mode: str
    params: list[torch.Tensor] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def last_path(self) -> Path:
        return self.output_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.output_dir / "best.pt"


def _check_fit_arguments(
    cfg: TrainConfig, train_loader: Any, loss_fn: Any, evaluate: Any, best_metric: str | None, best_mode: str
) -> int:
    """Refuse inconsistent :func:`fit` arguments; set the CPU threads; return the steps per epoch."""
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
        return len(train_loader)
    except TypeError:
        raise ValueError("fit: train_loader must have a length (a DataLoader over a map-style dataset)") from None


def _start_run(
    model: nn.Module,
    cfg: TrainConfig,
    device: str | torch.device,
    steps_per_epoch: int,
    checkpoint_meta: Mapping[str, Any] | None,
    **fields_: Any,
) -> _Run:
    """Place the model, build optimiser, schedule and AMP scaler; the run state before epoch 1."""
    meta = dict(checkpoint_meta or {})
    meta["config"] = to_dict(meta["config"]) if meta.get("config") is not None else {"train": to_dict(cfg)}
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # DDP needs an explicit GPU index
    info = current_dist_info(device)
    model = _unwrap(model)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    run = _Run(
        model=model,
        train_model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg, steps_per_epoch),
        scaler=torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda"),
        cfg=cfg,
        device=device,
        info=info,
        steps_per_epoch=steps_per_epoch,
        meta=meta,
        **fields_,
    )
    run.params = [p for group in optimizer.param_groups for p in group["params"]]
    return run


def _wrap_for_training(run: _Run) -> None:
    if run.info.world_size > 1:
        run.train_model = DistributedDataParallel(
            run.model,
            device_ids=[run.device.index] if run.device.type == "cuda" else None,
            find_unused_parameters=run.cfg.find_unused_parameters,
        )


# ------------------------------------------------------------------------------------------
# resume


def _identity(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a run trains: task, head and backbone width, from checkpoint meta or a checkpoint."""
    config = record.get("config")
    model = config.get("model") if isinstance(config, Mapping) else None
    model = model if isinstance(model, Mapping) else {}
    backbone = model.get("backbone") if isinstance(model.get("backbone"), Mapping) else model
    return {"task": record.get("task"), "head": record.get("head"), "backbone width": backbone.get("width_mult")}


def _describe(identity: Mapping[str, Any]) -> str:
    details = ", ".join(f"{key} {value}" for key, value in identity.items() if key != "task" and value is not None)
    return (f"{identity['task']} model" if identity["task"] else "model") + (f" ({details})" if details else "")


def _check_same_run(checkpoint: Mapping[str, Any], meta: Mapping[str, Any], path: Path) -> None:
    """Compare what the checkpoint is with what this run's config wants, before loading weights."""
    have, want = _identity(checkpoint), _identity(meta)
    if any(have[key] is not None and want[key] is not None and have[key] != want[key] for key in have):
        raise ValueError(
            f"cannot resume from {path}: it holds a {_describe(have)} but the config wants a {_describe(want)}; "
            f"--resume only continues the same run, to start from that checkpoint's trunk pass it as "
            f"--weights-backbone instead"
        )


def _first_lines(error: BaseException) -> str:
    """The header and first detail of a (possibly 20 kB) state-dict error, on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:2])
    return text if len(text) <= 300 else text[:297] + "..."


def _load_training_state(run: _Run, checkpoint: Mapping[str, Any], path: Path) -> None:
    """Model, optimiser, scheduler and scaler states, each refusal a one-line ValueError."""
    try:
        run.model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise ValueError(
            f"cannot resume from {path}: its weights do not fit this model ({_first_lines(error)}); to start "
            f"from that checkpoint's trunk instead, pass it as --weights-backbone"
        ) from None
    try:
        run.optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"cannot resume from {path}: its optimiser state does not fit this run ({_first_lines(error)}); "
            f"the trainable parameters or train.optimizer differ from the run that wrote it"
        ) from None
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])


def _resume(run: _Run, resume: str | os.PathLike | bool) -> tuple[int, bool]:
    """Restore a run from its checkpoint.

    Returns:
        ``(epochs already done, whether that last epoch's evaluation is still to run)``.
    """
    path = run.last_path if resume is True else Path(resume)
    checkpoint = load_checkpoint(path)
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch") if k not in checkpoint]
    if missing:
        raise ValueError(
            f"{path} is not a training checkpoint (lacks {', '.join(missing)}); resume needs the "
            f"last.pt or best.pt written by fit"
        )
    _check_same_run(checkpoint, run.meta, path)
    _load_training_state(run, checkpoint, path)
    run.history = list(checkpoint.get("history", []))
    run.last_metrics = dict(checkpoint.get("metrics") or {})
    if checkpoint.get("best_metric") == run.best_metric and checkpoint.get("best_mode", "max") == run.best_mode:
        run.best = checkpoint.get("best")
    start_epoch = int(checkpoint["epoch"])
    for name, now in (("steps_per_epoch", run.steps_per_epoch), ("world_size", run.info.world_size)):
        if checkpoint.get(name) not in (None, now):
            warnings.warn(
                f"{path} was written with {name}={checkpoint[name]} but this run has {now}; "
                f"the schedule and data order will not match the interrupted run",
                stacklevel=3,
            )
    rng_states = checkpoint.get("rng_per_rank") or [checkpoint.get("rng") or {}]
    restore_rng_state(rng_states[run.info.rank] if len(rng_states) == run.info.world_size else rng_states[0])
    pending = bool(checkpoint.get("evaluation_pending"))
    if run.info.is_main:
        tqdm.write(f"resumed from {path} after epoch {start_epoch}/{run.cfg.epochs}")
    return start_epoch, pending


# ------------------------------------------------------------------------------------------
# one epoch


def _host_terms(
    run: _Run, losses: Mapping[str, torch.Tensor], epoch: int, step: int, batch_index: int
) -> dict[str, float]:
    """The loss terms as floats; raises NonFiniteLossError when any rank has a NaN/inf term."""
    _check_loss_dict(losses, epoch)
    # One host sync per step: needed anyway to stop on a NaN before it reaches the weights.
    host_values = torch.stack([v.detach().float().reshape(()) for v in losses.values()]).tolist()
    terms = dict(zip(losses.keys(), host_values))
    bad_here = not all(math.isfinite(v) for v in host_values)
    bad_anywhere = bad_here
    if run.info.world_size > 1:
        flag = torch.tensor([1.0 if bad_here else 0.0], device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad_anywhere = bool(flag.item() > 0)
    if bad_anywhere:
        _raise_non_finite(run.info, terms, bad_here, epoch, step, batch_index, run.last_path)
    return terms


def _optimizer_step(run: _Run, losses: Mapping[str, torch.Tensor]) -> float:
    """Backward through the summed losses, clip, step, advance the schedule; returns the lr used."""
    total = sum(v.float().reshape(()) for v in losses.values())
    if not total.requires_grad:
        raise ValueError(
            f"the losses returned by loss_fn ({', '.join(losses)}) do not depend on any trainable "
            f"parameter; is the model frozen or are the losses detached?"
        )
    run.scaler.scale(total).backward()
    if run.cfg.grad_clip_norm is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.params, run.cfg.grad_clip_norm)
    step_lr = run.optimizer.param_groups[0]["lr"]
    run.scaler.step(run.optimizer)
    run.scaler.update()
    with warnings.catch_warnings():
        # GradScaler skips the optimiser step after an overflow; the schedule still advances.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        run.scheduler.step()
    return step_lr


def _mean_over_ranks(run: _Run, means: dict[str, float]) -> dict[str, float]:
    """Average the per-rank means so every rank (and the history) holds the global figure."""
    if run.info.world_size == 1 or not means:
        return means
    names = sorted(means)
    packed = torch.tensor([means[n] for n in names], dtype=torch.float64, device=run.device)
    dist.all_reduce(packed)
    means = {n: v / run.info.world_size for n, v in zip(names, packed.tolist())}
    return {"loss": means.pop("loss"), **means}


def _train_one_epoch(run: _Run, loader: Any, loss_fn: LossFn, epoch: int) -> dict[str, float]:
    """One pass over ``loader`` (0-based ``epoch``); the epoch's mean loss terms, lr, images/s, time."""
    run.train_model.train()
    progress = _Progress(run.info.world_size)
    step_lr = run.optimizer.param_groups[0]["lr"]
    steps = run.steps_per_epoch
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{run.cfg.epochs}", disable=not run.info.is_main,
               dynamic_ncols=True, leave=False)  # fmt: skip
    try:
        for batch_index, batch in enumerate(loader):
            run.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=run.device.type, enabled=run.scaler.is_enabled()):
                losses = loss_fn(run.train_model, batch, run.device)
            terms = _host_terms(run, losses, epoch + 1, epoch * steps + batch_index + 1, batch_index)
            step_lr = _optimizer_step(run, losses)
            progress.add({"loss": sum(terms.values()), **terms}, run.batch_size_fn(batch))
            if run.info.is_main and (batch_index % run.cfg.log_every == 0 or batch_index + 1 == steps):
                bar.set_postfix_str(
                    f"{_format_terms(progress.means())} lr {step_lr:.2e} {progress.images_per_s():.1f} img/s",
                    refresh=False,
                )
            bar.update(1)
    finally:
        bar.close()
    return {
        **_mean_over_ranks(run, progress.means()),
        "lr": step_lr,  # the lr of the epoch's last step
        "images_per_s": progress.images_per_s(),
        "time_s": time.perf_counter() - progress.start,
    }


# ------------------------------------------------------------------------------------------
# evaluation, checkpoints and the epoch summary


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


def _checkpoint_payload(run: _Run, epoch_number: int, rng_states: list[dict[str, Any]], pending: bool) -> dict:
    """Everything a checkpoint holds: the task's meta, weights, and what an exact resume needs.

    ``evaluation_pending`` marks a ``last.pt`` written after training an epoch but before its
    evaluation (RNG states as they were before it); resuming from it runs that evaluation first.
    """
    return {
        **run.meta,
        "model": run.model.state_dict(),
        "epoch": epoch_number,
        "metrics": run.last_metrics,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng_states[0],
        "rng_per_rank": rng_states,
        "history": run.history,
        "best": run.best,
        "best_metric": run.best_metric,
        "best_mode": run.best_mode,
        "evaluation_pending": pending,
        "train_config": to_dict(run.cfg),
        "steps_per_epoch": run.steps_per_epoch,
        "world_size": run.info.world_size,
    }


def _save(run: _Run, epoch_number: int, *, improved: bool, pending: bool) -> None:
    """Write ``best.pt`` (when ``improved``) and ``last.pt`` on rank 0; every rank must call it."""
    rng_states = _gather_rng_states(run.info)  # collective: every rank takes part
    if not run.info.is_main:
        return
    payload = _checkpoint_payload(run, epoch_number, rng_states, pending)
    # best first: a kill between the two writes then leaves last.pt one epoch behind,
    # and resuming re-runs that epoch instead of believing a best.pt that was never written.
    if improved:
        save_checkpoint(payload, run.best_path)
    save_checkpoint(payload, run.last_path)


def _epoch_summary(run: _Run, entry: Mapping[str, Any], improved: bool) -> str:
    """The one line printed per epoch: mean losses, lr, speed, time, metrics, a new best."""
    stats, metrics = entry["train"], entry["metrics"]
    summary = (
        f"epoch {entry['epoch']}/{run.cfg.epochs}: "
        + _format_terms({k: v for k, v in stats.items() if k not in ("lr", "images_per_s", "time_s")})
        + f" | lr {stats['lr']:.2e} | {stats['images_per_s']:.1f} img/s | {stats['time_s']:.0f} s"
    )
    if metrics:
        summary += f" | {_format_metrics(metrics)}"
    if improved:
        summary += f" | new best {run.best_metric} {run.best:.4f} -> {run.best_path}"
    return summary


def _evaluate_epoch(run: _Run, evaluate: EvaluateFn, epoch_number: int) -> bool:
    """Evaluate after ``epoch_number`` (1-based), fill its history entry; True on a new best."""
    metrics = _evaluate_on_main(evaluate, run.model, epoch_number, run.info)
    run.last_metrics = metrics
    run.history[-1]["metrics"] = metrics
    if run.best_metric is None or not metrics:
        return False
    if run.best_metric not in metrics:
        raise ValueError(f"best_metric {run.best_metric!r} is not among the evaluation metrics {sorted(metrics)}")
    value = float(metrics[run.best_metric])
    improved = math.isfinite(value) and _improved(value, run.best, run.best_mode)
    if improved:
        run.best = value
    return improved


def _finish_epoch(run: _Run, evaluate: EvaluateFn | None, epoch_number: int, *, trained: bool = True) -> None:
    """Checkpoint, evaluate when due, checkpoint again, print the summary.

    ``last.pt`` is written before the evaluation, so a crash or kill during it loses no
    training; ``trained=False`` finishes an epoch whose checkpoint was already written that way.
    """
    cfg = run.cfg
    due = evaluate is not None and cfg.eval_every > 0 and (
        epoch_number % cfg.eval_every == 0 or epoch_number == cfg.epochs
    )
    if trained:
        _save(run, epoch_number, improved=False, pending=due)
    improved = False
    if due:
        improved = _evaluate_epoch(run, evaluate, epoch_number)
        _save(run, epoch_number, improved=improved, pending=False)
    if run.info.is_main:
        tqdm.write(_epoch_summary(run, run.history[-1], improved))
        log_epoch(run.output_dir, run.history)  # metrics.csv, results.png, TensorBoard


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
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``model`` for ``cfg.epochs`` epochs, evaluating and checkpointing as it goes.

    Args:
        model: the plain (not DDP-wrapped) model; moved to ``device`` (channels_last when
            ``cfg.channels_last``) and wrapped in DDP under ``torchrun``.
        train_loader: yields batches; its (or its sampler's) ``set_epoch`` is called with the
            0-based epoch first (see :func:`mnapps.engine.distributed.build_train_loader`).
        cfg: optimiser, schedule, AMP, clipping, CPU threads, logging and evaluation settings.
        loss_fn: ``loss_fn(model, batch, device) -> {"loss_name": scalar tensor}``; it moves the
            batch itself (``to_device(batch, device, channels_last=cfg.channels_last)``). The
            engine sums the terms, logs each and runs it under autocast when AMP is on.
        output_dir: where ``last.pt`` (each epoch, before and after its evaluation) and
            ``best.pt`` go; temporaries a killed save left there are removed at start.
        evaluate: ``evaluate(model, epoch) -> {"metric": float}``, every ``cfg.eval_every``
            epochs and after the last, on rank 0 only (unwrapped model, 1-based epoch just
            finished); its metrics are broadcast to the other ranks.
        best_metric: key of ``evaluate``'s result that selects ``best.pt``.
        checkpoint_meta: ``{"task", "head", "config"}`` (and other plain values) stored in every
            checkpoint; ``config`` defaults to ``{"train": cfg}``. A resumed checkpoint must
            match its task, head and ``config.model.backbone.width_mult``.
        resume: a checkpoint path, or True for ``output_dir/last.pt``: restores model,
            optimiser, scheduler, AMP scaler, history, best value and every RNG state, runs an
            evaluation a kill interrupted, and continues, equal to an uninterrupted run.
        device: training device of this process (``DistInfo.device`` under torchrun).
        batch_size_fn: images in a batch (for images/s); default: first dimension of ``batch[0]``.
        best_mode: ``"max"`` (AP, accuracy) or ``"min"`` (a loss) for ``best_metric``.
        overwrite: start over in an ``output_dir`` holding checkpoints (they are removed).

    Returns:
        ``{"epochs_run": epochs trained by this call, "history": [{"epoch", "train": mean loss
        terms + lr/images_per_s/time_s, "metrics"}] over the whole run, "best", "best_metric",
        "last_metrics": the latest evaluation's, "checkpoint": last.pt, "best_checkpoint":
        best.pt or None}``.

    Raises:
        NonFiniteLossError: a loss term became NaN/inf (nothing saved for that epoch).
        FileNotFoundError: ``resume`` names a checkpoint that does not exist.
        RunFolderError: ``output_dir`` holds checkpoints and neither ``resume`` nor ``overwrite``.
        ValueError: inconsistent arguments, a ``best_metric`` missing from the metrics, or a
            ``resume`` checkpoint of another task, head, width or model.
    """
    steps_per_epoch = _check_fit_arguments(cfg, train_loader, loss_fn, evaluate, best_metric, best_mode)
    check_run_folder(output_dir, resume=resume, overwrite=overwrite)
    run = _start_run(
        model, cfg, device, steps_per_epoch, checkpoint_meta, batch_size_fn=batch_size_fn or _default_batch_size,
        output_dir=Path(output_dir), best_metric=best_metric, best_mode=best_mode,
    )  # fmt: skip
    _tidy_run_folder(run.output_dir, overwrite, resume, run.info)
    start_epoch, pending = 0, False
    if resume:
        start_epoch, pending = _resume(run, resume)
    else:
        # Dropout and any other in-loop randomness start from (seed, rank), not from whatever
        # the caller consumed before.
        seed_everything(cfg.seed + run.info.rank)
    _wrap_for_training(run)
    if pending:
        _finish_epoch(run, evaluate, start_epoch, trained=False)
    for epoch in range(start_epoch, cfg.epochs):
        _set_epoch(train_loader, epoch)
        train_stats = _train_one_epoch(run, train_loader, loss_fn, epoch)
        run.history.append({"epoch": epoch + 1, "train": train_stats, "metrics": {}})
        _finish_epoch(run, evaluate, epoch + 1)
    return _fit_result(run, epochs_run=max(0, cfg.epochs - start_epoch))


def _fit_result(run: _Run, epochs_run: int) -> dict[str, Any]:
    if epochs_run == 0 and run.info.is_main:
        tqdm.write(f"nothing to train: the checkpoint already holds all {run.cfg.epochs} epochs")
    return {
        "epochs_run": epochs_run,
        "history": run.history,
        "best": run.best,
        "best_metric": run.best_metric,
        "last_metrics": run.last_metrics,
        "checkpoint": str(run.last_path),
        "best_checkpoint": str(run.best_path) if run.best_path.is_file() else None,
    }
