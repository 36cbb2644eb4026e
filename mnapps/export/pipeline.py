"""Checkpoint -> ONNX (and int8) with a parity check, for every exportable mnapps task.

This module owns what ``tools/export.py`` does, as library code:

1. :func:`load_export_spec` rebuilds the trained model of an mnapps checkpoint with its
   task's own loader and reads the task's :class:`~mnapps.tasks.spec.ExportPlan`, both from the
   checkpoint's entry of :data:`mnapps.tasks.table.TASKS` (a detector's graph kind comes from its
   :class:`~mnapps.heads.HeadSpec`), and says what goes in the graph and how images become its
   input.
2. :func:`export_checkpoint` folds BatchNorm, exports the graph, and runs the parity check
   on real images (ONNX Runtime vs the PyTorch model in eval mode): logits / embeddings by
   max abs difference, SSD raw outputs likewise and the final detections (after the shared
   post-processing) by agreement. With ``int8`` it calibrates on images, applies bias
   correction, quantizes (:mod:`mnapps.export.quantize`) and checks the int8 graph with
   looser, int8-sized limits. Any failed check raises :class:`ParityError`.
3. :func:`evaluate_export` measures the accuracy that deployment keeps: top-1 (classifier)
   or COCO AP50 (SSD) of PyTorch, ONNX Runtime fp32 and int8 on the task's validation set
   (the embedded shapes sets unless the config names other data).

Graph contracts (also written into each file's ``mnapps.input`` metadata):
classifier ``images [N, 3, S, S]`` standardised to [-1, 1] -> ``logits [N, K]``;
face ``images [N, 3, S, S]`` in [0, 1] -> ``embeddings [N, D]`` (unit L2 norm);
SSD ``images [N, 3, S, S]`` in [0, 1] -> ``bbox_regression [N, A, 4]``, ``cls_logits
[N, A, C]``, ``anchors [A, 4]`` (see :mod:`mnapps.export.postprocess`);
Faster R-CNN ``image [3, H, W]`` in [0, 1] -> ``boxes [D, 4]``, ``labels [D]``, ``scores [D]``
(the whole model, NMS included: see :func:`mnapps.export.onnx.export_detector_onnx`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from mnapps.checkpoint import Checkpoint, read_checkpoint
from mnapps.data.coco import collate_fn
from mnapps.data.image_io import IMAGE_EXTENSIONS, ImageReadError, list_images, load_rgb
from mnapps.data.imagefolder import collate_cls
from mnapps.eval.coco import evaluate_detector
from mnapps.tasks.spec import ExportPlan
from mnapps.tasks.table import TASKS, task_spec

from .detection import split_ssd
from .fuse import fold_batchnorm
from .onnx import (
    OrtDetector,
    OrtModel,
    OrtSSD,
    ParityError,
    ParityReport,
    compare_arrays,
    compare_detections,
    export_detector_onnx,
    export_onnx,
)
from .postprocess import preprocess_images
from .quantize import int8_bias_correction, quantize_onnx, resolve_reduce_range

__all__ = [
    "ExportSpec",
    "ExportResult",
    "ParityError",
    "PARITY_LIMITS",
    "load_export_spec",
    "find_images",
    "export_checkpoint",
    "evaluate_export",
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


@dataclass
class ExportSpec:
    """Everything the exporter needs to know about one trained model.

    Attributes:
        task: ``"classification"``, ``"detection"`` or ``"face"``.
        head: the detector head (``"ssd"``, ``"ssdlite"``) or None.
        model: the training model in eval mode (the parity reference).
        network: the module that goes into the graph (``model`` itself, or an SSD's
            :class:`~mnapps.export.detection.SSDNetwork`).
        input_size: ``(S_h, S_w)`` of the graph input.
        output_names: graph output names.
        metadata: ``mnapps.*`` metadata written into the file.
        to_input: image ``Tensor[3, H, W]`` in [0, 1] -> graph input ``Tensor[3, S_h, S_w]``.
        graph: ``"tensor"`` (batch in, one output), ``"ssd"`` (raw outputs, shared
            post-processing) or ``"detector"`` (a whole Faster R-CNN, one image per run).
        config: the checkpoint's config as a typed object (for evaluation).
        default_images: ``split -> folder or list of image files`` used when the caller gives
            no images (``"parity"``: validation images, ``"calibration"``: training images).
        top1: parity also compares top-1 agreement (classifiers).
        accuracy: what :func:`evaluate_export` measures (``"top1"``, ``"coco"`` or None).
    """

    task: str
    head: str | None
    model: nn.Module
    network: nn.Module
    input_size: tuple[int, int]
    output_names: tuple[str, ...]
    metadata: dict[str, Any]
    to_input: Callable[[Tensor], Tensor]
    config: Any = None
    default_images: dict[str, Callable[[], list[Path]]] = field(default_factory=dict)
    graph: str = "tensor"  # "tensor" (classifier, face), "ssd" or "detector" (whole Faster R-CNN)
    top1: bool = False
    accuracy: str | None = None

    @property
    def is_ssd(self) -> bool:
        return self.graph == "ssd"


@dataclass
class ExportResult:
    """Files written and the parity reports that passed."""

    fp32_path: Path
    int8_path: Path | None = None
    reports: list[ParityReport] = field(default_factory=list)


# ------------------------------------------------------------------------------------------
# images


def find_images(
    source: str | os.PathLike | Sequence[str | os.PathLike], limit: int | None = None
) -> list[Path]:
    """Image files under folders (recursively, sorted) or listed files; ``limit`` picks evenly
    spaced ones.

    Evenly spaced rather than the first ``limit``: class-per-folder datasets sort by class, and
    calibration should see all of them.
    """
    entries = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not entries:
        raise ValueError("no image folders or files given")
    files: list[Path] = []
    for entry in entries:
        found = list_images(entry)
        if not found:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {entry}")
        files.extend(found)
    if limit is not None and len(files) > limit:
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def read_image(path: Path) -> Tensor:
    """An image file as ``Tensor[3, H, W]`` float in [0, 1] (EXIF-upright RGB)."""
    array = load_rgb(path)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255.0


def _read_images(paths: Sequence[Path], desc: str) -> list[Tensor]:
    """The readable ones of ``paths``; unreadable files are skipped and counted in one line.

    Raises:
        ValueError: none of them could be read.
    """
    images, unreadable = [], []
    for path in tqdm(paths, desc=desc, unit="img", leave=False, disable=None):
        try:
            images.append(read_image(path))
        except ImageReadError as exc:
            unreadable.append(exc)
    if unreadable:
        print(f"{desc}: skipped {len(unreadable)} unreadable image(s) of {len(paths)} (first: {unreadable[0]})")
    if not images:
        raise ValueError(f"{desc}: none of the {len(paths)} image(s) could be read (first: {unreadable[0]})")
    return images


# ------------------------------------------------------------------------------------------
# checkpoint -> spec


def _resize_to(size: tuple[int, int], preprocess: str = "resize") -> Callable[[Tensor], Tensor]:
    def convert(image: Tensor) -> Tensor:
        return preprocess_images([image], size, preprocess)[0][0]

    return convert


# How each SSD preprocess mode turns a photo into the graph input (for the file's metadata).
_RESIZE_WORDS = {
    "resize": "resized (bilinear) from the photo",
    "tf_resize": "resized from the photo with TF's legacy bilinear resize (align_corners=False, "
    "half_pixel_centers=False)",
    "tf_pad_resize": "the photo zero-padded bottom/right to a square, then TF's legacy bilinear resize",
}


def _tensor_graph(plan: ExportPlan, model: nn.Module, cfg: Any) -> dict[str, Any]:
    """A batch of ``S x S`` images in, the plan's one output out (classifier, face embedder)."""
    size = (plan.input_size, plan.input_size)
    return {"network": model, "input_size": size, "output_names": plan.output_names, "metadata": plan.metadata,
            "to_input": plan.to_input or _resize_to(size)}


