"""Detection inference: running a detector over image files, drawing and naming its results.

This module owns :func:`predict_images` (batches of photos -> boxes, labels, scores),
:func:`draw_detections`, :func:`image_ids_for` (the COCO image ids of result files) and
:func:`box_detector`, which wraps a loaded detector as the ``image -> (boxes, scores)`` callable
that the SSD face cropper (:mod:`mnapps.data.box_crops`) takes.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from mnapps.data.coco import load_coco_json
from mnapps.data.image_io import ImageReadError, load_rgb
from mnapps.data.transforms import sample_to_tensors
from mnapps.eval.plots import draw_boxes

from .config import DetConfig

__all__ = ["predict_images", "draw_detections", "image_ids_for", "box_detector"]


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
