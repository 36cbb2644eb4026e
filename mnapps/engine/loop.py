"""The training loop shared by every mnapps task: :func:`fit`, its run folder and exact resume.

This module owns one epoch loop with no task-specific code: the task supplies its
:class:`TaskHooks` (a ``loss_fn(model, batch, device) -> {"loss_name": scalar tensor}``, whose
terms the engine sums and logs, and optionally an ``evaluate(model, epoch)`` callback) and
:class:`RunOptions` (run folder, resume, device, what the checkpoints record).
Around that it does device placement and channels_last, AMP on CUDA, gradient clipping,
per-iteration lr scheduling, tqdm progress bars, DistributedDataParallel under ``torchrun``,
``last.pt``/``best.pt`` checkpoints written atomically (``last.pt`` before each evaluation, so
a crash there loses no training), exact resume (model, optimiser, scheduler, AMP scaler,
history and every RNG state, all stored as tensors and plain values so checkpoints load with
``weights_only``, through :class:`mnapps.checkpoint.Checkpoint`), refusing to start a new run
over an old run's checkpoints (:mod:`mnapps.engine.run_folder`), and stopping on a non-finite
loss before anything is saved (:mod:`mnapps.engine.steps`).

The pieces of :func:`fit`, in order: ``_start_run`` builds the run state (:class:`_Run`),
``_resume`` restores it from a checkpoint, ``_train_one_epoch`` trains one epoch (with
``_host_terms`` and ``_optimizer_step`` per step), ``_finish_epoch`` checkpoints
(``_checkpoint``), evaluates and prints ``_epoch_summary``. The per-epoch point, where an
epoch's history entry is made, is the epoch loop at the end of :func:`fit`.

Distributed policy: ``evaluate`` runs on rank 0 only (on the unwrapped model) and its
metrics are broadcast, so every rank keeps the same history and best value; epoch loss means
are averaged over ranks; only rank 0 shows bars, prints and writes checkpoints.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mnapps.checkpoint import Checkpoint, TrainingState, read_checkpoint
from mnapps.config import TrainConfig, to_dict
from mnapps.engine.distributed import DistInfo, current_dist_info
from mnapps.engine.optim import build_optimizer, build_scheduler
from mnapps.engine.rng import capture_rng_state, restore_rng_state, seed_everything
from mnapps.engine.run_folder import CHECKPOINT_NAMES, RunFolderError, check_run_folder, tidy_run_folder
from mnapps.engine.steps import (
    NonFiniteLossError,
    Progress,
    check_loss_dict,
    default_batch_size,
    evaluate_on_main,
    format_metrics,
    format_terms,
    raise_non_finite,
    set_epoch,
    to_device,
    unwrap,
)
from mnapps.engine.result import EpochRecord, EpochStats, FitResult
from mnapps.engine.run_log import log_epoch

__all__ = [
    "TaskHooks",
    "RunOptions",
    "fit",
    "FitResult",
    "EpochRecord",
    "EpochStats",
    # defined in engine.steps, engine.rng and engine.run_folder; importable from here as before
    "NonFiniteLossError",
    "RunFolderError",
    "CHECKPOINT_NAMES",
    "check_run_folder",
    "to_device",
    "capture_rng_state",
    "restore_rng_state",
    "seed_everything",
]

LossFn = Callable[[nn.Module, Any, torch.device], Mapping[str, torch.Tensor]]
EvaluateFn = Callable[[nn.Module, int], Mapping[str, float]]


@dataclass(frozen=True)
class TaskHooks:
    """What the task supplies to :func:`fit`: how to score a batch and the model.

    Attributes:
        loss_fn: ``loss_fn(model, batch, device) -> {"loss_name": scalar tensor}``; it moves the
            batch itself (``to_device(batch, device, channels_last=cfg.channels_last)``). The
            engine sums the terms, logs each and runs it under autocast when AMP is on.
        evaluate: ``evaluate(model, epoch) -> {"metric": float}``, every ``cfg.eval_every``
            epochs and after the last, on rank 0 only (unwrapped model, 1-based epoch just
            finished); its metrics are broadcast to the other ranks.
        best_metric: key of ``evaluate``'s result that selects ``best.pt``.
        best_mode: ``"max"`` (AP, accuracy) or ``"min"`` (a loss) for ``best_metric``.
        batch_size_fn: images in a batch (for images/s); default: first dimension of ``batch[0]``.
    """

    loss_fn: LossFn
    evaluate: EvaluateFn | None = None
    best_metric: str | None = None
    best_mode: str = "max"
    batch_size_fn: Callable[[Any], int] | None = None


@dataclass(frozen=True)
class RunOptions:
    """Where and as what :func:`fit` runs.

    Attributes:
        output_dir: where ``last.pt`` (each epoch, before and after its evaluation) and
            ``best.pt`` go; temporaries a killed save left there are removed at start.
        resume: a checkpoint path, or True for ``output_dir/last.pt``: restores model,
            optimiser, scheduler, AMP scaler, history, best value and every RNG state, runs an
            evaluation a kill interrupted, and continues, equal to an uninterrupted run.
        overwrite: start over in an ``output_dir`` holding checkpoints (they are removed).
        device: training device of this process (``DistInfo.device`` under torchrun).
        task, head, config: what every checkpoint records (``config`` defaults to ``{"train": cfg}``);
            a resumed checkpoint must match its task, head and ``config.model.backbone.width_mult``.
        folder_checked: the caller already ran :func:`check_run_folder` before its data work (the
            training skeleton does), so fit does not repeat it.
    """

    output_dir: str | os.PathLike
    resume: str | os.PathLike | bool | None = None
    overwrite: bool = False
    device: str | torch.device = "cpu"
    task: str | None = None
    head: str | None = None
    config: Any = None
    folder_checked: bool = False


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
    identity: Checkpoint  # task, head and config, without weights: what every checkpoint records
    best_metric: str | None
    best_mode: str
    params: list[torch.Tensor] = field(default_factory=list)
    history: list[EpochRecord] = field(default_factory=list)
    best: float | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def last_path(self) -> Path:
        return self.output_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.output_dir / "best.pt"


def _check_fit_arguments(cfg: TrainConfig, train_loader: Any, hooks: TaskHooks) -> int:
    """Refuse inconsistent :func:`fit` arguments; set the CPU threads; return the steps per epoch."""
    if not callable(hooks.loss_fn):
        raise ValueError("fit: loss_fn must be callable as loss_fn(model, batch, device) -> dict of losses")
    if hooks.best_metric is not None and hooks.evaluate is None:
        raise ValueError(f"fit: best_metric={hooks.best_metric!r} needs an evaluate callback to produce it")
    if hooks.best_mode not in ("max", "min"):
        raise ValueError(f"fit: best_mode must be 'max' or 'min', got {hooks.best_mode!r}")
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


def _start_run(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int, hooks: TaskHooks, options: RunOptions) -> _Run:
    """Place the model, build optimiser, schedule and AMP scaler; the run state before epoch 1."""
    config = to_dict(options.config) if options.config is not None else {"train": to_dict(cfg)}
    device = torch.device(options.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # DDP needs an explicit GPU index
    info = current_dist_info(device)
    model = unwrap(model)
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
        batch_size_fn=hooks.batch_size_fn or default_batch_size,
        output_dir=Path(options.output_dir),
        identity=Checkpoint(task=options.task, head=options.head, config=config, weights={}),
        best_metric=hooks.best_metric,
        best_mode=hooks.best_mode,
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


def _describe(checkpoint: Checkpoint) -> str:
    details = ", ".join(f"{key} {value}" for key, value in checkpoint.identity().items()
                        if key != "task" and value is not None)
    return (f"{checkpoint.task} model" if checkpoint.task else "model") + (f" ({details})" if details else "")


def _check_same_run(checkpoint: Checkpoint, wanted: Checkpoint, path: Path) -> None:
    """Compare what the checkpoint is with what this run's config wants, before loading weights."""
    have, want = checkpoint.identity(), wanted.identity()
    if any(have[key] is not None and want[key] is not None and have[key] != want[key] for key in have):
        raise ValueError(
            f"cannot resume from {path}: it holds a {_describe(checkpoint)} but the config wants a "
            f"{_describe(wanted)}; --resume only continues the same run, to start from that checkpoint's trunk "
            f"pass it as --weights-backbone instead"
        )


