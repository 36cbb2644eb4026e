"""Checkpoint -> ONNX (and int8) with a parity check, for every exportable mnapps task.

This module owns what ``tools/export.py`` does, as library code:

1. :func:`load_export_spec` reads an mnapps checkpoint once, rebuilds its trained model with
   its task's own loader and reads the task's :class:`~mnapps.tasks.spec.ExportPlan`, both from
   the checkpoint's entry of :data:`mnapps.tasks.table.TASKS` (a detector's graph kind comes
   from its :class:`~mnapps.heads.HeadSpec`), and picks the graph class of that kind
   (:mod:`mnapps.export.graphs`), which says what goes in the graph and how images become its
   input.
2. :func:`export_checkpoint` folds BatchNorm, has the graph write itself, and runs the graph's
   parity check on real images (ONNX Runtime vs the PyTorch model in eval mode): logits /
   embeddings by max abs difference, SSD raw outputs likewise and the final detections (after
   the shared post-processing) by agreement. With ``int8`` it calibrates on images, applies
   bias correction, quantizes (:mod:`mnapps.export.quantize`) and checks the int8 graph with
   looser, int8-sized limits (:data:`~mnapps.export.graphs.PARITY_LIMITS`). Any failed check
   raises :class:`ParityError`.
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

from .fuse import fold_batchnorm
from .graphs import PARITY_LIMITS, ExportGraph, Runtime, build_export_graph
from .onnx import ParityError, ParityReport
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


@dataclass
class ExportSpec:
    """Everything the exporter needs to know about one trained model.

    Attributes:
        task: ``"classification"``, ``"detection"`` or ``"face"``.
        head: the detector head (``"ssd"``, ``"ssdlite"``) or None.
        model: the training model in eval mode (the parity reference).
        graph: the graph of its kind (:mod:`mnapps.export.graphs`): what goes into the file,
            how it is written, run and checked.
        config: the checkpoint's config as a typed object (for evaluation).
        default_images: ``split -> folder or list of image files`` used when the caller gives
            no images (``"parity"``: validation images, ``"calibration"``: training images).
        accuracy: what :func:`evaluate_export` measures (``"top1"``, ``"coco"`` or None).
    """

    task: str
    head: str | None
    model: nn.Module
    graph: ExportGraph
    config: Any = None
    default_images: dict[str, Callable[[], list[Path]]] = field(default_factory=dict)
    accuracy: str | None = None


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

    ``checkpoint`` is read once (a :class:`~mnapps.checkpoint.Checkpoint` already read is used as
    it is); the task's loader and export plan get that record.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: an unknown task, an unsupported head, or a config/weights mismatch.
    """
    record = read_checkpoint(checkpoint)
    task = task_spec(record)
    model, cfg = task.load(record)
    plan = task.export(record, model, cfg)
    defaults = _default_images(record, plan, lambda split: task.image_files(cfg, split))
    return ExportSpec(task=record.task, head=record.head, model=model, graph=build_export_graph(plan, model, cfg),
                      config=cfg, default_images=defaults, accuracy=plan.accuracy)


# ------------------------------------------------------------------------------------------
# export + parity


def _parity(spec: ExportSpec, path: Path, images: list[Tensor], precision: str, threads: int) -> list[ParityReport]:
    """The graph's parity reports for the file at ``path``, printed, then raised if one failed."""
    reports = spec.graph.parity(path, images, precision, threads, label=f"{spec.task} {precision}")
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
    if int8:
        spec.graph.refuse_int8(spec.head)
    folded = fold_batchnorm(spec.graph.network)
    metadata = dict(spec.graph.metadata, precision="fp32", folded_batchnorms=folded.folded_batchnorms)
    spec.graph.write(folded, images, out, metadata)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {folded.folded_batchnorms} BatchNorms folded)")
    result = ExportResult(fp32_path=out)
    result.reports += _parity(spec, out, images, "fp32", threads)

    if int8:
        calib_files = find_images(calib_images if calib_images is not None else spec.default_images["calibration"](), num_calib)
        calib = spec.graph.batch(_read_images(calib_files, "calibration images"))
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
        result.reports += _parity(spec, int8_path, images, "int8", threads)
    return result


# ------------------------------------------------------------------------------------------
# accuracy kept by deployment


class _OrtDetector(nn.Module):
    """An ONNX Runtime detector in the ``nn.Module`` clothes :func:`evaluate_detector` expects."""

    def __init__(self, detector: Runtime) -> None:
        super().__init__()
        self.detector = detector

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
        predict = spec.graph.runtime(backend, threads) if isinstance(backend, Path) else backend
        with torch.no_grad():
            results[name] = {"top1": _top1(predict, loader, name)}
    return results


def _coco_accuracy(spec: ExportSpec, backends: dict[str, Any], threads: int, max_images: int | None) -> dict:
    _, dataset = _datasets(spec)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate_fn)
    results = {}
    for name, backend in backends.items():
        model = _OrtDetector(spec.graph.runtime(backend, threads)) if isinstance(backend, Path) else backend
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
