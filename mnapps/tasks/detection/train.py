"""Training a detector: :class:`DetectionTask`, the detection implementation of :class:`mnapps.tasks.task.Task`.

This module owns :func:`train_detector` and the task behind it: both datasets with the data's
classes written into the config, the detector (trunk weights, or a whole detector to fine-tune),
the training step that calls ``model(images, targets)`` (plus soft targets from a teacher
detector when the config has a ``distill:`` section), COCOeval after every epoch with best-by-AP,
and at the end ``metrics.json``, the pictures of the final evaluation and the report of what
happened to the data. The run's state is one :class:`DetectionRun`; the result one
:class:`DetectionResult`. Loading, data, export and checkpoint evaluation are the other modules'
functions, which :class:`DetectionTask` hands on.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mnapps.checkpoint import Checkpoint
from mnapps.data.coco import CocoDetection, collate_fn
from mnapps.engine.distributed import DistInfo, build_eval_loader, build_train_loader
from mnapps.engine.result import FitResult
from mnapps.engine.rng import capture_rng_state, restore_rng_state
from mnapps.eval.coco import evaluate_detector, format_per_class_table, write_metrics_json
from mnapps.eval.plots import EvaluatedDetections, write_detection_report
from mnapps.heads import head_spec

from ..spec import EvalRequest, Evaluation, ExportPlan
from ..task import RunRequest, Task, TaskRun, WeightsPath
from .config import DetConfig, build_model, model_input_size
from .data import build_det_datasets, build_eval_dataset, build_train_dataset, det_image_files
from .evaluate import evaluate_detection
from .model import det_export_plan, load_detector, load_detector_weights
from .soft_targets import check_compatible, load_teacher, with_soft_targets

__all__ = ["DetectionTask", "DetectionRun", "DetectionResult", "EpochEvaluation", "SoftTargetTeacher",
           "BatchCounter", "train_detector", "detection_losses"]


@dataclass
class BatchCounter:
    """Unreadable samples dropped by collate_fn, batches too small to train on, and the loss terms
    the model last returned (a skipped batch's zero losses carry the same names)."""

    skipped_samples: int = 0
    skipped_batches: int = 0
    loss_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class EpochEvaluation:
    """One COCOeval of the validation set during training.

    Attributes:
        epoch: the 1-based epoch after which it ran.
        images: validation images scored.
        metrics: COCO's 12 numbers.
        per_class_ap: AP@[.5:.95] per class name.
        summary: COCOeval's text.
        detections: what the pass saw, so the run's pictures need no other pass.
    """

    epoch: int
    images: int
    metrics: dict[str, float]
    per_class_ap: dict[str, float]
    summary: str
    detections: EvaluatedDetections


@dataclass(frozen=True)
class SoftTargetTeacher:
    """The frozen teacher detector of ``distill.teacher`` and the anchor count it shares with the student."""

    model: nn.Module
    anchors: int


@dataclass
class DetectionRun(TaskRun[DetConfig]):
    """The state of one detection training run (see :class:`mnapps.tasks.task.TaskRun` for the rest).

    Attributes:
        train_set, val_set: the datasets.
        counter: what the training step skipped.
        weights_report: the lines :func:`load_detector_weights` reported (``--weights``).
        teacher: the soft-target teacher, when the config has one.
        val_loader: the validation loader (set when training starts).
        last_eval: the latest evaluation.
    """

    train_set: CocoDetection
    val_set: CocoDetection
    counter: BatchCounter = field(default_factory=BatchCounter)
    weights_report: list[str] = field(default_factory=list)
    teacher: SoftTargetTeacher | None = None
    val_loader: DataLoader | None = None
    last_eval: EpochEvaluation | None = None

    @property
    def min_images(self) -> int:
        """The fewest images the head trains on in one step."""
        return head_spec(self.cfg.model.head).min_batch_images


@dataclass(frozen=True)
class DetectionResult:
    """What :func:`train_detector` returns.

    Attributes:
        metrics: the final COCO metrics (empty without an evaluation).
        per_class_ap: the final AP@[.5:.95] per class name (empty without an evaluation).
        summary: COCOeval's text of the final evaluation ("" without one).
        fit: what the engine reports (history, best AP, checkpoints).
        train_summary, val_summary: what happened to each split's data (boxes, unreadable images).
        output_dir: the run folder.
        time_s: the run's time, data preparation included.
    """

    metrics: dict[str, float]
    per_class_ap: dict[str, float]
    summary: str
    fit: FitResult
    train_summary: str
    val_summary: str
    output_dir: Path
    time_s: float


def _zero_losses(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    # Connected to every trainable parameter so the engine (and DDP) see a normal step.
    zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
    return {name: zero for name in (names or ("loss_skipped_batch",))}


def detection_losses(
    model: nn.Module, batch: tuple[list[Tensor], list[dict], int], device: torch.device, *, counter: BatchCounter,
    min_images: int = 1,
) -> dict[str, Tensor]:
    """The detector's named losses of one ``collate_fn`` batch ``(images, targets, num_skipped)``.

    Targets keep only ``boxes`` and ``labels``. Unreadable images dropped by ``collate_fn``
    are counted in ``counter``. A batch left with fewer than ``min_images`` images is padded by
    repeating its images (SSD needs 2: its 1x1 extra maps cannot batch-normalise a single
    image); a batch left with none gives zero losses (counted as a skipped batch).
    """
    images, targets, num_skipped = batch
    counter.skipped_samples += int(num_skipped)
    if not images:
        counter.skipped_batches += 1
        return _zero_losses(model, counter.loss_names)
    while len(images) < min_images:
        images, targets = images + images, targets + targets
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [
        {"boxes": t["boxes"].to(device, non_blocking=True), "labels": t["labels"].to(device, non_blocking=True)}
        for t in targets
    ]
    losses = model(images, targets)
    counter.loss_names = tuple(losses)
    return losses


def _with_data_classes(cfg: DetConfig, dataset: CocoDetection) -> DetConfig:
    model = cfg.model
    if model.num_classes is not None and model.num_classes != dataset.num_classes:
        raise ValueError(
            f"model.num_classes is {model.num_classes} but {dataset.ann_file} has {dataset.num_classes - 1} "
            f"categories (+ background = {dataset.num_classes}); set model.num_classes to null to take it from the data"
        )
    model = dataclasses.replace(
        model,
        num_classes=dataset.num_classes,
        class_names=tuple(dataset.class_names),
        category_ids=tuple(dataset.cat_ids),
    )
    return dataclasses.replace(cfg, model=model)


class DetectionTask(Task[DetConfig, DetectionRun, DetectionResult]):
    """Detection: a MobileNetV1 detector of any :data:`mnapps.heads.HEADS` entry on COCO-format data."""

    name = "detection"
    config_cls = DetConfig
    best_metric = "AP"
    fine_tunes_whole_models = True

    def head(self, cfg: DetConfig) -> str:
        return cfg.model.head

    def prepare(self, cfg: DetConfig, request: RunRequest, info: DistInfo) -> DetectionRun:
        """Both datasets, the data's classes written into ``cfg``, and every start-up check that
        would otherwise fail after the first epoch (empty validation set, too small a batch)."""
        train_set = build_train_dataset(cfg)
        cfg = _with_data_classes(cfg, train_set)
        val_set = build_eval_dataset(cfg)
        run = DetectionRun(cfg, request, info, train_set, val_set)
        per_process = cfg.train.batch_size // max(1, info.world_size)
        if per_process < run.min_images:
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} gives {per_process} image(s) per process; the "
                f"{cfg.model.head} head needs at least {run.min_images} (BatchNorm on its 1x1 extra maps), raise "
                "--batch-size"
            )
        return run

    def build_model(self, run: DetectionRun, weights: WeightsPath) -> nn.Module:
        cfg, request = run.cfg, run.request
        model = build_model(cfg, cfg.model.num_classes, weights_backbone=weights)
        if request.weights is not None and not request.resume:  # a resumed run's checkpoint brings its weights
            run.weights_report = load_detector_weights(model, request.weights, cfg.model.num_classes)
        if cfg.distill is not None and cfg.distill.teacher:
            # checked before the first step: a teacher of other anchors is refused by name
            teacher = load_teacher(cfg.distill, torch.device("cpu"))
            run.teacher = SoftTargetTeacher(teacher, check_compatible(model, teacher, cfg.distill.teacher))
        return model

    def describe(self, run: DetectionRun, model: nn.Module) -> list[str]:
        cfg, train_set, val_set = run.cfg, run.train_set, run.val_set
        line = (
            f"{cfg.model.head} on MobileNetV1 x{cfg.model.backbone.width_mult:g}, input {model_input_size(cfg)}, "
            f"{cfg.model.num_classes - 1} classes; train {len(train_set)} images ({train_set.ann_file}), "
            f"val {len(val_set)} images ({val_set.ann_file})"
        )
        lines = [line, *(f"weights: {entry}" for entry in run.weights_report)]
        if run.teacher is not None:
            lines.append(f"soft targets: teacher {cfg.distill.teacher} ({run.teacher.anchors} anchors, the student's), "
                         f"weight {cfg.distill.weight:g}, box weight {cfg.distill.box_weight:g}")
        return lines

    def start(self, run: DetectionRun, model: nn.Module) -> DataLoader:
        cfg, info = run.cfg, run.info
        loader = build_train_loader(run.train_set, cfg.train, collate_fn, info if info.distributed else None)
        if run.teacher is not None:
            run.teacher.model.to(info.device)
        run.val_loader = build_eval_loader(run.val_set, cfg.data.eval_batch_size, collate_fn, cfg.train.num_workers)
        return loader

    def training_step(self, run: DetectionRun, model: nn.Module, batch: Any, device: torch.device) -> dict[str, Tensor]:
        step = partial(detection_losses, counter=run.counter, min_images=run.min_images)
        if run.teacher is None:
            return step(model, batch, device)
        return with_soft_targets(step, run.teacher.model, run.cfg.distill)(model, batch, device)

    def evaluate_epoch(self, run: DetectionRun, model: nn.Module, epoch: int) -> dict[str, float]:
        """COCOeval on the validation set, kept as ``run.last_eval``."""
        max_images = run.cfg.data.eval_max_images
        # Iterating a DataLoader draws from the global RNGs; restoring them keeps the training
        # run (augmentation, shuffling) independent of how often it is evaluated.
        rng_state = capture_rng_state()
        seen = EvaluatedDetections()  # the last one draws the run's pictures, without another pass
        try:
            metrics, per_class, summary = evaluate_detector(
                model, run.val_loader, run.val_set, run.device, max_images=max_images, on_image=seen
            )
        finally:
            restore_rng_state(rng_state)
        images = min(len(run.val_set), max_images or len(run.val_set))
        run.last_eval = EpochEvaluation(epoch, images, metrics, per_class, summary, seen)
        return metrics

    def finish(self, run: DetectionRun, model: nn.Module, fitted: FitResult, time_s: float) -> DetectionResult:
        last = run.last_eval
        result = DetectionResult(
            metrics=dict(fitted.last_metrics),
            per_class_ap=last.per_class_ap if last else {},
            summary=last.summary if last else "",
            fit=fitted,
            train_summary=run.train_set.summary(skipped_samples=run.counter.skipped_samples),
            val_summary=run.val_set.summary(),
            output_dir=run.output_dir,
            time_s=time_s,
        )
        if run.info.is_main and last is not None:  # pr_curves.png and val_predictions.png of the final evaluation
            cfg = run.cfg
            write_detection_report(model, run.val_set, run.output_dir, device=run.device,
                                   max_images=cfg.data.eval_max_images, batch_size=cfg.data.eval_batch_size, log=print,
                                   evaluated=last.detections if last.epoch == cfg.train.epochs else None)
        if run.info.is_main:
            _report(result, run)
        return result

    def load(self, checkpoint: Checkpoint) -> tuple[nn.Module, DetConfig]:
        return load_detector(checkpoint)

    def datasets(self, cfg: DetConfig) -> tuple[CocoDetection, CocoDetection]:
        return build_det_datasets(cfg)

    def image_files(self, cfg: DetConfig, split: str) -> list[Path]:
        return det_image_files(cfg, split)

    def export(self, checkpoint: Checkpoint, model: nn.Module, cfg: DetConfig) -> ExportPlan:
        return det_export_plan(checkpoint, model, cfg)

    def evaluate(self, checkpoint: Checkpoint, request: EvalRequest) -> Evaluation:
        return evaluate_detection(checkpoint, request)