def _first_lines(error: BaseException) -> str:
    """The header and first detail of a (possibly 20 kB) state-dict error, on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:2])
    return text if len(text) <= 300 else text[:297] + "..."


def _load_training_state(run: _Run, checkpoint: Checkpoint, state: TrainingState, path: Path) -> None:
    """Model, optimiser, scheduler and scaler states, each refusal a one-line ValueError."""
    try:
        run.model.load_state_dict(checkpoint.weights)
    except RuntimeError as error:
        raise ValueError(
            f"cannot resume from {path}: its weights do not fit this model ({_first_lines(error)}); to start "
            f"from that checkpoint's trunk instead, pass it as --weights-backbone"
        ) from None
    try:
        run.optimizer.load_state_dict(state.optimizer)
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"cannot resume from {path}: its optimiser state does not fit this run ({_first_lines(error)}); "
            f"the trainable parameters or train.optimizer differ from the run that wrote it"
        ) from None
    run.scheduler.load_state_dict(state.scheduler)
    if state.scaler:
        run.scaler.load_state_dict(state.scaler)


def _resume(run: _Run, resume: str | os.PathLike | bool) -> tuple[int, bool]:
    """Restore a run from its checkpoint.

    Returns:
        ``(epochs already done, whether that last epoch's evaluation is still to run)``.
    """
    path = run.last_path if resume is True else Path(resume)
    checkpoint = read_checkpoint(path)
    state = checkpoint.training
    if state is None:
        raise ValueError(
            f"{path} is not a training checkpoint (lacks the optimizer and scheduler states); resume needs the "
            f"last.pt or best.pt written by fit"
        )
    _check_same_run(checkpoint, run.identity, path)
    _load_training_state(run, checkpoint, state, path)
    run.history = [EpochRecord.from_dict(entry) for entry in state.history]
    run.last_metrics = dict(checkpoint.metrics)
    if state.best_metric == run.best_metric and state.best_mode == run.best_mode:
        run.best = state.best
    start_epoch = checkpoint.epoch
    for name, then, now in (("steps_per_epoch", state.steps_per_epoch, run.steps_per_epoch),
                            ("world_size", state.world_size, run.info.world_size)):
        if then not in (None, now):
            warnings.warn(
                f"{path} was written with {name}={then} but this run has {now}; "
                f"the schedule and data order will not match the interrupted run",
                stacklevel=3,
            )
    restore_rng_state(state.rng_for(run.info.rank, run.info.world_size))
    if run.info.is_main:
        tqdm.write(f"resumed from {path} after epoch {start_epoch}/{run.cfg.epochs}")
    return start_epoch, state.evaluation_pending


# ------------------------------------------------------------------------------------------
# one epoch


def _host_terms(
    run: _Run, losses: Mapping[str, torch.Tensor], epoch: int, step: int, batch_index: int
) -> dict[str, float]:
    """The loss terms as floats; raises NonFiniteLossError when any rank has a NaN/inf term."""
    check_loss_dict(losses, epoch)
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
        raise_non_finite(run.info, terms, bad_here, epoch, step, batch_index, run.last_path)
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


def _train_one_epoch(run: _Run, loader: Any, loss_fn: LossFn, epoch: int) -> EpochStats:
    """One pass over ``loader`` (0-based ``epoch``); the epoch's mean loss terms, lr, images/s, time."""
    run.train_model.train()
    progress = Progress(run.info.world_size)
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
                    f"{format_terms(progress.means())} lr {step_lr:.2e} {progress.images_per_s():.1f} img/s",
                    refresh=False,
                )
            bar.update(1)
    finally:
        bar.close()
    return EpochStats(
        losses=_mean_over_ranks(run, progress.means()),
        lr=step_lr,  # the lr of the epoch's last step
        images_per_s=progress.images_per_s(),
        time_s=time.perf_counter() - progress.start,
    )


