"""Pseudo-labels: a teacher detector's boxes on unlabelled photos, as a COCO annotation file.

This module owns turning a folder of photos into training data for a smaller detector: it runs
a detection checkpoint (:func:`mnapps.tasks.detection.load_detector` and
:func:`~mnapps.tasks.detection.predict_images`) over the photos and writes what the teacher
found at or above a score threshold as COCO *annotations* (not results), so the file goes to
``train_det --train-ann`` and ``eval_det --val-ann`` as it is.

File contract (:func:`pseudo_label_coco`): ``images`` lists every readable photo, in the order
given, with ids 1..N, its ``file_name`` relative to the image root and its real ``width`` /
``height`` (as :func:`mnapps.data.image_io.load_rgb` decodes it, the size training reads);
a photo where the teacher finds nothing stays as an image without annotations (pure
background). ``categories`` are the teacher's classes (its category ids and names, ``1..K``
when it has none). Each annotation carries ``bbox`` ``[x, y, w, h]`` in pixels, ``area``,
``iscrowd`` 0 and the teacher's ``score``. ``info`` records the teacher checkpoint (path and
sha256), the score threshold and the NMS threshold the teacher ran with.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from mnapps.data.image_io import IMAGE_EXTENSIONS, list_images
from mnapps.files import atomic_write, check_output_path
from mnapps.tasks.detection import DetConfig, load_detector, predict_images

__all__ = ["pseudo_label_coco", "write_pseudo_labels", "read_photo_list", "select_photos"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_photo_list(list_file: str | os.PathLike, root: str | os.PathLike) -> list[Path]:
    """Photos named in a text file, one path relative to ``root`` per line (blank lines and
    lines starting with ``#`` are skipped).

    Raises:
        FileNotFoundError: the list, or a photo it names, does not exist (the first few named).
    """
    list_file, root = Path(list_file), Path(root)
    if not list_file.is_file():
        raise FileNotFoundError(f"photo list {list_file} does not exist")
    names = [line.strip() for line in list_file.read_text().splitlines()]
    paths = [root / name for name in names if name and not name.startswith("#")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{list_file} names {len(missing)} photo(s) not under {root}: {missing[:3]}; give the folder the "
            f"list's paths are relative to"
        )
    return paths


def select_photos(root: str | os.PathLike, list_file: str | os.PathLike | None = None) -> list[Path]:
    """The photos a tool works on: those ``list_file`` names (:func:`read_photo_list`), else every
    image under ``root``, sub-folders included.

    Raises:
        FileNotFoundError: the list or a photo it names is missing, or there is no photo at all.
    """
    paths = read_photo_list(list_file, root) if list_file else list_images(root, recursive=True)
    if not paths:
        raise FileNotFoundError(f"{root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def _categories(cfg: DetConfig) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """COCO categories of the teacher's foreground classes and its label -> category id map."""
    count = (cfg.model.num_classes or 1) - 1
    names = list(cfg.model.class_names[1:]) or [f"class_{i}" for i in range(1, count + 1)]
    ids = list(cfg.model.category_ids) or list(range(1, count + 1))
    categories = [{"id": int(cat), "name": str(name), "supercategory": str(name)} for cat, name in zip(ids, names)]
    return categories, {label: int(cat) for label, cat in enumerate(ids, start=1)}


def _annotations(prediction: dict[str, Any], image_id: int, first_id: int, label_to_cat: dict[int, int]):
    height, width = prediction["image"].shape[:2]
    boxes = prediction["boxes"].clone()
    # Boxes of faces cut by the photo's edge may reach past it; a label must lie in the image.
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    found = []
    for box, label, score in zip(boxes.tolist(), prediction["labels"].tolist(), prediction["scores"].tolist()):
        x1, y1, x2, y2 = box
        if x2 <= x1 or y2 <= y1 or int(label) not in label_to_cat:
            continue
        w, h = x2 - x1, y2 - y1
        found.append({
            "id": first_id + len(found), "image_id": image_id, "category_id": label_to_cat[int(label)],
            "bbox": [round(x1, 2), round(y1, 2), round(w, 2), round(h, 2)], "area": round(w * h, 2),
            "iscrowd": 0, "score": round(float(score), 4),
        })
    return found


def pseudo_label_coco(
    checkpoint: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    root: str | os.PathLike,
    *,
    score_threshold: float = 0.5,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """The teacher's detections on ``paths`` as a COCO annotation dict (see the module docstring).

    Args:
        checkpoint: an mnapps detection checkpoint (``train_det``'s ``best.pt`` or an import).
        paths: photo files, all under ``root``.
        root: the folder ``file_name`` entries are relative to (``--train-images`` later).
        score_threshold: keep detections scoring at least this.
        device, batch_size, progress: as :func:`mnapps.tasks.detection.predict_images`.

    Returns:
        ``(coco, unreadable)``: the annotation dict and the messages of photos that could not
        be read (left out of the file).

    Raises:
        ValueError: a threshold outside [0, 1], or a photo outside ``root``.
        FileNotFoundError: no such checkpoint.
    """
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
    root = Path(root)
    paths = [Path(p) for p in paths]
    outside = [str(p) for p in paths if not p.resolve().is_relative_to(root.resolve())]
    if outside:
        raise ValueError(f"{len(outside)} photo(s) are not under the image folder {root}: {outside[:3]}")
    model, cfg = load_detector(checkpoint, device=device)
    categories, label_to_cat = _categories(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        predictions = predict_images(
            model, paths, device=device, batch_size=batch_size, score_threshold=score_threshold, progress=progress
        )
    images, annotations = [], []
    for image_id, prediction in enumerate(predictions, start=1):
        height, width = prediction["image"].shape[:2]
        name = prediction["path"].resolve().relative_to(root.resolve()).as_posix()
        images.append({"id": image_id, "file_name": name, "width": int(width), "height": int(height)})
        annotations += _annotations(prediction, image_id, len(annotations) + 1, label_to_cat)
    checkpoint = Path(checkpoint)
    info = {
        "description": f"pseudo-labels: detections of {checkpoint.name} scoring >= {score_threshold:g}",
        "teacher_checkpoint": str(checkpoint),
        "teacher_sha256": _sha256(checkpoint),
        "score_threshold": float(score_threshold),
        "nms_threshold": getattr(cfg.model.head_settings, "nms_threshold", None),
        "date_created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    coco = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    return coco, [str(w.message) for w in caught]


def write_pseudo_labels(
    checkpoint: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    root: str | os.PathLike,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    **kwargs: Any,
) -> tuple[Path, dict[str, Any], list[str]]:
    """Write :func:`pseudo_label_coco`'s file to ``output`` (atomically).

    An existing ``output`` is refused before any work unless ``overwrite``, and ``output`` may
    never be an input (the checkpoint, or inside the photo folder).

    Returns:
        ``(path, coco, unreadable)``.

    Raises:
        FileExistsError: ``output`` exists and ``overwrite`` is False.
        ValueError: ``output`` is a folder or an input; see :func:`pseudo_label_coco`.
    """
    output = Path(output)
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder; give a file name such as pseudo_labels.json")
    check_output_path(output, [root, checkpoint], what="output file")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it, or choose another --output")
    coco, unreadable = pseudo_label_coco(checkpoint, paths, root, **kwargs)
    output.parent.mkdir(parents=True, exist_ok=True)
    path = atomic_write(output, lambda handle: handle.write(json.dumps(coco, indent=1).encode()))
    return path, coco, unreadable
