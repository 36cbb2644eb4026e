"""Detection as a task: config schema, datasets, training, checkpoint loading and inference.

This module owns everything between a detection config and the shared engine: the
:class:`DetConfig` schema (``model`` / ``data`` / ``train`` sections, loaded from
``configs/ssd*.yaml`` and friends), building the COCO-format datasets (the user's files, or the
embedded shapes dataset when none are given), :func:`train_detector` (loaders, the loss
function that calls ``model(images, targets)``, COCO evaluation every epoch with best-by-AP,
``metrics.json`` and the resolved ``config.yaml``, and the end-of-run data report),
:func:`load_detector` for evaluation/inference from a checkpoint, and :func:`predict_images`.

What the data decides (number of classes, class names, the dataset's category ids) is written
into ``cfg.model`` before training, so a checkpoint alone rebuilds the model, names its classes
and maps its labels back to the original COCO category ids.

It also owns detector checkpoints that were not trained here:
:func:`import_tf_od_api_ssd_checkpoint` turns TF Object Detection API ``ssd_mobilenet_v1``
weights (:mod:`mnapps.heads.tf_od_api`) into one, and fine-tuning from a whole detector
checkpoint (:func:`fine_tune_config`, :func:`load_detector_weights`, ``train_detector(weights=)``)
keeps every tensor that fits and re-initialises the class predictors when the class count
changes. :func:`box_detector` wraps a loaded detector as the ``image -> (boxes, scores)``
callable that the SSD face cropper (:mod:`mnapps.data.box_crops`) takes.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from mnapps.checkpoint import load_checkpoint, save_checkpoint
from mnapps.config import (
    OMIT_IF_NONE,
    BackboneConfig,
    ConfigError,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    read_yaml,
    save_config,
    to_dict,
)
from mnapps.data.coco import CocoDetection, collate_fn, load_coco_json
from mnapps.data.image_io import ImageReadError, load_rgb
from mnapps.data.synthetic_det import ensure_shapes_detection
from mnapps.data.transforms import RECIPES, build_det_transforms, sample_to_tensors
from mnapps.engine.distributed import DistInfo, build_eval_loader, build_train_loader, run_distributed
from mnapps.engine.loop import capture_rng_state, check_run_folder, fit, restore_rng_state, seed_everything
from mnapps.eval.coco import evaluate_detector, format_per_class_table, write_metrics_json
from mnapps.eval.plots import draw_boxes, write_detection_report
from mnapps.heads import HEADS, head_spec
from mnapps.heads.faster_rcnn import FasterRCNNConfig
from mnapps.heads.ssd import SSDConfig
from mnapps.heads.tf_od_api import InterpolatedAnchor, TFImportedSSD, import_tf_od_api_ssd, keep_first_classes

__all__ = [
    "DetModelConfig",
    "DetDataConfig",
    "DetConfig",
    "build_model",
    "train_detector",
    "build_train_dataset",
    "build_eval_dataset",
    "load_detector",
    "predict_images",
    "model_input_size",
    "detection_loss_fn",
    "draw_detections",
    "image_ids_for",
    "import_tf_od_api_ssd_checkpoint",
    "fine_tune_config",
    "load_detector_weights",
    "box_detector",
]

HeadName = Literal[tuple(HEADS)]  # type: ignore[valid-type]
RecipeName = Literal[tuple(RECIPES)]  # type: ignore[valid-type]


@dataclass(frozen=True)
class DetModelConfig:
    """Which detector, on which trunk, and what the data decided about its classes.

    Attributes:
        head: a key of :data:`mnapps.heads.HEADS` (``ssd``, ``ssdlite``, ...).
        backbone: MobileNetV1 settings (the same section in every task).
        ssd: settings of the ``ssd`` and ``ssdlite`` heads; filled with defaults when one of
            them is the head, and an error to give for another head.
        faster_rcnn: settings of the ``faster_rcnn`` and ``faster_rcnn_fpn`` heads (likewise).
        num_classes: classes including background; None takes it from the training data.
        class_names: ``class_names[label]`` (``[0]`` is background); filled in from the data.
        category_ids: the dataset category id of labels ``1..K``; filled in from the data.
    """

    head: HeadName = "ssd"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    ssd: SSDConfig | None = field(default=None, metadata=OMIT_IF_NONE)
    faster_rcnn: FasterRCNNConfig | None = field(default=None, metadata=OMIT_IF_NONE)
    num_classes: int | None = None
    class_names: tuple[str, ...] = ()
    category_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        spec = head_spec(self.head)
        for name in {other.section for other in HEADS.values()} - {spec.section}:
            if getattr(self, name) is not None:
                users = sorted(h for h, other in HEADS.items() if other.section == name)
                raise ConfigError(
                    f"model.{name} holds settings of the {'/'.join(users)} head(s) but model.head is "
                    f"{self.head!r}: remove the model.{name} section or change model.head"
                )
        if getattr(self, spec.section) is None:
            object.__setattr__(self, spec.section, spec.config_cls())

    @property
    def head_config(self) -> Any:
        """The settings section of the chosen head (``ssd`` or ``faster_rcnn``)."""
        return getattr(self, head_spec(self.head).section)


@dataclass(frozen=True)
class DetDataConfig:
    """Where the data is and how it is augmented.

    ``train_ann``/``train_images``/``val_ann``/``val_images`` name COCO-format annotation files
    and image folders; leaving all four None trains on the embedded shapes dataset (generated
    once into ``$MNAPPS_CACHE`` or ``~/.cache/mnapps``, sized by the ``shapes_*`` keys).

    Attributes:
        recipe: training augmentation, ``"ssd"`` (photometric, zoom out, IoU crop, flip,
            resize) or ``"basic"`` (photometric, flip).
        train_size: side of the training resize; None uses the model's input size for SSD
            heads (``model.ssd.size``) and no resize for heads that resize themselves.
        zoom_out_max_ratio: largest zoom-out canvas for the ``ssd`` recipe (paper: 4).
        min_visibility: fraction of its area a box must keep after a crop to stay a target.
        min_box_size: boxes thinner than this many pixels are dropped (counted).
        eval_batch_size: images per forward pass in evaluation.
        eval_max_images: evaluate on only the first N validation images (None: all).
        shapes_num_train, shapes_num_val, shapes_image_size, shapes_seed: size of the embedded
            dataset (see :func:`mnapps.data.synthetic_det.ensure_shapes_detection`; None keeps
            the generator's defaults). Each setting is generated once and cached.
    """

    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    recipe: RecipeName = "ssd"
    train_size: int | None = None
    zoom_out_max_ratio: float = 4.0
    min_visibility: float = 0.2
    min_box_size: float = 1.0
    eval_batch_size: int = 8
    eval_max_images: int | None = None
    shapes_num_train: int | None = None
    shapes_num_val: int | None = None
    shapes_image_size: int | None = None
    shapes_seed: int = 0


@dataclass(frozen=True)
class DetConfig:
    """A detection experiment: ``model``, ``data`` and ``train`` (:class:`TrainConfig`)."""

    model: DetModelConfig = field(default_factory=DetModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ------------------------------------------------------------------------------------------
# data


def model_input_size(cfg: DetConfig) -> int | None:
    """Side of the training resize: ``data.train_size``, else the head's fixed input size (SSD's
    ``ssd.size``), else None (heads that resize themselves keeping the aspect ratio)."""
    if cfg.data.train_size is not None:
        return cfg.data.train_size
    return head_spec(cfg.model.head).input_size(cfg.model.head_config)


def build_model(
    cfg: DetConfig, num_classes: int, weights_backbone: str | os.PathLike | dict[str, Any] | None = None
) -> nn.Module:
    """The detector ``cfg.model`` describes (head, trunk, classes), trunk weights optional."""
    spec = head_spec(cfg.model.head)
    return spec.build(
        cfg.model.head_config,
        num_classes=num_classes,
        backbone_cfg=cfg.model.backbone,
        weights_backbone=weights_backbone,
    )


def _shapes_paths(data: DetDataConfig):
    kwargs: dict[str, Any] = {"seed": data.shapes_seed}
    for key in ("num_train", "num_val", "image_size"):
        value = getattr(data, f"shapes_{key}")
        if value is not None:
            kwargs[key] = value
    return ensure_shapes_detection(**kwargs)


def _resolve_split(
    data: DetDataConfig, split: str, ann: str | os.PathLike | None = None, images: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    ann = ann if ann is not None else getattr(data, f"{split}_ann")
    images = images if images is not None else getattr(data, f"{split}_images")
    if ann is None and images is None:
        if data.train_ann is not None or data.train_images is not None:
            raise ValueError(
                f"the training data is given but no {split} data: pass --{split}-ann and --{split}-images "
                f"(data.{split}_ann / data.{split}_images); the embedded shapes dataset is used only when no data "
                f"is given at all"
            )
        paths = _shapes_paths(data)
        return (paths.train_ann, paths.train_images) if split == "train" else (paths.val_ann, paths.val_images)
    if ann is None or images is None:
        missing = f"{split}_ann" if ann is None else f"{split}_images"
        raise ValueError(
            f"data.{missing} is missing: give both --{split}-ann (COCO JSON) and --{split}-images (folder), "
            f"or neither to use the embedded shapes dataset"
        )
    return Path(ann), Path(images)


def build_train_dataset(cfg: DetConfig) -> CocoDetection:
    """The training :class:`CocoDetection` with the configured augmentation (an annotation file
    listing no images is a ValueError naming it)."""
    ann, images = _resolve_split(cfg.data, "train")
    transforms = build_det_transforms(
        True,
        model_input_size(cfg),
        cfg.data.recipe,
        zoom_out_max_ratio=cfg.data.zoom_out_max_ratio,
        min_visibility=cfg.data.min_visibility,
    )
    dataset = CocoDetection(ann, images, transforms, min_box_size=cfg.data.min_box_size)
    if len(dataset) == 0:
        raise ValueError(
            f"the training set is empty: {ann} lists no images; give an annotation file with at least one "
            f"image (--train-ann / data.train_ann)"
        )
    return dataset


def build_eval_dataset(
    cfg: DetConfig, val_ann: str | os.PathLike | None = None, val_images: str | os.PathLike | None = None
) -> CocoDetection:
    """The validation :class:`CocoDetection` (no augmentation; the model resizes itself).

    Args:
        cfg: the detection config; ``data.val_*`` are used when the arguments are None, and the
            embedded shapes validation split when those are None too.
        val_ann, val_images: override the config's validation files.

    Raises:
        ValueError: only one of the two paths is known, the annotation file lists no images, or
            the dataset's categories differ from those the model was trained on
            (``cfg.model.category_ids``).
        FileNotFoundError: missing annotation file or image folder.
    """
    ann, images = _resolve_split(cfg.data, "val", val_ann, val_images)
    dataset = CocoDetection(ann, images, build_det_transforms(False, None), min_box_size=cfg.data.min_box_size)
    if len(dataset) == 0:
        # Found now rather than after a full training epoch, when evaluation first runs.
        raise ValueError(
            f"the validation set is empty: {ann} lists no images; give an annotation file with at least one "
            f"image (--val-ann / data.val_ann)"
        )
    trained = tuple(cfg.model.category_ids)
    if trained and tuple(dataset.cat_ids) != trained:
        raise ValueError(
            f"{ann} has category ids {dataset.cat_ids[:12]}{'...' if len(dataset.cat_ids) > 12 else ''} but the "
            f"model was trained on {list(trained[:12])}{'...' if len(trained) > 12 else ''}; evaluate on data "
            f"with the same categories"
        )
    return dataset


# ------------------------------------------------------------------------------------------
# training


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
    cfg: DetConfig,
    *,
    output_dir: str | os.PathLike,
    resume: str | os.PathLike | bool | None = None,
    weights_backbone: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    weights: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train the configured detector, evaluating with COCOeval after every epoch.

    Writes into ``output_dir``: ``config.yaml`` (the resolved config, classes included),
    ``last.pt`` every epoch, ``best.pt`` at the best validation AP, and ``metrics.json`` (the
    final evaluation's 12 COCO numbers and per-class AP). Prints COCO's summary, the per-class
    table and what happened to the data (boxes dropped/clipped, unreadable images skipped).
    Works under ``torchrun`` (DDP; rank 0 evaluates and writes).

    Args:
        cfg: the experiment.
        output_dir: run folder.
        resume: a checkpoint to continue from, or True for ``output_dir/last.pt``.
        weights_backbone: an mnapps checkpoint whose MobileNetV1 trunk initialises the model
            (e.g. the imported ImageNet weights); default ``model.backbone.weights``; ignored
            when resuming.
        weights: a whole mnapps detection checkpoint to fine-tune (e.g. an imported TF OD API
            SSD); ``cfg.model`` must describe its architecture (:func:`fine_tune_config`).
            Every tensor that fits is loaded; the class predictors are re-initialised when the
            data has another class count (:func:`load_detector_weights`). Ignored when resuming;
            not together with ``weights_backbone``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or None (CUDA when available).
        overwrite: start over in an ``output_dir`` that already holds checkpoints (without it,
            and without ``resume``, such a folder is refused before any work).

    Returns:
        ``{"metrics": final COCO metrics (empty without validation data), "per_class_ap",
        "summary": COCOeval's text, "engine": fit's result, "train_summary", "val_summary",
        "output_dir", "time_s"}``.

    Raises:
        ValueError: a bad config or data (named), an empty validation set, or a run folder
            that holds checkpoints (see :func:`mnapps.engine.loop.check_run_folder`).
    """
    if weights is not None and weights_backbone is not None:
        raise ValueError(
            "give --weights (a whole detector to fine-tune) or --weights-backbone (a trunk to start from), not both"
        )
    return run_distributed(
        _train_detector, device, cfg, output_dir, resume, weights_backbone or weights, overwrite=overwrite,
        whole=weights is not None,
    )


