"""Is a crop a face? A second look by MTCNN at the crop itself, to keep background out of training.

This module owns the clean-crop rule of the face tools. A detector run with ``keep_all`` also
returns its weak candidates: on the shared photos MTCNN's extra detections include 13 patches
of hair, shoulders, curtains and blur (face probability 0.78 to 0.99 in the photo), and the
face-api.js SSD calls a cat a face at 0.93. Neither the photo-level probability nor the
teacher's embedding separates them from real faces: MTCNN gives real background faces 0.99 as
well, and the FaceNet teacher maps background patches close to *each other* (nearest-neighbour
distance 0.8), so "far from every other crop" does not flag them.

What does separate them is looking again at the crop alone: :class:`FaceCheck` pads the crop
with a black border (so a face that fills it is not cut at the edge), runs MTCNN on it, and
scores it by the highest probability of a box that is centred on the crop and at least a
third of its width. On the shared photos' 223 MTCNN and SSD crops every real full face scored
>= 0.988 and every background patch <= 0.941 (most find no box at all), so ``min_score=0.95``
drops them; it also drops MTCNN's crops of half a face (face_recognition's
``obama_partial_face``), a 20-pixel blur and one face distorted at the edge of a wide-angle
selfie.

:func:`drop_non_faces` is the one place the rule is applied to detections
(``tools/align_faces.py``) and :func:`face_scores` to existing crops (distillation's
``data.min_face_score``).
"""

from __future__ import annotations

import os
from typing import Sequence, TypeVar

import numpy as np
import torch
from PIL import Image

from mnapps.choices import DEFAULT_MIN_FACE_SCORE
from mnapps.data.image_io import ImageReadError, load_rgb

__all__ = ["FaceCheck", "FaceCheckingAligner", "drop_non_faces", "face_scores"]


T = TypeVar("T")


class FaceCheck:
    """Scores a face crop by MTCNN's probability of a face box centred in it.

    Args:
        min_score: the score a face must reach (:data:`mnapps.choices.DEFAULT_MIN_FACE_SCORE`).
        pad: black border added around the crop, as a share of its side.
        device: where MTCNN runs.
    """

    def __init__(self, min_score: float = DEFAULT_MIN_FACE_SCORE, *, pad: float = 0.25,
                 device: str | torch.device = "cpu") -> None:
        from facenet_pytorch import MTCNN

        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {min_score}")
        if not 0.0 <= pad <= 1.0:
            raise ValueError(f"pad must be in [0, 1], got {pad}")
        self.min_score = float(min_score)
        self.pad = float(pad)
        self.mtcnn = MTCNN(keep_all=True, device=device)

    def score(self, crop: np.ndarray) -> float:
        """The crop's face score in [0, 1] (0 when no centred face box is found)."""
        if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 crop [H, W, 3], got {crop.dtype} {tuple(crop.shape)}")
        height, width = crop.shape[:2]
        border = int(round(self.pad * max(height, width)))
        padded = np.pad(crop, ((border, border), (border, border), (0, 0)))
        boxes, probs = self.mtcnn.detect(Image.fromarray(padded))
        if boxes is None:
            return 0.0
        centre = np.array([border + width / 2.0, border + height / 2.0])
        best = 0.0
        for box, prob in zip(np.asarray(boxes), np.asarray(probs, dtype=np.float64)):
            middle = np.array([(box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0])
            centred = np.all(np.abs(middle - centre) < 0.25 * np.array([width, height]))
            if centred and box[2] - box[0] >= width / 3.0:
                best = max(best, float(prob))
        return best

    def is_face(self, crop: np.ndarray) -> bool:
        return self.score(crop) >= self.min_score


def drop_non_faces(faces: Sequence[T], check: FaceCheck) -> tuple[list[T], int]:
    """Keep the detections (anything with a ``.crop``) whose crop :class:`FaceCheck` accepts.

    Returns:
        ``(kept faces in order, number dropped)``.
    """
    kept = [face for face in faces if check.is_face(face.crop)]
    return kept, len(faces) - len(kept)


class FaceCheckingAligner:
    """An aligner (``detect(image, keep_all=)``) whose detections pass :class:`FaceCheck`.

    Wraps :class:`mnapps.tasks.face.data.align.FaceAligner` or :class:`mnapps.data.box_crops.BoxFaceAligner`
    and counts what it drops (``dropped``), so ``align_folder`` never writes a background patch:
    an image whose every detection fails is reported as having no face.
    """

    def __init__(self, aligner, check: FaceCheck) -> None:
        self.aligner = aligner
        self.check = check
        self.dropped = 0

    def detect(self, image, *, keep_all: bool = False):
        # Check every candidate, not only the first: with keep_all=False the best *face* is kept.
        faces, dropped = drop_non_faces(self.aligner.detect(image, keep_all=True), self.check)
        self.dropped += dropped
        return faces if keep_all else faces[:1]

    def __call__(self, images):
        results = []
        for image in images:
            faces = self.detect(image)
            results.append(faces[0].crop if faces else None)
        return results


def face_scores(files: Sequence[str | os.PathLike], check: FaceCheck) -> list[float]:
    """:meth:`FaceCheck.score` of each crop file (NaN for an unreadable one: the loader reports it)."""
    scores = []
    for path in files:
        try:
            scores.append(check.score(load_rgb(path)))
        except ImageReadError:
            scores.append(float("nan"))
    return scores