# ------------------------------------------------------------------------------------------
# evaluation, checkpoints and the epoch summary


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


def _checkpoint(run: _Run, epoch_number: int, rng_states: list[dict[str, Any]], pending: bool) -> Checkpoint:
    """Everything a checkpoint holds: the task's identity, weights, and what an exact resume needs.

    ``evaluation_pending`` marks a ``last.pt`` written after training an epoch but before its
    evaluation (RNG states as they were before it); resuming from it runs that evaluation first.
    """
    state = TrainingState(
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        scaler=run.scaler.state_dict(),
        rng_per_rank=rng_states,
        history=[entry.to_dict() for entry in run.history],
        best=run.best,
        best_metric=run.best_metric,
        best_mode=run.best_mode,
        evaluation_pending=pending,
        train_config=to_dict(run.cfg),
        steps_per_epoch=run.steps_per_epoch,
        world_size=run.info.world_size,
    )
    return Checkpoint(
        task=run.identity.task, head=run.identity.head, config=run.identity.config, weights=run.model.state_dict(),
        epoch=epoch_number, metrics=run.last_metrics, training=state,
    )


def _save(run: _Run, epoch_number: int, *, improved: bool, pending: bool) -> None:
    """Write ``best.pt`` (when ``improved``) and ``last.pt`` on rank 0; every rank must call it."""
    rng_states = _gather_rng_states(run.info)  # collective: every rank takes part
    if not run.info.is_main:
        return
    checkpoint = _checkpoint(run, epoch_number, rng_states, pending)
    # best first: a kill between the two writes then leaves last.pt one epoch behind,
    # and resuming re-runs that epoch instead of believing a best.pt that was never written.
    if improved:
        checkpoint.save(run.best_path)
    checkpoint.save(run.last_path)


