"""Training a detector: the loss the engine calls, COCO evaluation every epoch, the run report.

This module owns :func:`train_detector`: the task's steps of the shared training skeleton
(:func:`mnapps.tasks.training.train_task`): both datasets with the data's classes written into
the config, the detector (trunk weights, or a whole detector to fine-tune), the loss function
that calls ``model(images, targets)``, COCOeval after every epoch with best-by-AP, and at the end
``metrics.json`` and the report of what happened to the data.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mnapps.data.coco import CocoDetection, collate_fn
from mnapps.engine.distributed import DistInfo, build_eval_loader, build_train_loader
from mnapps.engine.loop import TaskHooks
from mnapps.engine.rng import capture_rng_state, restore_rng_state
from mnapps.eval.coco import evaluate_detector, format_per_class_table, write_metrics_json
from mnapps.eval.plots import EvaluatedDetections, write_detection_report
from mnapps.heads import head_spec

from ..training import RunRequest, TaskSteps, launch, train_task
from .config import DetConfig, build_model, model_input_size
from .data import build_eval_dataset, build_train_dataset
from .model import load_detector_weights
from .soft_targets import check_compatible, load_teacher, with_soft_targets

__all__ = ["train_detector", "detection_loss_fn"]


class _BatchCounter:
    """Unreadable samples dropped by collate_fn, and batches too small to train on."""

    def __init__(self) -> None:
        self.skipped_samples = 0
        self.skipped_batches = 0
        self.loss_names: tuple[str, ...] = ()


def _zero_losses(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    # Connected to every trainable parameter so the engine (and DDP) see a normal step.
    zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
    return {name: zero for name in (names or ("loss_skipped_batch",))}


def detection_loss_fn(counter: _BatchCounter | None = None, min_images: int = 1):
    """The engine's ``loss_fn(model, (images, targets, num_skipped), device) -> losses``.

    Targets keep only ``boxes`` and ``labels``. Unreadable images dropped by ``collate_fn``
    are counted. A batch left with fewer than ``min_images`` images is padded by repeating
    its images (SSD needs 2: its 1x1 extra maps cannot batch-normalise a single image); a
    batch left with none gives zero losses (counted as a skipped batch).
    """
    counter = counter or _BatchCounter()

    def loss_fn(model: nn.Module, batch: tuple[list[Tensor], list[dict], int], device: torch.device):
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

    return loss_fn


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


def train_detector(
    cfg: DetConfig, *, device: str | torch.device | None = None, weights: str | os.PathLike | None = None, **run: Any
) -> dict[str, Any]:
    """Train the configured detector, evaluating with COCOeval after every epoch.

    Writes into the run folder: ``config.yaml`` (the resolved config, classes included),
    ``last.pt`` every epoch, ``best.pt`` at the best validation AP, and ``metrics.json`` (the
    final evaluation's 12 COCO numbers and per-class AP). Prints COCO's summary, the per-class
    table and what happened to the data (boxes dropped/clipped, unreadable images skipped).
    Works under ``torchrun`` (DDP; rank 0 evaluates and writes).

    Args:
        cfg: the experiment.
        device: ``cpu``, ``cuda``, ``cuda:N`` or None (CUDA when available).
        weights: a whole mnapps detection checkpoint to fine-tune (e.g. an imported TF OD API
            SSD); ``cfg.model`` must describe its architecture (:func:`fine_tune_config`).
            Every tensor that fits is loaded; the class predictors are re-initialised when the
            data has another class count (:func:`load_detector_weights`). Ignored when resuming;
            not together with ``weights_backbone``.
        run: the run, as :class:`mnapps.tasks.training.RunRequest`'s fields: ``output_dir``;
            ``resume``; ``overwrite`` (without it or ``resume``, a folder holding checkpoints is
            refused before any work); ``weights_backbone`` (an mnapps checkpoint whose trunk
            starts the model, e.g. the imported ImageNet weights).

    Returns:
        ``{"metrics": final COCO metrics (empty without validation data), "per_class_ap",
        "summary": COCOeval's text, "engine": fit's result, "train_summary", "val_summary",
        "output_dir", "time_s"}``.

    Raises:
        ValueError: a bad config or data (named), an empty validation set, or a run folder
            that holds checkpoints (see :func:`mnapps.engine.loop.check_run_folder`).
    """
    if weights is not None and run.get("weights_backbone") is not None:
        raise ValueError(
            "give --weights (a whole detector to fine-tune) or --weights-backbone (a trunk to start from), not both"
        )
    if weights is not None:
        run = {**run, "weights_backbone": weights}
    return launch(_train_detector, cfg, device, run, whole=weights is not None)


def _prepare_data(cfg: DetConfig, info: DistInfo) -> tuple[DetConfig, tuple[CocoDetection, CocoDetection]]:
    """Both datasets, the data's classes written into ``cfg``, and every start-up check that
    would otherwise fail after the first epoch (empty validation set, too small a batch)."""
    train_set = build_train_dataset(cfg)
    cfg = _with_data_classes(cfg, train_set)
    val_set = build_eval_dataset(cfg)
    per_process = cfg.train.batch_size // max(1, info.world_size)
    min_images = head_spec(cfg.model.head).min_batch_images
    if per_process < min_images:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} gives {per_process} image(s) per process; the {cfg.model.head} "
            f"head needs at least {min_images} (BatchNorm on its 1x1 extra maps), raise --batch-size"
        )
    return cfg, (train_set, val_set)


def _evaluator(cfg: DetConfig, val_set: CocoDetection, device: torch.device, last_eval: dict[str, Any]):
    """fit's ``evaluate(model, epoch)``: COCOeval on ``val_set``, the details kept in ``last_eval``."""
    val_loader = build_eval_loader(val_set, cfg.data.eval_batch_size, collate_fn, cfg.train.num_workers)

    def evaluate(eval_model: nn.Module, epoch: int) -> dict[str, float]:
        # Iterating a DataLoader draws from the global RNGs; restoring them keeps the training
        # run (augmentation, shuffling) independent of how often it is evaluated.
        rng_state = capture_rng_state()
        seen = EvaluatedDetections()  # the last one draws the run's pictures, without another pass
        try:
            metrics, per_class, summary = evaluate_detector(
                eval_model, val_loader, val_set, device, max_images=cfg.data.eval_max_images, on_image=seen
            )
        finally:
            restore_rng_state(rng_state)
        images = min(len(val_set), cfg.data.eval_max_images or len(val_set))
        last_eval.update(metrics=metrics, per_class_ap=per_class, summary=summary, epoch=epoch, images=images,
                         evaluated=seen)
        return metrics

    return evaluate


def _steps(cfg: DetConfig, whole: bool) -> tuple[TaskSteps, _BatchCounter, dict[str, Any]]:
    """The detection steps of the training skeleton, with the counter and last evaluation they fill."""
    counter, last_eval, loaded, soft = _BatchCounter(), {}, [], {}

    def build(cfg: DetConfig, weights: Any, data: Any) -> nn.Module:
        model = build_model(cfg, cfg.model.num_classes, weights_backbone=None if whole else weights)
        if whole and weights is not None:
            loaded.extend(load_detector_weights(model, weights, cfg.model.num_classes))
        if cfg.distill is not None and cfg.distill.teacher:
            # checked before the first step: a teacher of other anchors is refused by name
            soft["teacher"] = load_teacher(cfg.distill, torch.device("cpu"))
            soft["anchors"] = check_compatible(model, soft["teacher"], cfg.distill.teacher)
        return model

    def describe(cfg: DetConfig, model: nn.Module, data: tuple[CocoDetection, CocoDetection]) -> list[str]:
        train_set, val_set = data
        line = (
            f"{cfg.model.head} on MobileNetV1 x{cfg.model.backbone.width_mult:g}, input {model_input_size(cfg)}, "
            f"{cfg.model.num_classes - 1} classes; train {len(train_set)} images ({train_set.ann_file}), "
            f"val {len(val_set)} images ({val_set.ann_file})"
        )
        lines = [line, *(f"weights: {entry}" for entry in loaded)]
        if soft:
            lines.append(f"soft targets: teacher {cfg.distill.teacher} ({soft['anchors']} anchors, the student's), "
                         f"weight {cfg.distill.weight:g}, box weight {cfg.distill.box_weight:g}")
        return lines

    def start(cfg: DetConfig, model: nn.Module, data: Any, info: DistInfo) -> tuple[Any, TaskHooks]:
        train_set, val_set = data
        loader = build_train_loader(train_set, cfg.train, collate_fn, info if info.distributed else None)
        loss_fn = detection_loss_fn(counter, head_spec(cfg.model.head).min_batch_images)
        if soft:
            loss_fn = with_soft_targets(loss_fn, soft["teacher"].to(info.device), cfg.distill)
        hooks = TaskHooks(
            loss_fn=loss_fn,
            evaluate=_evaluator(cfg, val_set, info.device, last_eval),
            best_metric="AP",
            batch_size_fn=lambda batch: len(batch[0]),
        )
        return loader, hooks

    steps = TaskSteps(task="detection", head=cfg.model.head, prepare=_prepare_data, build=build, start=start,
                      describe=describe)
    return steps, counter, last_eval


def _train_detector(cfg: DetConfig, request: RunRequest, *, whole: bool, info: DistInfo) -> dict[str, Any]:
    started = time.perf_counter()
    steps, counter, last_eval = _steps(cfg, whole)
    trained = train_task(cfg, request, info, steps)
    engine, (train_set, val_set) = trained.fit, trained.data
    result: dict[str, Any] = {
        "metrics": dict(engine.get("last_metrics") or {}),
        "per_class_ap": last_eval.get("per_class_ap", {}),
        "summary": last_eval.get("summary", ""),
        "engine": engine,
        "train_summary": train_set.summary(skipped_samples=counter.skipped_samples),
        "val_summary": val_set.summary(),
        "output_dir": str(request.output_dir),
        "time_s": time.perf_counter() - started,
    }
    if info.is_main and last_eval:  # pr_curves.png and val_predictions.png of the final evaluation
        write_detection_report(trained.model, val_set, request.output_dir, device=info.device,
                               max_images=cfg.data.eval_max_images, batch_size=cfg.data.eval_batch_size, log=print,
                               evaluated=last_eval["evaluated"] if last_eval["epoch"] == cfg.train.epochs else None)
    if info.is_main:
        _report(result, engine, counter, Path(request.output_dir), last_eval)
    return result


def _report(
    result: dict[str, Any], engine: dict[str, Any], counter: _BatchCounter, output_dir: Path, last_eval: dict
) -> None:
    if last_eval:
        print(f"\nCOCO bbox evaluation of the final model (epoch {last_eval['epoch']}, {last_eval['images']} val images):")
        print(last_eval["summary"], end="")
        print(format_per_class_table(last_eval["per_class_ap"]), end="")
        extra = {
            "epoch": last_eval["epoch"],
            "best_AP": engine.get("best"),
            "checkpoint": engine.get("checkpoint"),
            "best_checkpoint": engine.get("best_checkpoint"),
            "train_time_s": round(result["time_s"], 1),
        }
        path = write_metrics_json(output_dir / "metrics.json", last_eval["metrics"], last_eval["per_class_ap"], extra)
        print(f"wrote {path}")
    elif engine.get("last_metrics"):
        print(f"final metrics (from the checkpoint): {engine['last_metrics']}")
    print(f"data: {result['train_summary']}")
    print(f"data: {result['val_summary']}")
    if counter.skipped_batches:
        print(f"data: {counter.skipped_batches} training batch(es) skipped (no readable image)")
    best = engine.get("best")
    best_text = f", best AP {best:.4f} in {engine['best_checkpoint']}" if best is not None else ""
    print(f"done in {result['time_s'] / 60:.1f} min; checkpoints in {output_dir}{best_text}")
