"""Face crops from a box detector (the SSD face detector), cut the way MTCNN crops are cut.

This module owns turning detector boxes into the 160x160 face crops the FaceNet teacher and
the students take, for any detector given as a callable ``image uint8[H, W, 3] -> (boxes
float[N, 4] xyxy pixels, scores float[N])`` (``mnapps.tasks.detection.box_detector`` builds one
from an mnapps detector checkpoint, e.g. face-api.js's SSD imported by ``tools/import_weights.py
--kind ssd``). :class:`BoxFaceAligner` has :class:`mnapps.tasks.face.data.align.FaceAligner`'s interface
(``detect(image, keep_all=)`` -> faces with ``.crop``; ``aligner(images)`` -> crops), so
``align_folder`` takes either.

Where the crop goes (:class:`CropGeometry`): the teacher was trained on MTCNN crops, and an SSD
face box is not an MTCNN box (face-api.js's boxes are taller and narrower; MTCNN's reach lower
and are not square). ``MTCNN_LIKE`` moves and stretches the SSD box onto where MTCNN's box
would be (median ratios measured on the shared photos by ``tools/face_pipeline_bench.py``);
``SQUARE`` takes the square around the box. The crop is then cut as facenet-pytorch's
``extract_face`` cuts it: ``margin`` pixels of the final crop added around the region, the
region clipped to the photo and resized (bilinear) to ``image_size`` squared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from mnapps.choices import MTCNN_CROP, SQUARE_CROP

__all__ = [
    "BoxDetector",
    "BoxFace",
    "CropGeometry",
    "MTCNN_LIKE",
    "SQUARE",
    "CROP_GEOMETRIES",
    "crop_region",
    "cut_crop",
    "BoxFaceAligner",
]

#: ``image uint8[H, W, 3] -> (boxes float[N, 4] xyxy pixels, scores float[N])``.
BoxDetector = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
SELECTIONS = ("largest", "probability")


@dataclass(frozen=True)
class CropGeometry:
    """Where the crop region lies relative to a detector box of width ``w`` and height ``h``.

    The region is centred at the box centre moved by ``(shift_x, shift_y) * max(w, h)``, and
    is ``scale_x * w`` wide and ``scale_y * h`` tall; with ``square`` both sides become the
    longer one.
    """

    scale_x: float = 1.0
    scale_y: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    square: bool = False

    def __post_init__(self) -> None:
        if self.scale_x <= 0 or self.scale_y <= 0:
            raise ValueError(f"crop scales must be > 0, got {self.scale_x}, {self.scale_y}")


# face-api.js's SSD against facenet-pytorch's MTCNN on the 105 faces both found in the shared
# photos (medians printed by tools/face_pipeline_bench.py, docs/tf_od_api.md): MTCNN's box is
# 1.02x as wide and 1.07x as tall as the SSD's, centred 0.012 (right) and 0.017 (up) of the SSD
# box's longer side away from it.
MTCNN_LIKE = CropGeometry(scale_x=1.022, scale_y=1.07, shift_x=0.012, shift_y=-0.017)
SQUARE = CropGeometry(square=True)
CROP_GEOMETRIES = {MTCNN_CROP: MTCNN_LIKE, SQUARE_CROP: SQUARE}


@dataclass
class BoxFace:
    """One face found by the box detector (the fields :class:`mnapps.tasks.face.data.align.DetectedFace` has).

    Attributes:
        crop: ``uint8[S, S, 3]`` RGB crop.
        box: ``(x1, y1, x2, y2)`` the detector's box in the photo's pixels.
        probability: the detector's score.
        region: ``(x1, y1, x2, y2)`` what was cut (before the margin and clipping).
        landmarks: None (a box detector gives none).
    """

    crop: np.ndarray
    box: tuple[float, float, float, float]
    probability: float
    region: tuple[float, float, float, float]
    landmarks: None = None


def crop_region(box: Sequence[float], geometry: CropGeometry = MTCNN_LIKE) -> tuple[float, float, float, float]:
    """The crop region ``(x1, y1, x2, y2)`` for a detector box (see :class:`CropGeometry`)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    width, height = x2 - x1, y2 - y1
    if width <= 0 or height <= 0:
        raise ValueError(f"a face box needs x2 > x1 and y2 > y1, got {tuple(box)}")
    longer = max(width, height)
    cx = (x1 + x2) / 2 + geometry.shift_x * longer
    cy = (y1 + y2) / 2 + geometry.shift_y * longer
    half_w, half_h = geometry.scale_x * width / 2, geometry.scale_y * height / 2
    if geometry.square:
        half_w = half_h = max(half_w, half_h)
    return cx - half_w, cy - half_h, cx + half_w, cy + half_h