def train_detector(
    cfg: DetConfig,
    *,
    output_dir: str | os.PathLike,
    resume: str | os.PathLike | bool | None = None,
    overwrite: bool = False,
    weights_backbone: str | os.PathLike | None = None,
    weights: str | os.PathLike | Checkpoint | None = None,
    device: str | torch.device | None = None,
) -> DetectionResult:
    """Train the configured detector, evaluating with COCOeval after every epoch.

    Writes into the run folder: ``config.yaml`` (the resolved config, classes included),
    ``last.pt`` every epoch, ``best.pt`` at the best validation AP, and ``metrics.json`` (the
    final evaluation's 12 COCO numbers and per-class AP). Prints COCO's summary, the per-class
    table and what happened to the data (boxes dropped/clipped, unreadable images skipped).
    Works under ``torchrun`` (DDP; rank 0 evaluates and writes).

    Args:
        cfg: the experiment.
        output_dir: the run folder.
        resume: continue from this checkpoint, or True for ``output_dir/last.pt``.
        overwrite: start over in a folder holding checkpoints (without it or ``resume``, such
            a folder is refused before any work).
        weights_backbone: an mnapps checkpoint whose trunk starts the model (e.g. the imported
            ImageNet weights); default ``model.backbone.weights``.
        weights: a whole mnapps detection checkpoint to fine-tune (e.g. an imported TF OD API
            SSD), its path or the record already read; ``cfg.model`` must describe its
            architecture (:func:`fine_tune_config`). Every tensor that fits is loaded; the class
            predictors are re-initialised when the data has another class count
            (:func:`load_detector_weights`). Ignored when resuming; not together with
            ``weights_backbone``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or None (CUDA when available).

    Raises:
        ValueError: a bad config or data (named), an empty validation set, ``weights`` with
            ``weights_backbone``, or a run folder that holds checkpoints
            (see :func:`mnapps.engine.run_folder.check_run_folder`).
    """
    request = RunRequest(output_dir, resume=resume, overwrite=overwrite, weights_backbone=weights_backbone,
                         weights=weights)
    return DetectionTask().train(cfg, request, device=device)