def _prepare_data(cfg: DetConfig, info: DistInfo) -> tuple[DetConfig, CocoDetection, CocoDetection]:
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
    return cfg, train_set, val_set


def _evaluator(cfg: DetConfig, val_set: CocoDetection, device: torch.device, last_eval: dict[str, Any]):
    """fit's ``evaluate(model, epoch)``: COCOeval on ``val_set``, the details kept in ``last_eval``."""
    val_loader = build_eval_loader(val_set, cfg.data.eval_batch_size, collate_fn, cfg.train.num_workers)

    def evaluate(eval_model: nn.Module, epoch: int) -> dict[str, float]:
        # Iterating a DataLoader draws from the global RNGs; restoring them keeps the training
        # run (augmentation, shuffling) independent of how often it is evaluated.
        rng_state = capture_rng_state()
        try:
            metrics, per_class, summary = evaluate_detector(
                eval_model, val_loader, val_set, device, max_images=cfg.data.eval_max_images
            )
        finally:
            restore_rng_state(rng_state)
        images = min(len(val_set), cfg.data.eval_max_images or len(val_set))
        last_eval.update(metrics=metrics, per_class_ap=per_class, summary=summary, epoch=epoch, images=images)
        return metrics

    return evaluate


def _train_detector(
    cfg: DetConfig,
    output_dir: str | os.PathLike,
    resume: str | os.PathLike | bool | None,
    weights_backbone: str | os.PathLike | None,
    *,
    overwrite: bool,
    whole: bool,
    info: DistInfo,
) -> dict[str, Any]:
    started = time.perf_counter()
    output_dir = Path(output_dir)
    # Before any data work: a finished run's best.pt must not be replaced by accident.
    check_run_folder(output_dir, resume=bool(resume), overwrite=overwrite)
    cfg, train_set, val_set = _prepare_data(cfg, info)

    # The model's initial weights depend only on the seed, not on what ran before.
    seed_everything(cfg.train.seed)
    weights = None if resume else (weights_backbone or cfg.model.backbone.weights)
    model = build_model(cfg, cfg.model.num_classes, weights_backbone=None if whole else weights)
    loaded = load_detector_weights(model, weights, cfg.model.num_classes) if whole and weights is not None else []
    if info.is_main:
        save_config(cfg, output_dir / "config.yaml")
        print(
            f"{cfg.model.head} on MobileNetV1 x{cfg.model.backbone.width_mult:g}, input {model_input_size(cfg)}, "
            f"{cfg.model.num_classes - 1} classes; train {len(train_set)} images ({train_set.ann_file}), "
            f"val {len(val_set)} images ({val_set.ann_file})"
        )
        if getattr(model, "backbone_load_report", None) is not None:
            print(f"backbone: {model.backbone_load_report}")
        for line in loaded:
            print(f"weights: {line}")

    counter = _BatchCounter()
    last_eval: dict[str, Any] = {}
    engine = fit(
        model,
        build_train_loader(train_set, cfg.train, collate_fn, info if info.distributed else None),
        cfg.train,
        loss_fn=detection_loss_fn(counter, head_spec(cfg.model.head).min_batch_images),
        output_dir=output_dir,
        evaluate=_evaluator(cfg, val_set, info.device, last_eval),
        best_metric="AP",
        checkpoint_meta={"task": "detection", "head": cfg.model.head, "config": cfg},
        resume=resume,
        device=info.device,
        batch_size_fn=lambda batch: len(batch[0]),
        overwrite=overwrite,
    )

    result: dict[str, Any] = {
        "metrics": dict(engine.get("last_metrics") or {}),
        "per_class_ap": last_eval.get("per_class_ap", {}),
        "summary": last_eval.get("summary", ""),
        "engine": engine,
        "train_summary": train_set.summary(skipped_samples=counter.skipped_samples),
        "val_summary": val_set.summary(),
        "output_dir": str(output_dir),
        "time_s": time.perf_counter() - started,
    }
    if info.is_main and last_eval:  # pr_curves.png and val_predictions.png: one more pass over the evaluated images
        write_detection_report(model, val_set, output_dir, device=info.device, max_images=cfg.data.eval_max_images,
                               batch_size=cfg.data.eval_batch_size, log=print)
    if info.is_main:
        _report(result, engine, counter, output_dir, last_eval)
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