def _ssd_graph(plan: ExportPlan, model: nn.Module, cfg: Any) -> dict[str, Any]:
    """The SSD network's raw outputs and anchors; post-processing stays outside the graph."""
    network, params = split_ssd(model, tuple(cfg.model.class_names))
    size, words = params.size, _RESIZE_WORDS[params.preprocess]
    metadata = {key: value for key, value in plan.metadata.items() if key != "class_names"}  # in ssd_postprocess
    metadata.update(input=f"images [N, 3, {size[0]}, {size[1]}] RGB in [0, 1], {words}",
                    ssd_postprocess=params.to_json())
    return {"network": network, "input_size": size, "output_names": ("bbox_regression", "cls_logits", "anchors"),
            "metadata": metadata, "to_input": _resize_to(size, params.preprocess)}


def _detector_graph(plan: ExportPlan, model: nn.Module, cfg: Any) -> dict[str, Any]:
    """The whole two-stage detector, NMS included, one image of any size per run."""
    metadata = dict(plan.metadata, input="image [3, H, W] RGB in [0, 1], any size, one image per run",
                    output="boxes [D, 4] xyxy pixels, labels [D], scores [D] (NMS done)")
    return {"network": model, "input_size": (0, 0), "output_names": ("boxes", "labels", "scores"),
            "metadata": metadata, "to_input": lambda image: image}


