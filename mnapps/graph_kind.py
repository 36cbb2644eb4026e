"""Which kind of ONNX graph export makes of a model: the typed name a task or a head gives it.

Export (:mod:`mnapps.export.graphs`) owns one class per kind, with its graph, parity check, int8
path and ONNX Runtime session; the tasks and heads sit on floors below export and cannot import
those classes, so they name the kind with this enum and export picks the class once.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["GraphKind"]


class GraphKind(Enum):
    """The ONNX graphs mnapps exports.

    Attributes:
        TENSOR: a batch of ``S x S`` images in, one output out (classifier logits, face embeddings).
        SSD: an SSD's raw box and class outputs and its anchors; the post-processing (decoding,
            NMS) is shared outside the graph.
        DETECTOR: a whole two-stage detector, NMS included, one image of any size per run.
    """

    TENSOR = "tensor"
    SSD = "ssd"
    DETECTOR = "detector"
