"""The names mnapps's tables are keyed by and its command line offers, written once, without torch.

``--help`` must answer without importing torch, so an argument parser cannot read the library
tables (they live beside torch code). This module holds each name and each default the two
share: the library table imports it for its keys (:data:`mnapps.heads.HEADS`,
:data:`mnapps.data.box_crops.CROP_GEOMETRIES`, ...) and the parser imports it for its choices, so
neither mirrors the other. It imports nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ShippedHead", "SSD", "SSDLITE", "FASTER_RCNN", "FASTER_RCNN_FPN", "SHIPPED_HEADS", "HEAD_NAMES", "DEFAULT_HEAD",
    "PRETRAINED_TEACHERS", "PRETRAINED_TEACHER_NAMES", "MTCNN_CROP", "SQUARE_CROP", "CROP_GEOMETRY_NAMES",
    "THRESHOLD_RULE_NAMES", "DEFAULT_MIN_FACE_SCORE", "SAME_PERSON_DISTANCE",
]


@dataclass(frozen=True)
class ShippedHead:
    """A detection head mnapps ships, as far as the command line needs to know it.

    Attributes:
        name: its ``--head`` / ``model.head`` name, the key of its :data:`mnapps.heads.HEADS` entry.
        default_config: the file in ``configs/`` it trains with when ``--config`` is not given.
    """

    name: str
    default_config: str


SSD = ShippedHead("ssd", "ssd_mnv1_a050_r192_shapes.yaml")
SSDLITE = ShippedHead("ssdlite", "ssdlite_mnv1_a050_r192_shapes.yaml")
FASTER_RCNN = ShippedHead("faster_rcnn", "faster_rcnn_mnv1_a025_r256_shapes.yaml")
FASTER_RCNN_FPN = ShippedHead("faster_rcnn_fpn", "faster_rcnn_fpn_mnv1_a025_r256_shapes.yaml")
SHIPPED_HEADS = (SSD, SSDLITE, FASTER_RCNN, FASTER_RCNN_FPN)
HEAD_NAMES = tuple(head.name for head in SHIPPED_HEADS)
#: The head of a config that names none, and of ``train_det`` without ``--head``.
DEFAULT_HEAD = SSD

#: facenet-pytorch's pretrained sets and the file each download writes to $TORCH_HOME/checkpoints.
PRETRAINED_TEACHERS = {
    "vggface2": "20180402-114759-vggface2.pt",
    "casia-webface": "20180408-102900-casia-webface.pt",
}
PRETRAINED_TEACHER_NAMES = tuple(PRETRAINED_TEACHERS)

#: Where a face crop lies around a detector box (:data:`mnapps.data.box_crops.CROP_GEOMETRIES`):
#: moved onto where MTCNN's box would be, or the square around the box.
MTCNN_CROP = "mtcnn"
SQUARE_CROP = "square"
CROP_GEOMETRY_NAMES = (MTCNN_CROP, SQUARE_CROP)

#: How ``compare_detectors`` picks a score threshold for a target recall (the default first); see
#: :func:`mnapps.export.det_compare.threshold_for_recall`.
THRESHOLD_RULE_NAMES = ("conformal", "val-recall")

#: Crops whose re-detection score is below this are not faces (``align_faces --min-face-score``;
#: see :mod:`mnapps.tasks.face.data.face_check`).
DEFAULT_MIN_FACE_SCORE = 0.95
#: L2 distance between unit teacher embeddings below which two crops are taken to show one
#: person (``eval_face --same-threshold``): the CASIA-WebFace FaceNet classifies deepface's 300
#: pairs at 0.9967 accuracy there.
SAME_PERSON_DISTANCE = 1.1
