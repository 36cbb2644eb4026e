"""MobileNetV1 image classification: config, training on an ImageFolder, top-1/top-5 evaluation.

This module owns the classification task: its config schema (:class:`ClsConfig`, loaded
from ``configs/cls_*.yaml``), building the classifier, the data pipeline (an ImageFolder
given by the user or, with no data given, the embedded shapes set of
:mod:`mnapps.data.synthetic_cls`), the loss (cross-entropy, optional label smoothing) and
the evaluation (top-1 / top-5 accuracy). The loop itself is the shared engine
(:func:`mnapps.engine.loop.fit`); the checkpoints it writes are ordinary mnapps
checkpoints, so any head can start from the trained trunk with
:func:`mnapps.engine.checkpoint.load_backbone_weights`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from mnapps.backbones import MobileNetV1
from mnapps.config import BackboneConfig, TrainConfig, replace, save_config, to_dict
from mnapps.data.imagefolder import ImageFolderDataset, build_cls_transforms, collate_cls
from mnapps.engine.checkpoint import load_backbone_weights
from mnapps.engine.distributed import DistInfo, build_eval_loader, build_train_loader, distributed_run
from mnapps.engine.loop import fit, to_device

__all__ = [
    "ClsModelConfig",
    "ClsDataConfig",
    "ClsConfig",
    "build_classifier",
    "build_cls_datasets",
    "cls_loss_fn",
    "evaluate_classifier",
    "train_classifier",
]


@dataclass(frozen=True)
class ClsModelConfig(BackboneConfig):
    """The classifier: backbone settings plus the classification layer and input size.

    ``num_classes`` None takes the number of class folders of the training data; a number
    that disagrees with the data is an error. ``class_names`` is filled in from the data when
    training (so checkpoints know their labels); an empty tuple with 1000 (or 1001) classes
    means ImageNet's. ``weights_backbone`` starts the trunk from any mnapps checkpoint.
    """

    num_classes: int | None = None
    dropout: float = 0.0
    resolution: int = 224
    class_names: tuple[str, ...] = ()
    weights_backbone: str | None = None


@dataclass(frozen=True)
class ClsDataConfig:
    """Where the images are and how they are augmented.

    ``train_dir``/``val_dir`` None uses the embedded shapes dataset (generated and cached,
    sized by the ``shapes_*`` keys). Augmentation follows the paper's advice for small
    models (Sec. 3.2: less augmentation than Inception, the smallest crops left out): a
    random resized crop of at least ``min_crop_area`` of the image and a horizontal flip.
    """

    train_dir: str | None = None
    val_dir: str | None = None
    min_crop_area: float = 0.25
    hflip: bool = True
    color_jitter: float = 0.0
    eval_crop_fraction: float = 0.875
    eval_batch_size: int | None = None  # None: train.batch_size
    shapes_train_per_class: int = 300
    shapes_val_per_class: int = 50
    shapes_image_size: int = 96
    shapes_seed: int = 0


@dataclass(frozen=True)
class ClsConfig:
    """Top-level schema of ``configs/cls_*.yaml``."""

    model: ClsModelConfig = field(default_factory=ClsModelConfig)
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    label_smoothing: float = 0.0


def build_classifier(cfg: ClsModelConfig, num_classes: int | None = None) -> MobileNetV1:
    """A :class:`MobileNetV1` classifier with ``num_classes`` outputs (default ``cfg.num_classes``)."""
    classes = cfg.num_classes if num_classes is None else num_classes
    if classes is None or classes < 1:
        raise ValueError(f"model.num_classes must be >= 1 for a classifier, got {classes}")
    return MobileNetV1(
        cfg.width_mult,
        classes,
        variant=cfg.variant,
        activation=cfg.activation,
        bn_eps=cfg.bn_eps,
        bn_momentum=cfg.bn_momentum,
        tf_padding=cfg.tf_padding,
        frozen_bn=cfg.frozen_bn,
        dropout=cfg.dropout,
    )


def build_cls_datasets(cfg: ClsConfig) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The training and validation ImageFolders of ``cfg.data`` (embedded shapes when unset)."""
    data = cfg.data
    if (data.train_dir is None) != (data.val_dir is None):
        raise ValueError(
            "give both data.train_dir and data.val_dir (--train-dir/--val-dir), or neither for the "
            f"embedded shapes dataset; got train_dir={data.train_dir!r}, val_dir={data.val_dir!r}"
        )
    if data.train_dir is None:
        from mnapps.data.synthetic_cls import ensure_shapes_classification

        paths = ensure_shapes_classification(
            train_per_class=data.shapes_train_per_class,
            val_per_class=data.shapes_val_per_class,
            image_size=data.shapes_image_size,
            seed=data.shapes_seed,
        )
        train_dir, val_dir = paths.train, paths.val
    else:
        train_dir, val_dir = Path(data.train_dir), Path(data.val_dir)
    resolution = cfg.model.resolution
    train_tf = build_cls_transforms(
        True, resolution, min_crop_area=data.min_crop_area, hflip=data.hflip, color_jitter=data.color_jitter
    )
    eval_tf = build_cls_transforms(False, resolution, eval_crop_fraction=data.eval_crop_fraction)
    train_set = ImageFolderDataset(train_dir, train_tf)
    val_set = ImageFolderDataset(val_dir, eval_tf, class_names=train_set.class_names)
    return train_set, val_set


