"""Detection data: the COCO-format training and validation sets a :class:`DetConfig` names.

This module owns turning ``cfg.data`` into :class:`mnapps.data.coco.CocoDetection` datasets:
the user's annotation files and image folders, or the embedded shapes dataset when none are
given, with the configured augmentation, and the start-up checks (an empty split, categories
other than the model's) that would otherwise fail after an epoch of training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mnapps.data.coco import CocoDetection
from mnapps.data.synthetic_det import ensure_shapes_detection
from mnapps.data.transforms import build_det_transforms

from .config import DetConfig, DetDataConfig, model_input_size

__all__ = ["build_train_dataset", "build_eval_dataset", "build_det_datasets", "det_image_files"]


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


def build_det_datasets(cfg: DetConfig) -> tuple[CocoDetection, CocoDetection]:
    """The training and validation datasets of ``cfg`` (the task table's dataset factory)."""
    return build_train_dataset(cfg), build_eval_dataset(cfg)


def det_image_files(cfg: DetConfig, split: str) -> list[Path]:
    """The image files of the validation (``"parity"``) or training (``"calibration"``) split."""
    dataset = build_eval_dataset(cfg) if split == "parity" else build_train_dataset(cfg)
    folder = Path(dataset.image_dir)
    return [folder / info["file_name"] for info in dataset.coco.loadImgs(dataset.ids)]
