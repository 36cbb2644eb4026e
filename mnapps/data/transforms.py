"""Bounding-box-aware detection augmentation (albumentations) and the sample -> tensor step.

This module owns what happens to a detection sample between the image file and the model:

* ``recipe="ssd"`` (training): the SSD paper's augmentation (Liu et al. 2016, section 2.2 and
  the "data augmentation for small objects" of section 3.6): photometric distortion, zoom out
  onto a mean-filled canvas up to 4x (:class:`ZoomOut`), the SSD random IoU crop
  (:class:`SSDRandomCrop`), horizontal flip, resize to ``size x size``;
* ``recipe="basic"`` (training, for Faster R-CNN, whose model resizes itself): photometric
  distortion and horizontal flip only;
* evaluation: ``size=None`` only converts to tensors (the model resizes); an int resizes.

Boxes are handled by albumentations (``pascal_voc`` = xyxy pixels) with the labels carried
along; boxes left with under ``min_visibility`` of their area, or under ``min_box_size`` pixels
wide or tall, are dropped, so no degenerate box ever reaches a box coder.

Memory: in a DataLoader worker, the first augmented sample sets glibc's mmap threshold to a
fixed 1 MiB, so that the large temporary images of the SSD recipe are returned to the system
when freed and a worker's memory stays flat from one pass to the next.

Randomness: every call draws one seed from torch's default generator and drives all the
albumentations transforms from it, so ``torch.manual_seed`` makes augmentation reproducible,
DataLoader workers (which torch seeds differently) never repeat each other, and a resumed run
that restores torch's RNG state replays the same augmentations.

Transform contract: ``(image uint8[H,W,3] RGB, boxes float32[N,4] xyxy pixels, labels int64[N])
-> (FloatTensor[3,H',W'] in [0,1], FloatTensor[N',4], Int64Tensor[N'])``.
"""

from __future__ import annotations

import ctypes
import os
import random
from typing import Any, Sequence

# albumentations asks PyPI for a newer version on import (up to 2 s and a warning when offline);
# a training library must not phone home, so opt out unless the user decided otherwise.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402 - must follow the environment default above
import cv2
import numpy as np
import torch
from albumentations.core.transforms_interface import DualTransform
from albumentations.core.type_definitions import Targets
from torch import Tensor
from torch.utils.data import get_worker_info

__all__ = [
    "DetTransform",
    "ZoomOut",
    "SSDRandomCrop",
    "build_det_transforms",
    "sample_to_tensors",
    "RECIPES",
    "MEAN_RGB_UINT8",
]

RECIPES = ("ssd", "basic")
#: ImageNet mean colour, the fill of zoomed-out canvases (SSD fills with the dataset mean).
MEAN_RGB_UINT8 = (124, 116, 104)
#: SSD's crop options: ``None`` keeps the whole image, ``0.0`` is an unconstrained random patch,
#: the others require some kept object to overlap the patch with at least that IoU (paper 2.2).
SSD_MIN_IOUS: tuple[float | None, ...] = (None, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9)


# glibc's mallopt parameter number and the size from which buffers go straight to the OS.
_M_MMAP_THRESHOLD = -3
_LARGE_BUFFER_BYTES = 1 << 20
_allocator_tuned = False


def _return_large_buffers_to_os() -> None:
    """In this process, allocate buffers of 1 MiB and more with mmap and unmap them when freed.

    glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB), after
    which zoom-out canvases (up to 16x the image) come from the heap and stay there: a
    DataLoader worker's memory then follows the largest canvas it has drawn, pass after pass,
    instead of its live data. A fixed threshold (which also stops the adjustment) keeps it flat.
    Without glibc (macOS, Windows, musl) this does nothing.
    """
    global _allocator_tuned
    _allocator_tuned = True
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _LARGE_BUFFER_BYTES)
    except (OSError, AttributeError, TypeError):
        pass