# ExportPlan.graph -> what goes into the file (the plan comes from the task's TASKS entry).
_GRAPHS: dict[str, Callable[[ExportPlan, nn.Module, Any], dict[str, Any]]] = {
    "tensor": _tensor_graph,
    "ssd": _ssd_graph,
    "detector": _detector_graph,
}


def _default_images(checkpoint: Checkpoint, plan: ExportPlan, files: Callable[[str], list[Path]]):
    def split_files(split: str) -> list[Path]:
        if not plan.own_data:
            # An imported model has no training data of its own; the shapes set would be
            # nothing like what it sees.
            option = "--images" if split == "parity" else "--calib-images"
            raise ValueError(
                f"{checkpoint.origin} was imported ({checkpoint.source}) and names no data of its own: pass {option} "
                f"with photos like those it will see"
            )
        return files(split)

    return {"parity": lambda: split_files("parity"), "calibration": lambda: split_files("calibration")}


def load_export_spec(checkpoint: str | os.PathLike | dict[str, Any] | Checkpoint) -> ExportSpec:
    """Rebuild the model of an mnapps checkpoint and describe its graph (see :class:`ExportSpec`).

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: an unknown task, an unsupported head, or a config/weights mismatch.
    """
    record = read_checkpoint(checkpoint)
    task = task_spec(record)
    model, cfg = task.load(record)
    plan = task.export(record, model, cfg)
    graph = _GRAPHS[plan.graph](plan, model, cfg)
    defaults = _default_images(record, plan, lambda split: task.image_files(cfg, split))
    return ExportSpec(
        task=record.task, head=record.head, model=model, config=cfg, graph=plan.graph, top1=plan.top1,
        accuracy=plan.accuracy, default_images=defaults, **graph,
    )


# ------------------------------------------------------------------------------------------
# export + parity


def _parity(
    spec: ExportSpec, path: Path, images: list[Tensor], batch: Tensor | None, precision: str, threads: int
) -> list[ParityReport]:
    limits = PARITY_LIMITS[precision]
    name = f"{spec.task} {precision}"
    ort_model = OrtModel(path, threads=threads)
    reports = []
    with torch.no_grad():
        if spec.graph == "detector":
            # One image per call on both sides: batching pads images to a common size, which
            # changes a two-stage detector's proposals near the padded border.
            reports.append(
                compare_detections(
                    f"{name} detections",
                    [spec.model([image])[0] for image in images],
                    OrtDetector(ort_model.session)(images),
                    min_agreement=limits["min_det_agreement"],
                )
            )
        elif not spec.is_ssd:
            reference = spec.model(batch)
            candidate = ort_model(batch)[spec.output_names[0]]
            reports.append(
                compare_arrays(
                    f"{name} {spec.output_names[0]}",
                    reference,
                    candidate,
                    atol=limits.get("atol"),
                    min_cosine=limits.get("min_cosine"),
                    min_top1_agreement=limits.get("min_top1") if spec.top1 else None,
                    top1=spec.top1,
                )
            )
        else:
            regression, logits, _ = spec.network(batch)
            outputs = ort_model(batch)
            for key, ref in (("bbox_regression", regression), ("cls_logits", logits)):
                reports.append(
                    compare_arrays(
                        f"{name} {key}",
                        ref.reshape(ref.shape[0], -1),
                        outputs[key].reshape(ref.shape[0], -1),
                        atol=limits.get("atol"),
                        min_cosine=limits.get("min_cosine"),
                    )
                )
            detector = OrtSSD(ort_model.session)
            reports.append(
                compare_detections(
                    f"{name} detections",
                    spec.model(images),
                    detector(images),
                    min_agreement=limits["min_det_agreement"],
                    min_score=0.0 if precision == "fp32" else INT8_DETECTION_MIN_SCORE,
                )
            )
    for report in reports:
        print(report)
    for report in reports:
        report.raise_if_failed()
    return reports


