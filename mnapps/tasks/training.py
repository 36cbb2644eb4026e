"""The one training skeleton every task runs: folder check, data, seeded model, config, fit.

This module owns the order of a training run, written once (detectron2's ``DefaultTrainer``
as plain functions): :func:`train_task` checks the run folder once, before any data work; lets
the task prepare its data (which writes what the data decided, such as the classes, into the
config); seeds every RNG with ``train.seed`` and builds the model, so the same seed gives the
same initial weights in every task; applies the one weights precedence (nothing when resuming,
else ``--weights-backbone``, else ``model.backbone.weights``); on rank 0 saves the resolved
``config.yaml`` and prints the task's description and the backbone load report; and calls
:func:`mnapps.engine.loop.fit` with the task's hooks. Each task supplies only what differs, as
the callbacks of :class:`TaskSteps`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from mnapps.config import TaskConfig, save_config
from mnapps.engine.distributed import DistInfo, run_distributed
from mnapps.engine.loop import RunOptions, TaskHooks, fit
from mnapps.engine.rng import seed_everything
from mnapps.engine.run_folder import check_run_folder

__all__ = ["RunRequest", "TaskSteps", "Trained", "initial_weights", "build_seeded", "train_task", "launch"]

WeightsPath = str | os.PathLike | None


@dataclass(frozen=True)
class RunRequest:
    """What the user asked of a training run (the tools' ``--output-dir``, ``--resume``, ...).

    Every task's entry point (``train_detector``, ``train_classifier``, ``distill_face``) takes
    these fields as keyword arguments and hands them to :func:`launch`.

    Attributes:
        output_dir: the run folder.
        resume: a checkpoint to continue from, or True for ``output_dir/last.pt``.
        overwrite: start over in a folder that already holds checkpoints.
        weights_backbone: initial weights that win over ``model.backbone.weights``.
    """

    output_dir: str | os.PathLike
    resume: str | os.PathLike | bool | None = None
    overwrite: bool = False
    weights_backbone: WeightsPath = None


@dataclass(frozen=True)
class TaskSteps:
    """What a task plugs into :func:`train_task`.

    Attributes:
        task, head: what the checkpoints record (``head`` None for a task without heads).
        prepare: ``prepare(cfg, info) -> (cfg, data)``: datasets and checks that would otherwise
            fail late; the returned config holds what the data decided.
        build: ``build(cfg, weights, data) -> model``: the initial model (``weights`` as
            :func:`initial_weights` resolved them); runs right after seeding.
        start: ``start(cfg, model, data, info) -> (train_loader, TaskHooks)``: runs after the
            config is saved; it may do rank-0 work before training (e.g. reference points).
        describe: ``describe(cfg, model, data) -> lines`` rank 0 prints before training.
    """

    task: str
    head: str | None
    prepare: Callable[[Any, DistInfo], tuple[Any, Any]]
    build: Callable[[Any, WeightsPath, Any], nn.Module]
    start: Callable[[Any, nn.Module, Any, DistInfo], tuple[Any, TaskHooks]]
    describe: Callable[[Any, nn.Module, Any], Iterable[str]] = lambda cfg, model, data: ()


@dataclass
class Trained:
    """What :func:`train_task` returns: the final config, the task's data, the model and fit's result."""

    cfg: Any
    data: Any
    model: nn.Module
    fit: dict[str, Any]


def initial_weights(request: RunRequest, configured: WeightsPath) -> WeightsPath:
    """The weights a new model starts from: none when resuming (the checkpoint brings them),
    else ``--weights-backbone``, else the config's ``model.backbone.weights``."""
    if request.resume:
        return None
    return request.weights_backbone or configured


def build_seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` right after :func:`seed_everything`, so initial weights depend only on ``seed``."""
    seed_everything(seed)
    return build()


def launch(
    worker: Callable[..., Any], cfg: TaskConfig, device: str | torch.device | None, run: Mapping[str, Any], **options: Any
) -> Any:
    """Start a training: ``worker(cfg, RunRequest(**run), info=<DistInfo>, **options)`` in this
    process, or in every process under ``torchrun`` (:func:`mnapps.engine.distributed.run_distributed`).

    ``run`` holds the :class:`RunRequest` fields a task's entry point took as keywords
    (``output_dir`` required; ``resume``, ``overwrite``, ``weights_backbone``); a misspelt one is a
    TypeError naming it.
    """
    return run_distributed(worker, device, cfg, RunRequest(**run), **options)


def train_task(cfg: TaskConfig, request: RunRequest, info: DistInfo, steps: TaskSteps) -> Trained:
    """Run one training of ``steps.task`` (see the module docstring for the order)."""
    output_dir = Path(request.output_dir)
    # Before any data work: a finished run's best.pt must not be replaced by accident.
    check_run_folder(output_dir, resume=bool(request.resume), overwrite=request.overwrite)
    cfg, data = steps.prepare(cfg, info)
    weights = initial_weights(request, cfg.model.backbone.weights)
    model = build_seeded(cfg.train.seed, lambda: steps.build(cfg, weights, data)).to(info.device)
    if info.is_main:
        save_config(cfg, output_dir / "config.yaml")
        for line in steps.describe(cfg, model, data):
            print(line)
        if getattr(model, "backbone_load_report", None) is not None:
            print(f"backbone: {model.backbone_load_report}")
    loader, hooks = steps.start(cfg, model, data, info)
    options = RunOptions(
        output_dir, resume=request.resume, overwrite=request.overwrite, device=info.device, task=steps.task,
        head=steps.head, config=cfg, folder_checked=True,
    )
    return Trained(cfg=cfg, data=data, model=model, fit=fit(model, loader, cfg.train, hooks, options))