def _epoch_summary(run: _Run, entry: EpochRecord, improved: bool) -> str:
    """The one line printed per epoch: mean losses, lr, speed, time, metrics, a new best."""
    stats, metrics = entry.train, entry.metrics
    summary = (
        f"epoch {entry.epoch}/{run.cfg.epochs}: "
        + format_terms(stats.losses)
        + f" | lr {stats.lr:.2e} | {stats.images_per_s:.1f} img/s | {stats.time_s:.0f} s"
    )
    if metrics:
        summary += f" | {format_metrics(metrics)}"
    if improved:
        summary += f" | new best {run.best_metric} {run.best:.4f} -> {run.best_path}"
    return summary


def _evaluate_epoch(run: _Run, evaluate: EvaluateFn, epoch_number: int) -> bool:
    """Evaluate after ``epoch_number`` (1-based), fill its history entry; True on a new best."""
    metrics = evaluate_on_main(evaluate, run.model, epoch_number, run.info)
    run.last_metrics = metrics
    run.history[-1].metrics = metrics
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


def fit(model: nn.Module, train_loader: Any, cfg: TrainConfig, hooks: TaskHooks, options: RunOptions) -> FitResult:
    """Train ``model`` for ``cfg.epochs`` epochs, evaluating and checkpointing as it goes.

    Args:
        model: the plain (not DDP-wrapped) model; moved to ``options.device`` (channels_last
            when ``cfg.channels_last``) and wrapped in DDP under ``torchrun``.
        train_loader: yields batches; its (or its sampler's) ``set_epoch`` is called with the
            0-based epoch first (see :func:`mnapps.engine.distributed.build_train_loader`).
        cfg: optimiser, schedule, AMP, clipping, CPU threads, logging and evaluation settings.
        hooks: the task's loss, evaluation and best-checkpoint choice (:class:`TaskHooks`).
        options: run folder, resume/overwrite, device and checkpoint identity (:class:`RunOptions`).

    Returns:
        A :class:`mnapps.engine.result.FitResult`: the epochs this call trained, the whole
        run's history (an :class:`EpochRecord` per epoch), the best value, the latest metrics,
        ``last.pt`` and ``best.pt`` (None when never written).

    Raises:
        NonFiniteLossError: a loss term became NaN/inf (nothing saved for that epoch).
        FileNotFoundError: ``resume`` names a checkpoint that does not exist.
        RunFolderError: ``output_dir`` holds checkpoints and neither ``resume`` nor ``overwrite``.
        ValueError: inconsistent arguments, a ``best_metric`` missing from the metrics, or a
            ``resume`` checkpoint of another task, head, width or model.
    """
    steps_per_epoch = _check_fit_arguments(cfg, train_loader, hooks)
    if not options.folder_checked:
        check_run_folder(options.output_dir, resume=options.resume, overwrite=options.overwrite)
    run = _start_run(model, cfg, steps_per_epoch, hooks, options)
    tidy_run_folder(run.output_dir, options.overwrite, options.resume, run.info)
    start_epoch, pending = 0, False
    if options.resume:
        start_epoch, pending = _resume(run, options.resume)
    else:
        # Dropout and any other in-loop randomness start from (seed, rank), not from whatever
        # the caller consumed before.
        seed_everything(cfg.seed + run.info.rank)
    _wrap_for_training(run)
    if pending:
        _finish_epoch(run, hooks.evaluate, start_epoch, trained=False)
    for epoch in range(start_epoch, cfg.epochs):
        set_epoch(train_loader, epoch)
        train_stats = _train_one_epoch(run, train_loader, hooks.loss_fn, epoch)
        # The per-epoch point: the epoch's history entry is made here and _finish_epoch
        # checkpoints, evaluates (filling its metrics) and prints the epoch line.
        run.history.append(EpochRecord(epoch + 1, train_stats))
        _finish_epoch(run, hooks.evaluate, epoch + 1)
    return _fit_result(run, epochs_run=max(0, cfg.epochs - start_epoch))


def _fit_result(run: _Run, epochs_run: int) -> FitResult:
    if epochs_run == 0 and run.info.is_main:
        tqdm.write(f"nothing to train: the checkpoint already holds all {run.cfg.epochs} epochs")
    return FitResult(
        epochs_run=epochs_run,
        history=list(run.history),
        best=run.best,
        best_metric=run.best_metric,
        last_metrics=dict(run.last_metrics),
        checkpoint=run.last_path,
        best_checkpoint=run.best_path if run.best_path.is_file() else None,
    )
