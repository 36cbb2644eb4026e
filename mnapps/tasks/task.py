"""The task contract: the abstract :class:`Task` each mnapps task implements, and its one training order.

This module owns what a task is to the rest of mnapps. A task (detection, classification, face)
is one subclass of :class:`Task`; :data:`mnapps.tasks.table.TASKS` holds one instance of each,
and export, evaluation and the tools reach a task only through its methods: build and train a
model (:meth:`Task.train`), load a checkpoint (:meth:`Task.load`), name its data
(:meth:`Task.datasets`, :meth:`Task.image_files`), describe its ONNX graph (:meth:`Task.export`)
and score a checkpoint (:meth:`Task.evaluate`).

:meth:`Task.train` writes the order of a training run once (detectron2's ``DefaultTrainer``
without its hooks registry): check the run folder before any data work; let the task prepare
its data and its per-run state (a dataclass derived from :class:`TaskRun`, which holds the
config the data completed); seed every RNG with ``train.seed`` and build the model, so the
same seed gives the same initial weights in every task; apply the one weights precedence
(nothing when resuming, else ``--weights-backbone``, else ``model.backbone.weights``); on
rank 0 save the resolved ``config.yaml`` and print the task's description and the trunk's load
report; let the task start (loaders, rank-0 work before training); run
:func:`mnapps.engine.loop.fit` with the task's :meth:`~Task.training_step` and
:meth:`~Task.evaluate_epoch`; and hand fit's :class:`~mnapps.engine.result.FitResult` to the
task's :meth:`~Task.finish`, which returns the task's own typed result.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, ClassVar, Generic, Iterable, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mnapps.checkpoint import Checkpoint
from mnapps.config import TaskConfig, save_config
from mnapps.engine.distributed import DistInfo, run_distributed
from mnapps.engine.loop import RunOptions, TaskHooks, fit
from mnapps.engine.result import FitResult
from mnapps.engine.rng import seed_everything
from mnapps.engine.run_folder import check_run_folder

from .spec import EvalRequest, Evaluation, ExportPlan

__all__ = ["RunRequest", "TaskRun", "Task", "initial_weights", "build_seeded"]

WeightsPath = str | os.PathLike | None
ConfigT = TypeVar("ConfigT", bound=TaskConfig)
RunT = TypeVar("RunT", bound="TaskRun")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class RunRequest:
    """What the user asked of a training run (the tools' ``--output-dir``, ``--resume``, ...).

    Attributes:
        output_dir: the run folder.
        resume: a checkpoint to continue from, or True for ``output_dir/last.pt``.
        overwrite: start over in a folder that already holds checkpoints.
        weights_backbone: a checkpoint whose trunk starts the model; wins over
            ``model.backbone.weights``.
        weights: a whole model of the task to fine-tune (``train_det --weights``: a detector,
            its path or the checkpoint already read); only a task that fine-tunes whole models
            takes it (:attr:`Task.fine_tunes_whole_models`).

    Raises:
        ValueError: ``weights`` and ``weights_backbone`` together.
    """

    output_dir: str | os.PathLike
    resume: str | os.PathLike | bool | None = None
    overwrite: bool = False
    weights_backbone: WeightsPath = None
    weights: str | os.PathLike | Checkpoint | None = None

    def __post_init__(self) -> None:
        if self.weights is not None and self.weights_backbone is not None:
            raise ValueError(
                "give --weights (a whole detector to fine-tune) or --weights-backbone (a trunk to start from), not both"
            )


@dataclass
class TaskRun(Generic[ConfigT]):
    """What every task's per-run state starts with (each task derives its own dataclass from it).

    Attributes:
        cfg: the run's config, completed by the data (the classes it found, for example).
        request: what the user asked of the run.
        info: this process's rank, world size and device.
    """

    cfg: ConfigT
    request: RunRequest
    info: DistInfo

    @property
    def output_dir(self) -> Path:
        return Path(self.request.output_dir)

    @property
    def device(self) -> torch.device:
        return self.info.device


def initial_weights(request: RunRequest, configured: WeightsPath) -> WeightsPath:
    """The trunk weights a new model starts from: none when resuming (the checkpoint brings them)
    or fine-tuning a whole model (it brings them), else ``--weights-backbone``, else the config's
    ``model.backbone.weights``."""
    if request.resume or request.weights is not None:
        return None
    return request.weights_backbone or configured


def build_seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` right after :func:`seed_everything`, so initial weights depend only on ``seed``."""
    seed_everything(seed)
    return build()


class Task(ABC, Generic[ConfigT, RunT, ResultT]):
    """One mnapps task: what it trains, how, and what the rest of mnapps may ask of it.

    A subclass sets the class attributes and implements the abstract methods; :meth:`train`
    runs them in the order the module docstring gives. Its per-run state is its own dataclass
    derived from :class:`TaskRun` (``RunT``); it returns its own typed result (``ResultT``).

    Attributes:
        name: what its checkpoints record as ``task`` (the key of :data:`~mnapps.tasks.table.TASKS`).
        config_cls: its top-level config (a :class:`mnapps.config.TaskConfig`).
        best_metric: the metric of :meth:`evaluate_epoch` that selects ``best.pt`` (higher is better).
        fine_tunes_whole_models: it takes :attr:`RunRequest.weights`.
        scored_by: None when :meth:`evaluate` scores its checkpoints; else the tool that does.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[TaskConfig]]
    best_metric: ClassVar[str]
    fine_tunes_whole_models: ClassVar[bool] = False
    scored_by: ClassVar[str | None] = None

    # -- training: the steps of train(), in order ------------------------------------------

    @abstractmethod
    def prepare(self, cfg: ConfigT, request: RunRequest, info: DistInfo) -> RunT:
        """The datasets and the run's state, and every check that would otherwise fail late; the
        state's ``cfg`` holds what the data decided."""

    @abstractmethod
    def build_model(self, run: RunT, weights: WeightsPath) -> nn.Module:
        """The initial model, its trunk from ``weights`` (:func:`initial_weights`); runs right after seeding."""

    def head(self, cfg: ConfigT) -> str | None:
        """What the checkpoints record as ``head`` (None: a task without heads)."""
        return None

    def describe(self, run: RunT, model: nn.Module) -> Iterable[str]:
        """Lines rank 0 prints before training."""
        return ()

    @abstractmethod
    def start(self, run: RunT, model: nn.Module) -> DataLoader:
        """The training loader; runs after ``config.yaml`` is saved and may do rank-0 work first."""

    @abstractmethod
    def training_step(self, run: RunT, model: nn.Module, batch: Any, device: torch.device) -> dict[str, Tensor]:
        """The engine's loss: named loss terms of one batch (the engine sums and logs them)."""

    @abstractmethod
    def evaluate_epoch(self, run: RunT, model: nn.Module, epoch: int) -> dict[str, float]:
        """The metrics after ``epoch`` (1-based) on the validation data; rank 0 only."""

    def batch_images(self, batch: Any) -> int:
        """Images in a training batch (for images/s): the first dimension of ``batch[0]``."""
        return len(batch[0])

    @abstractmethod
    def finish(self, run: RunT, model: nn.Module, fitted: FitResult, time_s: float) -> ResultT:
        """The task's result of the run, and what rank 0 writes and prints at the end."""

    # -- what the rest of mnapps asks of a task ----------------------------------------------

    @abstractmethod
    def load(self, checkpoint: Checkpoint) -> tuple[nn.Module, ConfigT]:
        """The model of one of its checkpoints, in eval mode, and its typed config."""

    @abstractmethod
    def datasets(self, cfg: ConfigT) -> tuple[Any, Any]:
        """The training and validation datasets of ``cfg``."""

    @abstractmethod
    def image_files(self, cfg: ConfigT, split: str) -> list[Path]:
        """The image files of the validation (``"parity"``) or training (``"calibration"``) split."""

    @abstractmethod
    def export(self, checkpoint: Checkpoint, model: nn.Module, cfg: ConfigT) -> ExportPlan:
        """How export makes an ONNX graph of ``model`` (read by :mod:`mnapps.export.pipeline`)."""

    def evaluate(self, checkpoint: Checkpoint, request: EvalRequest) -> Evaluation:
        """Score a checkpoint on its validation data (``tools/eval_det.py --checkpoint``)."""
        raise ValueError(f"{checkpoint.origin}: a {self.name} checkpoint is scored by {self.scored_by}, not here")

    # -- the training order ------------------------------------------------------------------

    def train(self, cfg: ConfigT, request: RunRequest, *, device: str | torch.device | None = None) -> ResultT:
        """Train as ``request`` asks: in this process, or in every process under ``torchrun``
        (:func:`mnapps.engine.distributed.run_distributed`).

        Raises:
            ValueError: :attr:`RunRequest.weights` for a task that does not fine-tune whole
                models, and whatever the task's own steps refuse (named).
        """
        if request.weights is not None and not self.fine_tunes_whole_models:
            raise ValueError(
                f"the {self.name} task fine-tunes no whole model (--weights); start its trunk with --weights-backbone"
            )
        return run_distributed(self._train, device, cfg, request)

    def _train(self, cfg: ConfigT, request: RunRequest, *, info: DistInfo) -> ResultT:
        """One training of this task in this process (see the module docstring for the order)."""
        started = time.perf_counter()
        output_dir = Path(request.output_dir)
        # Before any data work: a finished run's best.pt must not be replaced by accident.
        check_run_folder(output_dir, resume=bool(request.resume), overwrite=request.overwrite)
        run = self.prepare(cfg, request, info)
        weights = initial_weights(request, run.cfg.model.backbone.weights)
        model = build_seeded(run.cfg.train.seed, partial(self.build_model, run, weights)).to(info.device)
        if info.is_main:
            save_config(run.cfg, output_dir / "config.yaml")
            for line in self.describe(run, model):
                print(line)
            if getattr(model, "backbone_load_report", None) is not None:
                print(f"backbone: {model.backbone_load_report}")
        loader = self.start(run, model)
        hooks = TaskHooks(loss_fn=partial(self.training_step, run), evaluate=partial(self.evaluate_epoch, run),
                          best_metric=self.best_metric, batch_size_fn=self.batch_images)
        options = RunOptions(
            output_dir, resume=request.resume, overwrite=request.overwrite, device=info.device, task=self.name,
            head=self.head(run.cfg), config=run.cfg, folder_checked=True,
        )
        fitted = fit(model, loader, run.cfg.train, hooks, options)
        return self.finish(run, model, fitted, time.perf_counter() - started)
