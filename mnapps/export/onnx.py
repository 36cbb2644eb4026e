"""ONNX export, ONNX Runtime sessions and the parity check that follows every export.

This module owns the mechanics shared by every exported mnapps model:

* :func:`export_onnx` - ``torch.onnx.export`` (the torch.export-based exporter, opset 18)
  with a dynamic batch axis, weights inside the one ``.onnx`` file and ``mnapps.*`` metadata
  (task, input contract, SSD post-processing settings) stored in the model so the file is
  self-describing.
* :func:`export_detector_onnx` - a whole Faster R-CNN, NMS included (TorchScript exporter;
  see its docstring for why).
* :func:`make_session` - an ONNX Runtime session set up for speed on a small CPU: all graph
  optimisations (constant folding, Conv+activation fusion and, at ``ORT_ENABLE_ALL``, the
  NCHWc blocked layout that MLAS's convolution kernels want), ``threads`` intra-op threads
  and one inter-op thread (MobileNets are a chain of layers: nothing runs in parallel).
* :class:`OrtModel` (tensor in, named numpy arrays out), :class:`OrtSSD` (images in,
  detections out through :mod:`mnapps.export.postprocess`, the code the PyTorch predictor
  runs too) and :class:`OrtDetector` (a whole exported Faster R-CNN, image by image).
* the parity check: :func:`compare_arrays` (max abs difference, top-1 agreement, cosine) and
  :func:`compare_detections` (same labels and boxes, matched by IoU); a failed check raises
  :class:`ParityError` - an export that changes the model's answers is an error.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from .postprocess import SSDPostprocessParams, postprocess_ssd, preprocess_images

__all__ = [
    "DEFAULT_OPSET",
    "METADATA_PREFIX",
    "export_onnx",
    "export_detector_onnx",
    "read_metadata",
    "make_session",
    "OrtModel",
    "OrtSSD",
    "OrtDetector",
    "ParityError",
    "ParityReport",
    "compare_arrays",
    "compare_detections",
]

DEFAULT_OPSET = 18
METADATA_PREFIX = "mnapps."


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            f"ONNX export needs the optional dependencies: pip install 'mnapps[export]' ({exc})"
        ) from None


def export_onnx(
    module: nn.Module,
    example: Tensor,
    path: str | os.PathLike,
    *,
    input_name: str = "images",
    output_names: Sequence[str] = ("output",),
    metadata: Mapping[str, Any] | None = None,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``module`` (eval mode, one tensor input) to a single ``.onnx`` file.

    Args:
        module: the network to export; run as ``module(example)``.
        example: ``Tensor[N, ...]`` a real-shaped input (N >= 2 keeps the batch axis free of
            size-1 specialisation).
        path: output file; parent folders are created.
        input_name, output_names: graph input / output names, in ``forward`` order.
        metadata: stored as ``metadata_props`` under ``mnapps.<key>`` (values that are not
            strings are JSON-encoded).
        dynamic_batch: the first axis of the input (and outputs) is symbolic ``batch``.
        opset: ONNX opset (18: current and supported by onnxruntime >= 1.16).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    _require_onnx()
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    ir_logger = logging.getLogger("onnx_ir")
    previous_level = ir_logger.level
    with warnings.catch_warnings(), torch.no_grad():
        # The exporter warns about things that do not apply here (e.g. that the constant anchors
        # output is not deduplicated with other initializers).
        warnings.simplefilter("ignore")
        ir_logger.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=[input_name],
                output_names=list(output_names),
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                verbose=False,
            )
        finally:
            ir_logger.setLevel(previous_level)
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key = METADATA_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    proto.producer_name = "mnapps"
    onnx.save(proto, str(path))
    return path


def export_detector_onnx(
    model: nn.Module,
    example_image: Tensor,
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    opset: int = 17,
) -> Path:
    """Export a whole torchvision two-stage detector (Faster R-CNN), NMS included.

    The graph takes one image ``[3, H, W]`` in [0, 1] (any ``H, W``) and returns ``boxes
    [D, 4]`` (xyxy, that image's pixels), ``labels [D]`` and ``scores [D]``, exactly what
    ``model.eval()([image])[0]`` returns. Faster R-CNN runs NMS *between* its two stages
    (on the proposals), so it cannot be cut into "network + post-processing" like SSD; its
    data-dependent shapes do not go through ``torch.export`` either, so this uses the
    TorchScript-based exporter, which maps torchvision's NMS and RoIAlign onto ONNX's
    ``NonMaxSuppression`` and ``RoiAlign`` (torchvision's own ONNX tests take this route).
    """
    _require_onnx()
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation notice of this exporter, tracer warnings
        torch.onnx.export(
            model,
            ([example_image],),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=["boxes", "labels", "scores"],
            dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                          "labels": {0: "detections"}, "scores": {0: "detections"}},
        )
    proto = onnx.load(str(path))
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key = METADATA_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    proto.producer_name = "mnapps"
    onnx.save(proto, str(path))
    return path


def read_metadata(source: str | os.PathLike | Any) -> dict[str, str]:
    """``mnapps.*`` metadata of an ONNX file or an onnxruntime session, prefix removed."""
    if isinstance(source, (str, os.PathLike)):
        import onnx

        props = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    else:
        props = dict(source.get_modelmeta().custom_metadata_map)
    return {k[len(METADATA_PREFIX):]: v for k, v in props.items() if k.startswith(METADATA_PREFIX)}


def make_session(
    path: str | os.PathLike,
    *,
    threads: int = 2,
    optimization: str = "all",
    providers: Sequence[str] | None = None,
):
    """An ``onnxruntime.InferenceSession`` tuned for MobileNet-sized models.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (the benchmark uses 2, the machine's cores).
        optimization: ``"all"`` (default: fusions + NCHWc layout), ``"extended"``, ``"basic"``
            or ``"none"``.
        providers: execution providers; default CUDA when onnxruntime has it, else CPU.
    """
    _require_onnx()
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist (make one with tools/export.py)")
    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    if optimization not in levels:
        raise ValueError(f"unknown optimization level {optimization!r}; choose from {sorted(levels)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only; ORT warns about every unused initializer
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


def _to_numpy(value: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


class OrtModel:
    """Runs an exported single-input mnapps graph with ONNX Runtime.

    ``model(x)`` takes ``x: Tensor | ndarray [N, ...] float32`` (the graph's input contract,
    see ``metadata["input"]``) and returns ``{output_name: ndarray}``.
    """

    def __init__(self, path_or_session: str | os.PathLike | Any, **session_kwargs: Any) -> None:
        if isinstance(path_or_session, (str, os.PathLike)):
            self.path: Path | None = Path(path_or_session)
            self.session = make_session(path_or_session, **session_kwargs)
        else:
            self.path, self.session = None, path_or_session
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"expected a graph with one input, got {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.metadata = read_metadata(self.session)

    def __call__(self, x: Tensor | np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(_to_numpy(x))})
        return dict(zip(self.output_names, outputs))


class OrtSSD:
    """An exported SSD run end to end: preprocess -> ONNX Runtime -> shared post-processing.

    ``detector(images)`` takes a list of ``Tensor[3, H, W]`` in [0, 1] and returns the same
    ``list[{"boxes", "scores", "labels"}]`` as the PyTorch model in eval mode. The pre- and
    post-processing settings (resize, score activation, thresholds) come from the file's
    ``mnapps.ssd_postprocess`` metadata.
    """

    def __init__(self, path_or_session: str | os.PathLike | Any, **session_kwargs: Any) -> None:
        self.model = OrtModel(path_or_session, **session_kwargs)
        text = self.model.metadata.get("ssd_postprocess")
        if text is None:
            raise ValueError(
                f"{self.model.path or 'the session'} has no mnapps.ssd_postprocess metadata; "
                "it was not exported from an mnapps SSD with tools/export.py"
            )
        self.params = SSDPostprocessParams.from_json(text)
        self._anchors: Tensor | None = None

    def raw(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``batch [N, 3, S_h, S_w]`` in [0, 1] -> (bbox_regression, cls_logits, anchors)."""
        outputs = self.model(batch)
        regression, logits, anchors = (torch.from_numpy(outputs[k]) for k in ("bbox_regression", "cls_logits", "anchors"))
        return regression, logits, anchors

    def __call__(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        batch, sizes = preprocess_images(images, self.params.size, self.params.preprocess)
        return postprocess_ssd(*self.raw(batch), self.params, sizes)


class OrtDetector:
    """A whole exported detector (Faster R-CNN, NMS in the graph) run image by image.

    ``detector(images)`` takes a list of ``Tensor[3, H, W]`` in [0, 1] and returns
    ``list[{"boxes", "scores", "labels"}]`` like the PyTorch model in eval mode.
    """

    def __init__(self, path_or_session: str | os.PathLike | Any, **session_kwargs: Any) -> None:
        self.model = OrtModel(path_or_session, **session_kwargs)

    def __call__(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        detections = []
        for image in images:
            outputs = self.model(image)
            detections.append({
                "boxes": torch.from_numpy(outputs["boxes"]),
                "labels": torch.from_numpy(outputs["labels"]).long(),
                "scores": torch.from_numpy(outputs["scores"]),
            })
        return detections


# ------------------------------------------------------------------------------------------
# parity


class ParityError(ValueError):
    """ONNX Runtime and PyTorch disagree beyond the allowed tolerance."""


@dataclass
class ParityReport:
    """Outcome of one parity check; ``str()`` is the line the export tool prints."""

    name: str
    passed: bool
    figures: dict[str, float] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        shown = ", ".join(
            f"{k}={v:.3g}" + (f" ({self.limits[k]})" if k in self.limits else "") for k, v in self.figures.items()
        )
        return f"parity {self.name}: {'OK' if self.passed else 'FAILED'}: {shown}"

    def raise_if_failed(self) -> "ParityReport":
        if not self.passed:
            raise ParityError(str(self))
        return self


def compare_arrays(
    name: str,
    reference: Tensor | np.ndarray,
    candidate: Tensor | np.ndarray,
    *,
    atol: float | None = None,
    min_cosine: float | None = None,
    min_top1_agreement: float | None = None,
    top1: bool = False,
) -> ParityReport:
    """Compare two ``[N, D]`` outputs (logits or embeddings); ``None`` limits are not checked.

    Figures: ``max_abs_diff``, ``mean_cosine`` (per row) and, with ``top1`` or
    ``min_top1_agreement``, ``top1_agreement`` (fraction of rows with the same argmax).
    """
    top1 = top1 or min_top1_agreement is not None
    ref, cand = _to_numpy(reference).astype(np.float64), _to_numpy(candidate).astype(np.float64)
    if ref.shape != cand.shape:
        raise ParityError(f"parity {name}: shapes differ, PyTorch {ref.shape} vs ONNX Runtime {cand.shape}")
    ref2, cand2 = ref.reshape(len(ref), -1), cand.reshape(len(cand), -1)
    norms = np.linalg.norm(ref2, axis=1) * np.linalg.norm(cand2, axis=1)
    # Two all-zero rows agree perfectly; one all-zero row against a non-zero one does not.
    cosine = np.where(
        norms > 0, (ref2 * cand2).sum(1) / np.maximum(norms, 1e-300), (np.abs(ref2 - cand2).max(1) == 0).astype(float)
    )
    figures = {
        "max_abs_diff": float(np.abs(ref - cand).max()) if ref.size else 0.0,
        "mean_cosine": float(cosine.mean()) if len(cosine) else 1.0,
    }
    if top1:
        figures["top1_agreement"] = float((ref2.argmax(1) == cand2.argmax(1)).mean()) if len(ref2) else 1.0
    limits, passed = {}, True
    checks = [
        ("max_abs_diff", atol, lambda v, l: v <= l),
        ("mean_cosine", min_cosine, lambda v, l: v >= l),
    ]
    if top1:
        checks.append(("top1_agreement", min_top1_agreement, lambda v, l: v >= l))
    for key, limit, ok in checks:
        if limit is not None:
            limits[key] = f"{'<=' if key == 'max_abs_diff' else '>='} {limit:g}"
            passed &= bool(ok(figures[key], limit))
    return ParityReport(name, passed, figures, limits)


def _match_one_image(ref: Mapping[str, Tensor], cand: Mapping[str, Tensor], iou_thresh: float) -> tuple[int, float]:
    """Greedy same-label matching by IoU, best reference scores first: (matches, max box diff)."""
    if len(ref["boxes"]) == 0 or len(cand["boxes"]) == 0:
        return 0, 0.0
    iou = box_iou(ref["boxes"].float(), cand["boxes"].float())
    iou[ref["labels"][:, None] != cand["labels"][None, :]] = -1.0
    taken = torch.zeros(len(cand["boxes"]), dtype=torch.bool)
    matches, max_diff = 0, 0.0
    for i in torch.argsort(ref["scores"], descending=True).tolist():
        row = iou[i].masked_fill(taken, -1.0)
        j = int(row.argmax())
        if row[j] >= iou_thresh:
            taken[j] = True
            matches += 1
            max_diff = max(max_diff, float((ref["boxes"][i] - cand["boxes"][j]).abs().max()))
    return matches, max_diff


def compare_detections(
    name: str,
    reference: Sequence[Mapping[str, Tensor]],
    candidate: Sequence[Mapping[str, Tensor]],
    *,
    min_agreement: float = 0.98,
    iou_thresh: float = 0.9,
    min_score: float = 0.0,
) -> ParityReport:
    """Do two detectors give the same detections on the same images?

    Detections with ``score >= min_score`` are matched image by image (same label, IoU >=
    ``iou_thresh``, greedily from the best reference score). ``agreement`` is matched pairs
    over ``max(#reference, #candidate)`` summed over images (1.0 when both are empty);
    ``max_box_diff`` is the largest coordinate difference of a matched pair, in pixels.
    Order is not compared: two near-equal scores may swap places between back-ends.
    """
    if len(reference) != len(candidate):
        raise ParityError(f"parity {name}: {len(reference)} vs {len(candidate)} images")
    matched = total = 0
    max_diff = 0.0

    def above(dets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        keep = dets["scores"] >= min_score
        return {k: dets[k][keep] for k in ("boxes", "scores", "labels")}

    for ref, cand in zip(reference, candidate):
        ref, cand = above(ref), above(cand)
        count, diff = _match_one_image(ref, cand, iou_thresh)
        matched += count
        total += max(len(ref["boxes"]), len(cand["boxes"]))
        max_diff = max(max_diff, diff)
    agreement = matched / total if total else 1.0
    figures = {"agreement": agreement, "detections": float(total), "max_box_diff": max_diff}
    passed = agreement >= min_agreement
    return ParityReport(name, passed, figures, {"agreement": f">= {min_agreement:g}"})
