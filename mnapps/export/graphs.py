"""The kinds of ONNX graph mnapps exports, one class each, chosen once per model.

Each class owns, for one trained model, what goes into the file (the network, its input size,
output names and ``mnapps.*`` metadata, how a photo becomes its input), how the file is written,
how ONNX Runtime runs it, how its parity with PyTorch is checked, and whether and how it goes
to int8. A task (or a detection head) names its kind with :class:`mnapps.graph_kind.GraphKind`
in its :class:`~mnapps.tasks.spec.ExportPlan`; :func:`build_export_graph` picks the class, and the
pipeline (:mod:`mnapps.export.pipeline`) only calls its methods:

* :class:`TensorGraph`: a batch of ``S x S`` images in, one output out (classifier, face
  embedder); parity by max abs difference and cosine (and top-1 for classifiers).
* :class:`SSDGraph`: an SSD's raw box/class outputs and anchors, the post-processing shared
  outside the graph (:mod:`mnapps.export.postprocess`); parity on the raw outputs and on the
  final detections.
* :class:`DetectorGraph`: a whole two-stage detector, NMS included, one image of any size per
  run; parity on the detections, image by image; no int8 (its RoI stage and in-graph NMS stay
  float).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from mnapps.graph_kind import GraphKind
from mnapps.tasks.spec import ExportPlan

from .detection import split_ssd
from .onnx import (
    OrtDetector,
    OrtModel,
    OrtSSD,
    ParityReport,
    compare_arrays,
    compare_detections,
    export_detector_onnx,
    export_onnx,
)
from .postprocess import preprocess_images

__all__ = [
    "PARITY_LIMITS",
    "INT8_DETECTION_MIN_SCORE",
    "ExportGraph",
    "TensorGraph",
    "SSDGraph",
    "DetectorGraph",
    "build_export_graph",
]

# What "the same model" means after export. fp32 differs from PyTorch only by operation order
# (~1e-5 on logits of size ~10). int8 is a different model by design: it must keep the
# outputs' direction (cosine) and, for detection, most of the confident detections.
PARITY_LIMITS: dict[str, dict[str, float]] = {
    "fp32": {"atol": 1e-3, "min_cosine": 0.9999, "min_top1": 1.0, "min_det_agreement": 0.95},
    "int8": {"min_cosine": 0.98, "min_det_agreement": 0.8},
}
# Detections compared for int8 parity: the confident ones (the low-score tail reshuffles).
INT8_DETECTION_MIN_SCORE = 0.3

#: What a runtime returns for a batch (tensor graphs) or a list of images (detectors).
Runtime = Callable[[Any], Any]


def _resize_to(size: tuple[int, int], preprocess: str = "resize") -> Callable[[Tensor], Tensor]:
    def convert(image: Tensor) -> Tensor:
        return preprocess_images([image], size, preprocess)[0][0]

    return convert


class ExportGraph(ABC):
    """One trained model's ONNX graph of one kind (see the module docstring).

    Attributes:
        kind: the :class:`GraphKind` this class makes.
        model: the training model in eval mode (the parity reference).
        network: the module that goes into the graph (``model`` itself, or an SSD's
            :class:`~mnapps.export.detection.SSDNetwork`).
        input_size: ``(S_h, S_w)`` of the graph input (``(0, 0)``: any size).
        output_names: graph output names.
        metadata: ``mnapps.*`` metadata written into the file.
        to_input: image ``Tensor[3, H, W]`` in [0, 1] -> graph input.
    """

    kind: ClassVar[GraphKind]

    def __init__(
        self,
        model: nn.Module,
        network: nn.Module,
        input_size: tuple[int, int],
        output_names: tuple[str, ...],
        metadata: dict[str, Any],
        to_input: Callable[[Tensor], Tensor],
    ) -> None:
        self.model = model
        self.network = network
        self.input_size = input_size
        self.output_names = output_names
        self.metadata = metadata
        self.to_input = to_input

    @classmethod
    @abstractmethod
    def from_plan(cls, plan: ExportPlan, model: nn.Module, cfg: Any) -> ExportGraph:
        """The graph of ``model`` its task's ``plan`` describes."""

    def batch(self, images: Sequence[Tensor]) -> Tensor:
        """Images ``Tensor[3, H, W]`` in [0, 1] as one graph input batch."""
        return torch.stack([self.to_input(image) for image in images])

    def write(self, folded: nn.Module, images: Sequence[Tensor], out: Path, metadata: dict[str, Any]) -> None:
        """Export ``folded`` (:attr:`network` with BatchNorm folded) to ``out``, traced on ``images``."""
        batch = self.batch(images)
        example = batch[:2] if len(batch) >= 2 else batch.repeat(2, 1, 1, 1)  # a batch axis that stays dynamic
        export_onnx(folded, example, out, output_names=self.output_names, metadata=metadata)

    def refuse_int8(self, head: str | None) -> None:
        """ValueError when this kind has no int8 path (checked before anything is written)."""

    @abstractmethod
    def runtime(self, path: Path, threads: int) -> Runtime:
        """An ONNX Runtime session of the file at ``path``, called like :attr:`model` is."""

    @abstractmethod
    def parity(self, path: Path, images: Sequence[Tensor], precision: str, threads: int, label: str) -> list[ParityReport]:
        """Parity reports of the file at ``path`` against :attr:`model` on ``images`` (not yet raised)."""