class _SkipCounter:
    """Counts unreadable images dropped by :func:`collate_cls` (the count rides in each batch,
    so images dropped inside loader worker processes are counted too)."""

    def __init__(self) -> None:
        self.count = 0


def cls_loss_fn(
    label_smoothing: float = 0.0, skipped: _SkipCounter | None = None, *, channels_last: bool = False
):
    """The engine's ``loss_fn(model, batch, device) -> {"loss_cls": Tensor}`` for classifiers.

    ``batch`` is :func:`collate_cls`'s ``(images Tensor[N,3,H,W] in [-1,1], labels Int64[N],
    num_skipped)``; images go to ``device`` in channels_last layout when the engine stores
    the model that way (``train.channels_last``).
    """

    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor, int], device) -> dict[str, Tensor]:
        images, labels, num_skipped = batch
        if skipped is not None:
            skipped.count += int(num_skipped)
        if labels.numel() == 0:  # every image of this batch was unreadable
            param = next(p for p in model.parameters() if p.requires_grad)
            return {"loss_cls": param.sum() * 0.0}
        images = to_device(images, device, channels_last=channels_last, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        return {"loss_cls": F.cross_entropy(logits, labels, label_smoothing=label_smoothing)}

    return loss_fn


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader,
    device: str | torch.device = "cpu",
    *,
    desc: str = "eval",
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (fractions in [0, 1]) and mean cross-entropy over ``loader``.

    ``loader`` yields :func:`collate_cls` batches. Top-5 becomes top-``k`` with
    ``k = min(5, num_classes)``. Returns ``{"top1", "top5", "loss", "num_images",
    "num_skipped"}``; the model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    correct1 = correct5 = seen = skipped = 0
    loss_sum = 0.0
    for images, labels, num_skipped in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        skipped += int(num_skipped)
        if labels.numel() == 0:
            continue
        images = to_device(images, device, channels_last=channels_last)
        labels = labels.to(device)
        logits = model(images)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        seen += labels.numel()
    model.train(was_training)
    if seen == 0:
        raise ValueError("evaluation saw no readable images")
    return {
        "top1": correct1 / seen,
        "top5": correct5 / seen,
        "loss": loss_sum / seen,
        "num_images": float(seen),
        "num_skipped": float(skipped),
    }


def train_classifier(
    cfg: ClsConfig,
    *,
    output_dir: str | os.PathLike,
    resume: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train a MobileNetV1 classifier with the shared engine; returns the final metrics.

    Writes ``output_dir/config.yaml`` (the resolved config), ``last.pt`` every epoch and
    ``best.pt`` at the best validation top-1 (mnapps checkpoints, ``task="classification"``).

    Returns:
        ``{"top1", "top5", "loss", ...}`` of the last evaluation, plus ``"num_skipped_train"``
        (unreadable training images dropped) and ``"engine"`` (what ``fit`` returned).
    """
    with distributed_run(device) as dist:
        return _train_classifier(cfg, output_dir, resume, dist)


def _train_classifier(
    cfg: ClsConfig, output_dir: str | os.PathLike, resume: str | os.PathLike | None, dist: DistInfo
) -> dict[str, Any]:
    device = dist.device
    train_set, val_set = build_cls_datasets(cfg)
    if cfg.model.num_classes is not None and cfg.model.num_classes != train_set.num_classes:
        raise ValueError(
            f"model.num_classes is {cfg.model.num_classes} but {train_set.root} has "
            f"{train_set.num_classes} class folders {train_set.class_names[:10]}; "
            "set model.num_classes to null to take it from the data"
        )
    # Record what the data decided, so the checkpoint alone rebuilds the model and its labels.
    cfg = replace(
        cfg,
        model=replace(cfg.model, num_classes=train_set.num_classes, class_names=tuple(train_set.class_names)),
    )
    # Seed before building so the initial weights, like everything fit() draws, follow train.seed.
    torch.manual_seed(cfg.train.seed)
    model = build_classifier(cfg.model)
    if cfg.model.weights_backbone:
        report = load_backbone_weights(model, cfg.model.weights_backbone)
        if dist.is_main:
            print(f"backbone weights from {cfg.model.weights_backbone}: {report}")
    model.to(device)

    if dist.is_main:
        save_config(cfg, Path(output_dir) / "config.yaml")
    train_loader = build_train_loader(train_set, cfg.train, collate_cls, dist)
    val_loader = build_eval_loader(
        val_set, cfg.data.eval_batch_size or cfg.train.batch_size, collate_cls, cfg.train.num_workers
    )
    skipped = _SkipCounter()

    def evaluate(eval_model: nn.Module, epoch: int) -> dict[str, float]:
        return evaluate_classifier(
            eval_model, val_loader, device, desc=f"eval epoch {epoch}", channels_last=cfg.train.channels_last
        )

    engine_result = fit(
        model,
        train_loader,
        cfg.train,
        loss_fn=cls_loss_fn(cfg.label_smoothing, skipped, channels_last=cfg.train.channels_last),
        output_dir=output_dir,
        evaluate=evaluate,
        best_metric="top1",
        checkpoint_meta={"task": "classification", "head": None, "config": to_dict(cfg)},
        resume=resume,
        device=device,
    )
    if skipped.count and dist.is_main:
        print(f"warning: {skipped.count} unreadable training image(s) were skipped")
    return {**engine_result["last_metrics"], "num_skipped_train": skipped.count, "engine": engine_result}