def cut_crop(image: np.ndarray, region: Sequence[float], image_size: int = 160, margin: int = 0) -> np.ndarray:
    """``uint8[S, S, 3]``: ``region`` plus margin, clipped to the photo, resized (bilinear).

    As facenet-pytorch's ``extract_face``: ``margin`` is in pixels of the final crop, so the
    region grows by ``margin * side / (image_size - margin)`` along each axis; the grown
    region is rounded down to whole pixels, clipped to the photo and stretched to the square.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    if not 0 <= margin < image_size:
        raise ValueError(f"margin must be in [0, image_size={image_size}), got {margin}")
    x1, y1, x2, y2 = (float(v) for v in region)
    grow_x = margin * (x2 - x1) / (image_size - margin)
    grow_y = margin * (y2 - y1) / (image_size - margin)
    height, width = image.shape[:2]
    left, top = int(max(x1 - grow_x / 2, 0)), int(max(y1 - grow_y / 2, 0))
    right, bottom = int(min(x2 + grow_x / 2, width)), int(min(y2 + grow_y / 2, height))
    if right <= left or bottom <= top:
        raise ValueError(f"the crop region {tuple(region)} lies outside the {width}x{height} photo")
    patch = Image.fromarray(image).crop((left, top, right, bottom))
    return np.asarray(patch.resize((image_size, image_size), Image.BILINEAR))


class BoxFaceAligner:
    """Face crops from a box detector, with :class:`mnapps.tasks.face.data.align.FaceAligner`'s interface.

    Args:
        detector: ``image uint8[H, W, 3] -> (boxes [N, 4] xyxy pixels, scores [N])``.
        image_size: side of the square crops (160 for FaceNet).
        margin: extra pixels around the region in the crop (facenet-pytorch's convention).
        min_score: boxes scoring below this are not faces (face-api.js's default is 0.5).
        geometry: where the crop lies relative to the box (default :data:`MTCNN_LIKE`).
        select: which face :meth:`detect` keeps: ``"largest"`` box (facenet-pytorch's rule)
            or best ``"probability"``.
    """

    def __init__(
        self,
        detector: BoxDetector,
        *,
        image_size: int = 160,
        margin: int = 0,
        min_score: float = 0.5,
        geometry: CropGeometry = MTCNN_LIKE,
        select: str = "largest",
    ) -> None:
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
        if not 0 <= margin < image_size:
            raise ValueError(f"margin must be in [0, image_size={image_size}), got {margin}")
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {min_score}")
        if select not in SELECTIONS:
            raise ValueError(f"select must be one of {list(SELECTIONS)}, got {select!r}")
        self.detector = detector
        self.image_size, self.margin, self.min_score = int(image_size), int(margin), float(min_score)
        self.geometry, self.select = geometry, select

    def detect(self, image: Image.Image | np.ndarray, *, keep_all: bool = False) -> list[BoxFace]:
        """Every face in ``image`` (or only the selected one), in selection order; ``[]`` if none."""
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        boxes, scores = self.detector(image)
        boxes, scores = np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores, dtype=np.float64)
        keep = (scores >= self.min_score) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores = boxes[keep], scores[keep]
        if self.select == "largest":
            order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
        else:
            order = np.argsort(-scores, kind="stable")
        faces = []
        for i in order if keep_all else order[:1]:
            region = crop_region(boxes[i], self.geometry)
            crop = cut_crop(image, region, self.image_size, self.margin)
            faces.append(BoxFace(crop, tuple(float(v) for v in boxes[i]), float(scores[i]), region))
        return faces

    def __call__(self, images: Sequence[Image.Image | np.ndarray]) -> list[np.ndarray | None]:
        """The selected face crop of each image, or None where no face was found."""
        results: list[np.ndarray | None] = []
        for image in images:
            faces = self.detect(image)
            results.append(faces[0].crop if faces else None)
        return results