def export_checkpoint(
    checkpoint: str | os.PathLike | dict[str, Any] | ExportSpec,
    out: str | os.PathLike,
    *,
    int8: bool = False,
    calib_images: str | os.PathLike | Sequence[Path] | None = None,
    parity_images: str | os.PathLike | Sequence[Path] | None = None,
    num_calib: int = 32,
    num_parity: int = 16,
    threads: int = 2,
    reduce_range: bool | None = None,
) -> ExportResult:
    """Export a checkpoint to ONNX (``out``) and optionally int8 (``out`` with ``.int8.onnx``).

    Args:
        checkpoint: an mnapps checkpoint (path or dict) or a prepared :class:`ExportSpec`.
        out: the fp32 ``.onnx`` file to write.
        int8: also write a static-int8 QDQ model next to it.
        reduce_range: 7-bit weights on dense convolutions in the int8 model (for x86 CPUs
            without VNNI); ``None``: decided from this machine's CPU
            (:func:`mnapps.export.quantize.host_needs_reduced_range`).
        calib_images: folder or files for int8 calibration; default: the training split of
            the checkpoint's data (the embedded shapes/faces sets unless configured).
        parity_images: folder or files the parity check runs on; default: the validation split.
        num_calib, num_parity: how many images (evenly spaced) are used for each.
        threads: ONNX Runtime intra-op threads for the checks.

    Returns:
        :class:`ExportResult` with the written paths and the passed parity reports.

    Raises:
        ParityError: ONNX Runtime and PyTorch disagree beyond :data:`PARITY_LIMITS`.
    """
    spec = checkpoint if isinstance(checkpoint, ExportSpec) else load_export_spec(checkpoint)
    out = Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"output file {out} must end in .onnx")
    parity_files = find_images(parity_images if parity_images is not None else spec.default_images["parity"](), num_parity)
    images = _read_images(parity_files, "parity images")
    if int8 and spec.graph == "detector":
        raise ValueError(
            f"int8 export covers the classifier, the SSD heads and the face embedder, not {spec.head!r} "
            "(its RoI stage and in-graph NMS are left in float); drop --int8"
        )
    folded = fold_batchnorm(spec.network)
    metadata = dict(spec.metadata, precision="fp32", folded_batchnorms=folded.folded_batchnorms)
    if spec.graph == "detector":
        batch = None
        export_detector_onnx(folded, images[0], out, metadata=metadata)
    else:
        batch = torch.stack([spec.to_input(image) for image in images])
        example = batch[:2] if len(batch) >= 2 else batch.repeat(2, 1, 1, 1)
        export_onnx(folded, example, out, output_names=spec.output_names, metadata=metadata)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {folded.folded_batchnorms} BatchNorms folded)")
    result = ExportResult(fp32_path=out)
    result.reports += _parity(spec, out, images, batch, "fp32", threads)

    if int8:
        calib_files = find_images(calib_images if calib_images is not None else spec.default_images["calibration"](), num_calib)
        calib = torch.stack([spec.to_input(image) for image in _read_images(calib_files, "calibration images")])
        reduce_range = resolve_reduce_range(reduce_range)  # once, for the corrections and the graph
        with torch.no_grad():
            corrections = int8_bias_correction(folded, calib, reduce_range=reduce_range)
        int8_path = out.with_suffix(".int8.onnx")
        quantize_onnx(out, int8_path, list(calib.split(1)), bias_corrections=corrections, reduce_range=reduce_range)
        print(
            f"wrote {int8_path} ({int8_path.stat().st_size / 1e6:.1f} MB, calibrated on {len(calib)} images, "
            f"{7 if reduce_range else 8}-bit dense-conv weights)"
        )
        result.int8_path = int8_path
        result.reports += _parity(spec, int8_path, images, batch, "int8", threads)
    return result