# ------------------------------------------------------------------------------------------
# checkpoints and inference


def load_detector(
    checkpoint: str | os.PathLike | dict[str, Any],
    device: str | torch.device = "cpu",
    config: DetConfig | str | os.PathLike | None = None,
) -> tuple[nn.Module, DetConfig]:
    """Rebuild a detector from an mnapps detection checkpoint, in eval mode on ``device``.

    Args:
        checkpoint: path of ``best.pt``/``last.pt`` (or the loaded dict).
        device: where the model goes.
        config: a :class:`DetConfig` or YAML path to use instead of the stored config (its
            class information is taken from the checkpoint when it has none).

    Returns:
        ``(model, cfg)``; ``cfg.model`` holds ``num_classes``, ``class_names`` and
        ``category_ids`` of the training data.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: not a detection checkpoint, or weights that do not fit the config.
    """
    source = str(checkpoint) if not isinstance(checkpoint, dict) else "the given checkpoint"
    data = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    stored = data.get("config")
    if data.get("task") != "detection" or not isinstance(stored, dict):
        raise ValueError(
            f"{source} is not an mnapps detection checkpoint (task={data.get('task')!r}); pass the best.pt or "
            f"last.pt written by tools/train_det.py"
        )
    try:
        stored_cfg = from_dict(DetConfig, stored)
    except ConfigError as exc:
        raise ValueError(f"{source}: its stored config does not fit this version of mnapps: {exc}") from None
    if config is None:
        cfg = stored_cfg
    else:
        cfg = config if isinstance(config, DetConfig) else load_config(config, DetConfig)
        if cfg.model.num_classes is None:
            cfg = dataclasses.replace(
                cfg,
                model=dataclasses.replace(
                    cfg.model,
                    num_classes=stored_cfg.model.num_classes,
                    class_names=stored_cfg.model.class_names,
                    category_ids=stored_cfg.model.category_ids,
                ),
            )
    if cfg.model.num_classes is None:
        raise ValueError(f"{source}: the config does not say how many classes the model has (model.num_classes)")
    model = build_model(cfg, cfg.model.num_classes)
    try:
        model.load_state_dict(data["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(f"{source}: the weights do not fit the {cfg.model.head} model of the config ({first})") from None
    return model.to(device).eval(), cfg


def _label_names(cfg: DetConfig) -> list[str]:
    if cfg.model.class_names:
        return list(cfg.model.class_names)
    return ["__background__"] + [f"class_{i}" for i in range(1, (cfg.model.num_classes or 1))]


_NO_BOXES = np.zeros((0, 4), dtype=np.float32)
_NO_LABELS = np.zeros((0,), dtype=np.int64)


@torch.inference_mode()
def predict_images(
    model: nn.Module,
    paths: Iterable[str | os.PathLike],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    score_threshold: float = 0.0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run a detector over image files.

    Args:
        model: an eval-mode torchvision-style detector on ``device``.
        paths: image files (any format :func:`mnapps.data.image_io.load_rgb` reads).
        device: where images are sent.
        batch_size: images per forward pass.
        score_threshold: drop detections scoring below this.
        progress: show a tqdm bar.

    Returns:
        One dict per readable image, in order: ``{"path": Path, "image": uint8[H, W, 3],
        "boxes": FloatTensor[N, 4] xyxy pixels, "labels": Int64Tensor[N], "scores": [N]}``
        (tensors on the CPU). Unreadable images are warned about and left out.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = [Path(p) for p in paths]
    model.eval()
    outputs: list[dict[str, Any]] = []
    batch: list[tuple[Path, Any]] = []

    def flush() -> None:
        if not batch:
            return
        tensors = [sample_to_tensors(image, _NO_BOXES, _NO_LABELS)[0].to(device) for _, image in batch]
        for (path, image), det in zip(batch, model(tensors)):
            keep = det["scores"] >= score_threshold
            outputs.append(
                {"path": path, "image": image, **{k: det[k][keep].cpu() for k in ("boxes", "labels", "scores")}}
            )
        batch.clear()

    for path in tqdm(paths, desc="predict", unit="img", disable=not progress, dynamic_ncols=True):
        try:
            image = load_rgb(path)
        except ImageReadError as err:
            warnings.warn(f"skipping {err}", RuntimeWarning, stacklevel=2)
            continue
        batch.append((path, image))
        if len(batch) == batch_size:
            flush()
    flush()
    return outputs


# ------------------------------------------------------------------------------------------
# drawing and results files

def draw_detections(
    image: np.ndarray, boxes: Tensor, labels: Tensor, scores: Tensor, class_names: Sequence[str]
):
    """Draw boxes with ``"name score"`` captions on a copy of ``image``.

    Args:
        image: ``uint8[H, W, 3]`` RGB.
        boxes: ``[N, 4]`` xyxy pixels; labels ``[N]`` (indices into ``class_names``); scores ``[N]``.
        class_names: ``class_names[label]``.

    Returns:
        A ``PIL.Image.Image`` (RGB).
    """
    # torchvision's draw_bounding_boxes, captions in a TrueType font scaled to the image.
    drawn = draw_boxes(image, boxes, labels.tolist(), class_names, scores.tolist())
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())


def image_ids_for(paths: Sequence[Path], ann_file: str | os.PathLike | None = None) -> list[int]:
    """COCO image ids for image files: from ``ann_file``'s ``file_name`` entries when given,
    else the file name's number (COCO names files by id, ``000000000139.jpg`` -> 139), else the
    1-based position in ``paths``.

    Raises:
        ValueError: ``ann_file`` does not list one of the images.
    """
    if ann_file is not None:
        by_name = {Path(img["file_name"]).name: int(img["id"]) for img in load_coco_json(ann_file)["images"]}
        missing = [p.name for p in paths if p.name not in by_name]
        if missing:
            raise ValueError(f"{ann_file} does not list {missing[:5]} ({len(missing)} image(s)); pass the matching annotation file")
        return [by_name[p.name] for p in paths]
    if all(p.stem.isdigit() for p in paths) and len({int(p.stem) for p in paths}) == len(paths):
        return [int(p.stem) for p in paths]
    return list(range(1, len(paths) + 1))


# ------------------------------------------------------------------------------------------
# detectors from elsewhere: TF OD API import, fine-tuning a whole detector, plain callables

# Parameters whose shape follows the class count: re-initialised when fine-tuning changes it.
CLASS_PREDICTOR_PREFIXES = ("head.classification_head.", "roi_heads.box_predictor.")


def _imported_class_names(imported: TFImportedSSD, class_names: Sequence[str] | None) -> tuple[str, ...]:
    """The foreground class names to keep, checked against the logits (fewer keep the first ones)."""
    if class_names is None:
        # face-api.js reports only logit 1 (its face score); any other source keeps every class.
        if imported.layout == "faceapi":
            return ("face",)
        return tuple(f"class_{i}" for i in range(1, imported.num_classes))
    names = tuple(str(name).strip() for name in class_names)
    if not names or not all(names) or len(names) > imported.num_classes - 1:
        raise ValueError(
            f"the model has {imported.num_classes - 1} foreground classes ({imported.num_classes} logits per "
            f"anchor, the first is background) but the class names given are {list(names)}; pass 1 to "
            f"{imported.num_classes - 1} non-empty names (fewer keep only the first classes)"
        )
    return names


def import_tf_od_api_ssd_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    size: int | None = None,
    interpolated_anchor: InterpolatedAnchor | None = None,
    class_names: Sequence[str] | None = None,
    score_threshold: float | None = None,
    nms_threshold: float | None = None,
) -> tuple[Path, TFImportedSSD]:
    """Convert TF Object Detection API ``ssd_mobilenet_v1`` weights into an mnapps detection checkpoint.

    The checkpoint (``task="detection"``, ``head="ssd"``) records a full :class:`DetConfig`:
    the backbone settings the weights need (TF padding, ReLU6, BN eps 1e-3), input size,
    anchors, ``preprocess``, sigmoid scores, class names and count, so ``load_detector`` (and
    ``infer_det``, ``eval_det``, ``export``, ``train_det --weights``) rebuild the source model.

    Args:
        source: a TF.js weights folder (or its manifest), an ``.npz`` of TF names, or a TF
            checkpoint prefix (see :func:`mnapps.heads.tf_od_api.import_tf_od_api_ssd`).
        output: the ``.pt`` to write (atomically).
        size: input side; default the file's own (TF.js), else 300.
        interpolated_anchor: the source's anchor order; default read from the file's anchors
            when it has them, else ``"last"`` (the TF OD API since 2018).
        class_names: the foreground classes, in logit order. Fewer names than classes keep only
            the first ones (exact: scores are per-class sigmoids, see
            :func:`mnapps.heads.tf_od_api.keep_first_classes`). Default: ``face`` alone for
            face-api.js's layout (it reports only that logit), ``class_1, ...`` (all) otherwise.
        score_threshold, nms_threshold: inference settings to record; default the SSD's
            (0.01) and, for NMS, 0.5 for face-api.js's layout (its own) or 0.6 (the TF OD API's).

    Returns:
        ``(path, info)``: ``info`` is the import (:class:`~mnapps.heads.tf_od_api.TFImportedSSD`)
        with the recorded ``ssd`` settings and ``class_names``.

    Raises:
        FileNotFoundError: no such source.
        ValueError: an unreadable source, tensors that do not describe an ``ssd_mobilenet_v1``,
            or class names that do not match the logits (each message names the fix).
    """
    try:
        imported = import_tf_od_api_ssd(source, size=size, interpolated_anchor=interpolated_anchor)
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{source} could not be read as TF weights ({type(exc).__name__}: {exc})") from None
    names = _imported_class_names(imported, class_names)
    if len(names) < imported.num_classes - 1:
        imported = keep_first_classes(imported, len(names))
    changes: dict[str, float] = {"nms_threshold": 0.5 if imported.layout == "faceapi" else 0.6}
    if score_threshold is not None:
        changes["score_threshold"] = score_threshold
    if nms_threshold is not None:
        changes["nms_threshold"] = nms_threshold
    ssd_cfg = dataclasses.replace(imported.ssd, **changes)
    model_cfg = DetModelConfig(
        head="ssd", backbone=imported.backbone, ssd=ssd_cfg, num_classes=imported.num_classes,
        class_names=("__background__",) + names,
    )
    payload: dict[str, Any] = {
        "task": "detection",
        "head": "ssd",
        "config": to_dict(DetConfig(model=model_cfg)),
        "model": imported.model.state_dict(),
        "epoch": 0,
        "metrics": {},
        "source": f"TF OD API SSD {Path(source).name} ({imported.layout} layout)",
    }
    return save_checkpoint(payload, output), dataclasses.replace(imported, ssd=ssd_cfg, class_names=names)


def fine_tune_config(
    weights: str | os.PathLike, config: str | os.PathLike | None, overrides: Sequence[str] = ()
) -> DetConfig:
    """The config to fine-tune a whole detector checkpoint with.

    The model section is the checkpoint's (its architecture: head, backbone, head settings),
    with the classes left for the training data to decide; ``data`` and ``train`` come from
    ``config`` (None: defaults); ``overrides`` (``key=value``, ``model.*`` included) apply last.

    Raises:
        ValueError: not a detection checkpoint, or ``overrides`` change the head.
    """
    data = load_checkpoint(weights)
    stored = data.get("config")
    if data.get("task") != "detection" or not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        raise ValueError(
            f"--weights {weights} is not an mnapps detection checkpoint (task={data.get('task')!r}); pass a detector "
            f"(train_det's best.pt, or tools/import_weights.py --kind ssd), or use --weights-backbone for a trunk"
        )
    model = {k: v for k, v in stored["model"].items() if k not in ("num_classes", "class_names", "category_ids")}
    base = read_yaml(config) if config is not None else {}
    merged = apply_overrides({**base, "model": model}, overrides)
    try:
        cfg = from_dict(DetConfig, merged)
    except ConfigError as exc:
        raise ConfigError(f"{config or 'defaults'} with the model of {weights}: {exc}") from None
    if cfg.model.head != model.get("head", "ssd"):
        raise ValueError(
            f"--weights {weights} holds a {model.get('head', 'ssd')!r} detector but the head asked for is "
            f"{cfg.model.head!r}; drop --head (the checkpoint decides the architecture)"
        )
    return cfg


def _class_count(data: dict[str, Any]) -> Any:
    model = (data.get("config") or {}).get("model") or {}
    return model.get("num_classes", "?")


def load_detector_weights(
    model: nn.Module, weights: str | os.PathLike | dict[str, Any], num_classes: int | None = None
) -> list[str]:
    """Load a whole detector checkpoint into ``model``: every tensor that fits.

    Class-predictor tensors (:data:`CLASS_PREDICTOR_PREFIXES`) whose shape differs because
    the class count differs keep ``model``'s fresh initialisation; box predictors, extra
    layers and the trunk must fit. ``num_classes`` (the model's, background included) is only
    for the report.

    Returns:
        Report lines: what was loaded and, when it happened, one line naming the
        re-initialised class predictors with both shapes.

    Raises:
        ValueError: not a detection checkpoint, or other tensors missing or of another shape
            (the architectures differ).
    """
    source = str(weights) if not isinstance(weights, dict) else "the given checkpoint"
    data = weights if isinstance(weights, dict) else load_checkpoint(weights)
    if data.get("task") != "detection" or not isinstance(data.get("model"), dict):
        raise ValueError(f"{source} is not an mnapps detection checkpoint (task={data.get('task')!r})")
    stored, own = data["model"], model.state_dict()
    fitting, reinitialised, problems = {}, [], []
    for key, value in own.items():
        if key not in stored:
            problems.append(f"{key} missing")
        elif stored[key].shape == value.shape:
            fitting[key] = stored[key]
        elif key.startswith(CLASS_PREDICTOR_PREFIXES):
            reinitialised.append(f"{key} {list(stored[key].shape)} -> {list(value.shape)}")
        else:
            problems.append(f"{key} {list(stored[key].shape)} vs {list(value.shape)}")
    problems += [f"{key} not in the model" for key in stored if key not in own]
    if problems:
        raise ValueError(
            f"{source} does not fit the configured {type(model).__name__}: {'; '.join(problems[:4])}"
            f"{' ...' if len(problems) > 4 else ''}; fine-tune with the checkpoint's own model settings"
        )
    model.load_state_dict(fitting, strict=False)
    lines = [f"loaded {len(fitting)} of {len(own)} tensors from {source}"]
    if reinitialised:
        kernels = [entry for entry in reinitialised if entry.split(" ")[0].endswith(".weight")]
        others = len(reinitialised) - len(kernels)
        lines.append(
            f"class predictors re-initialised ({_class_count(data)} classes in the checkpoint, "
            f"{num_classes or '?'} in the data, background included): {', '.join(kernels)}"
            + (f" (and {others} bias tensor(s))" if others else "")
        )
    return lines


def box_detector(model: nn.Module, *, label: int = 1, device: str | torch.device = "cpu"):
    """``detect(image uint8[H, W, 3]) -> (boxes float32[N, 4] xyxy pixels, scores float32[N])``.

    The detections of class ``label`` (face-api.js's face: 1) that ``model`` (eval mode, on
    ``device``) returns for the photo, best first; the callable that
    :class:`mnapps.data.box_crops.BoxFaceAligner` takes.
    """
    model.eval()

    @torch.inference_mode()
    def detect(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tensor = sample_to_tensors(image, _NO_BOXES, _NO_LABELS)[0].to(device)
        found = model([tensor])[0]
        keep = found["labels"] == label
        return found["boxes"][keep].float().cpu().numpy(), found["scores"][keep].float().cpu().numpy()

    return detect