def sample_to_tensors(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """Convert a numpy sample to the tensors detectors take.

    Args:
        image: ``uint8[H, W, 3]`` RGB.
        boxes: ``float[N, 4]`` xyxy pixels (any N, including 0).
        labels: ``int[N]``.

    Returns:
        ``(FloatTensor[3, H, W] in [0, 1], FloatTensor[N, 4], Int64Tensor[N])``.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    # numpy does the layout change and scaling: torch's intra-op thread pool costs more than the
    # work itself for one image (and DataLoader workers run single-threaded anyway).
    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32) / np.float32(255.0))
    boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(-1)
    return image_t, boxes_t, labels_t


def _box_iou_with_patch(boxes: np.ndarray, patch: Sequence[float]) -> np.ndarray:
    """IoU of each xyxy box with one xyxy patch."""
    ix = np.clip(np.minimum(boxes[:, 2], patch[2]) - np.maximum(boxes[:, 0], patch[0]), 0, None)
    iy = np.clip(np.minimum(boxes[:, 3], patch[3]) - np.maximum(boxes[:, 1], patch[1]), 0, None)
    inter = ix * iy
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    patch_area = (patch[2] - patch[0]) * (patch[3] - patch[1])
    return inter / np.maximum(areas + patch_area - inter, 1e-12)


class ZoomOut(DualTransform):
    """Place the image at a random position on a larger canvas filled with ``fill``.

    SSD's "zoom out" (paper section 3.6): with canvas side ratio ``r ~ U(1, max_ratio)`` objects
    become up to ``max_ratio`` times smaller, which is what teaches SSD small objects.

    Args:
        max_ratio: largest canvas/image side ratio (>= 1).
        fill: RGB fill colour of the canvas.
        p: probability of applying.
    """

    _targets = (Targets.IMAGE, Targets.BBOXES)

    def __init__(self, max_ratio: float = 4.0, fill: Sequence[int] = MEAN_RGB_UINT8, p: float = 0.5) -> None:
        super().__init__(p=p)
        if not max_ratio >= 1.0:
            raise ValueError(f"ZoomOut max_ratio must be >= 1, got {max_ratio}")
        self.max_ratio = float(max_ratio)
        self.fill = tuple(int(c) for c in fill)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        ratio = self.py_random.uniform(1.0, self.max_ratio)
        canvas_w, canvas_h = max(width, round(width * ratio)), max(height, round(height * ratio))
        left = self.py_random.randint(0, canvas_w - width)
        top = self.py_random.randint(0, canvas_h - height)
        return {"canvas_size": (canvas_w, canvas_h), "offset": (left, top)}

    def apply(
        self, img: np.ndarray, canvas_size: tuple[int, int], offset: tuple[int, int], **params: Any
    ) -> np.ndarray:
        canvas_w, canvas_h = canvas_size
        left, top = offset
        if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
            # OpenCV writes the border in one pass; filling the whole canvas with numpy first
            # (a broadcast per pixel over up to 16x the image) was the slowest step of the
            # SSD recipe. Same pixels either way.
            return cv2.copyMakeBorder(img, top, canvas_h - top - img.shape[0], left, canvas_w - left - img.shape[1],
                                      cv2.BORDER_CONSTANT, value=self.fill[:3])
        fill = np.asarray(self.fill[: img.shape[2]] if img.ndim == 3 else self.fill[0], dtype=img.dtype)
        canvas = np.empty((canvas_h, canvas_w) + img.shape[2:], dtype=img.dtype)
        canvas[...] = fill
        canvas[top : top + img.shape[0], left : left + img.shape[1]] = img
        return canvas

    def apply_to_bboxes(
        self, bboxes: np.ndarray, canvas_size: tuple[int, int], offset: tuple[int, int], **params: Any
    ) -> np.ndarray:
        # albumentations keeps boxes normalised to the current image; re-normalise to the canvas.
        height, width = params["shape"][:2]
        canvas_w, canvas_h = canvas_size
        out = bboxes.astype(np.float64, copy=True)
        out[:, [0, 2]] = (out[:, [0, 2]] * width + offset[0]) / canvas_w
        out[:, [1, 3]] = (out[:, [1, 3]] * height + offset[1]) / canvas_h
        return out.astype(bboxes.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_ratio", "fill")


class SSDRandomCrop(DualTransform):
    """The SSD random crop: a patch with a minimum IoU to some object, keeping boxes centred in it.

    Each call draws an option from ``min_ious`` (paper section 2.2): ``None`` keeps the whole
    image; ``0.0`` accepts any patch; ``t`` requires a patch whose IoU with at least one object
    (among those whose centre is inside the patch) is ``>= t``. Patches have sides
    ``U(min_scale, 1)`` of the image's and aspect ratio within ``aspect_range``; up to ``trials``
    patches are tried per option, and after ``max_options`` unlucky options the whole image is
    kept. Boxes whose centre falls outside the patch are dropped; the others are cut to the
    patch by the pipeline (which then drops those left with too little visible area).

    Args:
        min_ious: the options (see above).
        min_scale: smallest patch side as a fraction of the image side.
        aspect_range: allowed patch width/height ratios (in pixels).
        trials: patch draws per option.
        max_options: options drawn before giving up and keeping the image.
        p: probability of applying.
    """

    _targets = (Targets.IMAGE, Targets.BBOXES)

    def __init__(
        self,
        min_ious: Sequence[float | None] = SSD_MIN_IOUS,
        min_scale: float = 0.3,
        aspect_range: tuple[float, float] = (0.5, 2.0),
        trials: int = 40,
        max_options: int = 10,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        if not min_ious or any(t is not None and not 0.0 <= t <= 1.0 for t in min_ious):
            raise ValueError(f"min_ious must be a non-empty list of None or values in [0, 1], got {min_ious}")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        if not 0.0 < aspect_range[0] <= aspect_range[1]:
            raise ValueError(f"aspect_range must be (low, high) with 0 < low <= high, got {aspect_range}")
        self.min_ious = tuple(min_ious)
        self.min_scale = float(min_scale)
        self.aspect_range = (float(aspect_range[0]), float(aspect_range[1]))
        self.trials = int(trials)
        self.max_options = int(max_options)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        whole = (0, 0, width, height)
        boxes = np.asarray(data.get("bboxes", np.zeros((0, 4))), dtype=np.float64)[:, :4].reshape(-1, 4)
        boxes = boxes * np.array([width, height, width, height], dtype=np.float64)
        centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
        for _ in range(self.max_options):
            min_iou = self.py_random.choice(self.min_ious)
            if min_iou is None:
                return {"crop_coords": whole}
            for _ in range(self.trials):
                crop_w = max(1, round(width * self.py_random.uniform(self.min_scale, 1.0)))
                crop_h = max(1, round(height * self.py_random.uniform(self.min_scale, 1.0)))
                if not self.aspect_range[0] <= crop_w / crop_h <= self.aspect_range[1]:
                    continue
                left = self.py_random.randint(0, width - crop_w)
                top = self.py_random.randint(0, height - crop_h)
                crop = (left, top, left + crop_w, top + crop_h)
                if len(boxes) == 0:
                    return {"crop_coords": crop}  # background image: any patch will do
                inside = _centres_inside(centres, crop)
                if not inside.any():
                    continue
                if _box_iou_with_patch(boxes[inside], crop).max() >= min_iou:
                    return {"crop_coords": crop}
        return {"crop_coords": whole}

    def apply(self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        x1, y1, x2, y2 = crop_coords
        return np.ascontiguousarray(img[y1:y2, x1:x2])

    def apply_to_bboxes(self, bboxes: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        height, width = params["shape"][:2]
        x1, y1, x2, y2 = crop_coords
        pixels = bboxes[:, :4].astype(np.float64) * np.array([width, height, width, height])
        centres = np.stack([(pixels[:, 0] + pixels[:, 2]) / 2, (pixels[:, 1] + pixels[:, 3]) / 2], axis=1)
        keep = _centres_inside(centres, crop_coords)
        out = bboxes[keep].astype(np.float64, copy=True)
        # Shift into the patch and re-normalise; boxes stay uncut so the pipeline can measure
        # how much of each is visible (min_visibility) before clipping them.
        out[:, [0, 2]] = (pixels[keep][:, [0, 2]] - x1) / (x2 - x1)
        out[:, [1, 3]] = (pixels[keep][:, [1, 3]] - y1) / (y2 - y1)
        return out.astype(bboxes.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_ious", "min_scale", "aspect_range", "trials", "max_options")


def _centres_inside(centres: np.ndarray, crop: Sequence[float]) -> np.ndarray:
    return (centres[:, 0] > crop[0]) & (centres[:, 0] < crop[2]) & (centres[:, 1] > crop[1]) & (centres[:, 1] < crop[3])


class DetTransform:
    """An albumentations pipeline wrapped to the detection transform contract.

    Args:
        transforms: albumentations transforms applied in order.
        min_visibility: boxes keeping less than this fraction of their area are dropped.
        min_box_size: boxes narrower or shorter than this many pixels are dropped.
        stochastic: whether the pipeline is random (then each call is seeded from torch's RNG).

    Call: ``(image uint8[H,W,3], boxes float32[N,4] xyxy, labels int64[N]) ->
    (FloatTensor[3,H',W'] in [0,1], FloatTensor[N',4], Int64Tensor[N'])``.
    """

    def __init__(
        self,
        transforms: Sequence[A.BasicTransform],
        *,
        min_visibility: float = 0.2,
        min_box_size: float = 1.0,
        stochastic: bool = True,
    ) -> None:
        self.stochastic = stochastic
        # An empty pipeline (evaluation at native size) only converts to tensors.
        self.compose = None if not transforms else A.Compose(
            list(transforms),
            bbox_params=A.BboxParams(
                format="pascal_voc",
                label_fields=["labels"],
                min_visibility=min_visibility,
                min_width=min_box_size,
                min_height=min_box_size,
                # Boxes on the border may exceed it by float rounding: clip them, and drop boxes
                # that clipping leaves empty instead of letting albumentations raise.
                clip=True,
                filter_invalid_bboxes=True,
            ),
        )

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(boxes) != len(labels):
            raise ValueError(f"got {len(boxes)} boxes but {len(labels)} labels")
        if self.compose is None:
            return sample_to_tensors(image, boxes, labels)
        if not _allocator_tuned and get_worker_info() is not None:
            _return_large_buffers_to_os()  # once per DataLoader worker, at its first sample
        if self.stochastic:
            # One shared generator pair for all transforms (Compose's own seeding would give every
            # transform the same stream, correlating e.g. flip with colour jitter).
            seed = int(torch.randint(0, 2**62, (1,)).item())
            self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = self.compose(image=image, bboxes=boxes, labels=labels)
        return sample_to_tensors(out["image"], out["bboxes"], out["labels"])

    def __repr__(self) -> str:
        names = "" if self.compose is None else ", ".join(type(t).__name__ for t in self.compose.transforms)
        return f"DetTransform([{names}])"


def build_det_transforms(
    train: bool,
    size: int | None,
    recipe: str = "ssd",
    *,
    zoom_out_max_ratio: float = 4.0,
    min_visibility: float = 0.2,
) -> DetTransform:
    """Build the detection transform for training or evaluation.

    Args:
        train: training augmentation (True) or evaluation preprocessing (False).
        size: output side for a square resize (SSD: 300), or ``None`` to keep the size (the model
            resizes, as Faster R-CNN does).
        recipe: ``"ssd"`` (photometric, zoom out, SSD IoU crop, flip, resize) or ``"basic"``
            (photometric, flip, optional resize). Ignored for evaluation.
        zoom_out_max_ratio: largest zoom-out canvas/image side ratio (``"ssd"`` only).
        min_visibility: fraction of its area a box must keep inside a crop to stay a target.

    Returns:
        A :class:`DetTransform` (see the module docstring for the contract).

    Raises:
        ValueError: unknown recipe or a size that is not a positive int.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; choose from {list(RECIPES)}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ValueError(f"size must be a positive int (e.g. 300) or None, got {size!r}")
    resize = [A.Resize(size, size, interpolation=cv2.INTER_LINEAR)] if size is not None else []
    if not train:
        return DetTransform(resize, min_visibility=0.0, stochastic=False)
    # SSD's photometric distortion: brightness +-32/255, contrast and saturation x[0.5, 1.5],
    # hue +-18 degrees (0.05 of the circle), applied in random order.
    photometric = A.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05, p=0.8)
    flip = A.HorizontalFlip(p=0.5)
    if recipe == "basic":
        steps = [photometric, flip, *resize]
    else:
        steps = [photometric, ZoomOut(max_ratio=zoom_out_max_ratio, p=0.5), SSDRandomCrop(), flip, *resize]
    return DetTransform(steps, min_visibility=min_visibility, stochastic=True)