# ------------------------------------------------------------------------------------------
# accuracy kept by deployment


class _OrtDetector(nn.Module):
    """An ONNX Runtime detector in the ``nn.Module`` clothes :func:`evaluate_detector` expects."""

    def __init__(self, path: Path, threads: int, graph: str) -> None:
        super().__init__()
        self.detector = OrtSSD(path, threads=threads) if graph == "ssd" else OrtDetector(path, threads=threads)

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return self.detector([image.cpu() for image in images])


def _top1(predict: Callable[[Tensor], np.ndarray | Tensor], loader, desc: str) -> float:
    correct = seen = 0
    for images, labels, _ in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        if labels.numel() == 0:
            continue
        logits = predict(images)
        logits = torch.as_tensor(np.asarray(logits)) if not isinstance(logits, Tensor) else logits
        correct += int((logits.argmax(1) == labels).sum())
        seen += labels.numel()
    return correct / max(seen, 1)


def _top1_accuracy(spec: ExportSpec, backends: dict[str, Any], threads: int, max_images: int | None) -> dict:
    _, val_set = _datasets(spec)
    if max_images is not None:
        count = len(val_set.samples)
        val_set.samples = [val_set.samples[int(i * count / max_images)] for i in range(min(max_images, count))]
    loader = torch.utils.data.DataLoader(val_set, batch_size=32, collate_fn=collate_cls)
    results = {}
    for name, backend in backends.items():
        if isinstance(backend, Path):
            ort_model = OrtModel(backend, threads=threads)
            predict = lambda x, m=ort_model: m(x)[spec.output_names[0]]  # noqa: E731
        else:
            predict = lambda x, m=backend: m(x)  # noqa: E731
        with torch.no_grad():
            results[name] = {"top1": _top1(predict, loader, name)}
    return results


def _coco_accuracy(spec: ExportSpec, backends: dict[str, Any], threads: int, max_images: int | None) -> dict:
    _, dataset = _datasets(spec)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate_fn)
    results = {}
    for name, backend in backends.items():
        model = _OrtDetector(backend, threads, spec.graph) if isinstance(backend, Path) else backend
        metrics, _, _ = evaluate_detector(model, loader, dataset, "cpu", max_images=max_images)
        results[name] = {"AP": metrics["AP"], "AP50": metrics["AP50"]}
    return results


# ExportSpec.accuracy -> how the deployed model's accuracy is measured.
_ACCURACY = {"top1": _top1_accuracy, "coco": _coco_accuracy}


def _datasets(spec: ExportSpec) -> tuple[Any, Any]:
    """The (training, validation) datasets of the exported model's config, from its task's entry."""
    return TASKS[spec.task].datasets(spec.config)


def evaluate_export(
    spec: ExportSpec,
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike | None = None,
    *,
    threads: int = 2,
    max_images: int | None = None,
) -> dict[str, dict[str, float]]:
    """Accuracy of PyTorch, ONNX Runtime fp32 and int8 on the checkpoint's validation data.

    Classification: top-1 (fraction). Detection: COCO AP and AP50. Face embedders are not
    scored here (``tools/eval_face.py`` does pair verification).

    Returns:
        ``{"pytorch": {...}, "onnx_fp32": {...}, "onnx_int8": {...}}``.
    """
    if spec.accuracy not in _ACCURACY:
        raise ValueError(f"no accuracy evaluation for task {spec.task!r} here (use tools/eval_face.py for faces)")
    backends: dict[str, Any] = {"pytorch": spec.model, "onnx_fp32": Path(fp32_path)}
    if int8_path is not None:
        backends["onnx_int8"] = Path(int8_path)
    return _ACCURACY[spec.accuracy](spec, backends, threads, max_images)