def _report(result: DetectionResult, run: DetectionRun) -> None:
    """What rank 0 prints and writes at the end: the final COCO evaluation, metrics.json, the data."""
    fitted, last, output_dir = result.fit, run.last_eval, run.output_dir
    if last is not None:
        print(f"\nCOCO bbox evaluation of the final model (epoch {last.epoch}, {last.images} val images):")
        print(last.summary, end="")
        print(format_per_class_table(last.per_class_ap), end="")
        extra = {
            "epoch": last.epoch,
            "best_AP": fitted.best,
            "checkpoint": str(fitted.checkpoint),
            "best_checkpoint": None if fitted.best_checkpoint is None else str(fitted.best_checkpoint),
            "train_time_s": round(result.time_s, 1),
        }
        path = write_metrics_json(output_dir / "metrics.json", last.metrics, last.per_class_ap, extra)
        print(f"wrote {path}")
    elif fitted.last_metrics:
        print(f"final metrics (from the checkpoint): {fitted.last_metrics}")
    print(f"data: {result.train_summary}")
    print(f"data: {result.val_summary}")
    if run.counter.skipped_batches:
        print(f"data: {run.counter.skipped_batches} training batch(es) skipped (no readable image)")
    best_text = f", best AP {fitted.best:.4f} in {fitted.best_checkpoint}" if fitted.best is not None else ""
    print(f"done in {result.time_s / 60:.1f} min; checkpoints in {output_dir}{best_text}")