class TensorGraph(ExportGraph):
    """A batch of ``S x S`` images in, the plan's one output out (classifier, face embedder)."""

    kind = GraphKind.TENSOR

    def __init__(self, *args: Any, top1: bool = False) -> None:
        super().__init__(*args)
        self.top1 = top1

    @classmethod
    def from_plan(cls, plan: ExportPlan, model: nn.Module, cfg: Any) -> TensorGraph:
        if plan.input_size is None or not plan.output_names:
            raise ValueError("a tensor graph needs the plan's input_size and output_names")
        size = (plan.input_size, plan.input_size)
        return cls(model, model, size, plan.output_names, plan.metadata, plan.to_input or _resize_to(size),
                   top1=plan.top1)

    def runtime(self, path: Path, threads: int) -> Runtime:
        session, output = OrtModel(path, threads=threads), self.output_names[0]
        return lambda batch: torch.from_numpy(session(batch)[output])

    def parity(self, path: Path, images: Sequence[Tensor], precision: str, threads: int, label: str) -> list[ParityReport]:
        limits, batch = PARITY_LIMITS[precision], self.batch(images)
        with torch.no_grad():
            reference, candidate = self.model(batch), self.runtime(path, threads)(batch)
        return [compare_arrays(
            f"{label} {self.output_names[0]}", reference, candidate, atol=limits.get("atol"),
            min_cosine=limits.get("min_cosine"), min_top1_agreement=limits.get("min_top1") if self.top1 else None,
            top1=self.top1,
        )]


# How each SSD preprocess mode turns a photo into the graph input (for the file's metadata).
_RESIZE_WORDS = {
    "resize": "resized (bilinear) from the photo",
    "tf_resize": "resized from the photo with TF's legacy bilinear resize (align_corners=False, "
    "half_pixel_centers=False)",
    "tf_pad_resize": "the photo zero-padded bottom/right to a square, then TF's legacy bilinear resize",
}


class SSDGraph(ExportGraph):
    """The SSD network's raw outputs and anchors; post-processing stays outside the graph."""

    kind = GraphKind.SSD

    @classmethod
    def from_plan(cls, plan: ExportPlan, model: nn.Module, cfg: Any) -> SSDGraph:
        network, params = split_ssd(model, tuple(cfg.model.class_names))
        size, words = params.size, _RESIZE_WORDS[params.preprocess]
        metadata = {key: value for key, value in plan.metadata.items() if key != "class_names"}  # in ssd_postprocess
        metadata.update(input=f"images [N, 3, {size[0]}, {size[1]}] RGB in [0, 1], {words}",
                        ssd_postprocess=params.to_json())
        return cls(model, network, size, ("bbox_regression", "cls_logits", "anchors"), metadata,
                   _resize_to(size, params.preprocess))

    def runtime(self, path: Path, threads: int) -> OrtSSD:
        return OrtSSD(path, threads=threads)

    def parity(self, path: Path, images: Sequence[Tensor], precision: str, threads: int, label: str) -> list[ParityReport]:
        limits, batch = PARITY_LIMITS[precision], self.batch(images)
        detector = self.runtime(path, threads)
        reports = []
        with torch.no_grad():
            raw = dict(zip(("bbox_regression", "cls_logits"), self.network(batch)[:2]))
            outputs = detector.model(batch)
            for key, ref in raw.items():
                reports.append(compare_arrays(
                    f"{label} {key}", ref.reshape(ref.shape[0], -1), outputs[key].reshape(ref.shape[0], -1),
                    atol=limits.get("atol"), min_cosine=limits.get("min_cosine"),
                ))
            reports.append(compare_detections(
                f"{label} detections", self.model(list(images)), detector(images),
                min_agreement=limits["min_det_agreement"],
                min_score=0.0 if precision == "fp32" else INT8_DETECTION_MIN_SCORE,
            ))
        return reports


class DetectorGraph(ExportGraph):
    """The whole two-stage detector, NMS included, one image of any size per run."""

    kind = GraphKind.DETECTOR

    @classmethod
    def from_plan(cls, plan: ExportPlan, model: nn.Module, cfg: Any) -> DetectorGraph:
        metadata = dict(plan.metadata, input="image [3, H, W] RGB in [0, 1], any size, one image per run",
                        output="boxes [D, 4] xyxy pixels, labels [D], scores [D] (NMS done)")
        return cls(model, model, (0, 0), ("boxes", "labels", "scores"), metadata, lambda image: image)

    def write(self, folded: nn.Module, images: Sequence[Tensor], out: Path, metadata: dict[str, Any]) -> None:
        export_detector_onnx(folded, images[0], out, metadata=metadata)

    def refuse_int8(self, head: str | None) -> None:
        raise ValueError(
            f"int8 export covers the classifier, the SSD heads and the face embedder, not {head!r} "
            "(its RoI stage and in-graph NMS are left in float); drop --int8"
        )

    def runtime(self, path: Path, threads: int) -> OrtDetector:
        return OrtDetector(path, threads=threads)

    def parity(self, path: Path, images: Sequence[Tensor], precision: str, threads: int, label: str) -> list[ParityReport]:
        # One image per call on both sides: batching pads images to a common size, which
        # changes a two-stage detector's proposals near the padded border.
        with torch.no_grad():
            reference = [self.model([image])[0] for image in images]
            candidate = self.runtime(path, threads)(images)
        return [compare_detections(f"{label} detections", reference, candidate,
                                   min_agreement=PARITY_LIMITS[precision]["min_det_agreement"])]


# The one place a GraphKind meets its class: the tasks, below export, can only name the kind.
_GRAPH_CLASSES: dict[GraphKind, type[ExportGraph]] = {cls.kind: cls for cls in (TensorGraph, SSDGraph, DetectorGraph)}


def build_export_graph(plan: ExportPlan, model: nn.Module, cfg: Any) -> ExportGraph:
    """The graph of ``model`` of the kind its task's ``plan`` names."""
    return _GRAPH_CLASSES[plan.graph].from_plan(plan, model, cfg)
