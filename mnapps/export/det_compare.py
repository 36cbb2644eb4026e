"""Detectors compared side by side: cost, speed in three runtimes, and COCO accuracy on one file.

This module owns what ``tools/compare_detectors.py`` measures for a list of detection
checkpoints (e.g. a teacher and its students) on one COCO annotation file:

* multiply-adds (:func:`mnapps.stats.count_macs`, one photo at the model's input size, the
  whole network) and parameters;
* milliseconds per photo, end to end (resize + network + decoding + NMS, after decoding the
  photo), for PyTorch fp32 (the eval-mode model), ONNX Runtime fp32 and ONNX Runtime int8 (both
  exported by :func:`mnapps.export.pipeline.export_checkpoint`, calibrated on the given
  photos), interleaved photo by photo and model by model in one run, so that the ratios hold
  on a shared machine;
* COCO AP, AP50 and recall at IoU 0.5 (all detections, up to 100 per photo) of each runtime's
  detections of those same timed calls, and recall at IoU 0.5 of the detections scoring at
  least ``score_threshold`` (the operating point);
* optionally an operating point chosen on *other* photos (a validation file): the highest score
  threshold at which the PyTorch model keeps at least ``min_val_recall`` of the validation faces
  at IoU 0.5 (:func:`choose_threshold`), and each runtime's recall and precision at IoU 0.5 at
  that threshold on the compared photos (:func:`operating_point`). Nothing is chosen on the
  photos the table scores.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mnapps.data.image_io import load_rgb
from mnapps.data.transforms import sample_to_tensors
from mnapps.stats import count_macs, count_params
from mnapps.tasks.detection import load_detector

from .onnx import OrtSSD, ParityError
from .pipeline import export_checkpoint

__all__ = ["BACKENDS", "choose_threshold", "coco_scores", "compare_detectors", "matches50", "operating_point"]

BACKENDS = ("torch_fp32", "ort_fp32", "ort_int8")


def coco_scores(gt: COCO, results: list[dict[str, Any]], score_threshold: float) -> dict[str, float]:
    """AP, AP50, recall at IoU 0.5 (all results) and recall at IoU 0.5 of results >= the threshold."""

    def run(dets: list[dict[str, Any]]) -> COCOeval:
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(gt, gt.loadRes(dets) if dets else COCO(), "bbox")
            evaluator.params.imgIds = sorted(gt.getImgIds())
            if not dets:
                return evaluator
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return evaluator

    def recall50(evaluator: COCOeval) -> float:
        # recall[T, K, A, M]: IoU 0.5, the (only or mean over) categories, all areas, 100 detections
        values = evaluator.eval["recall"][0, :, 0, -1]
        values = values[values > -1]
        return float(values.mean()) if len(values) else 0.0

    if not results:
        return {"AP": 0.0, "AP50": 0.0, "recall50": 0.0, "recall50_at_threshold": 0.0}
    full = run(results)
    kept = [r for r in results if r["score"] >= score_threshold]
    at = recall50(run(kept)) if kept else 0.0
    return {"AP": float(full.stats[0]), "AP50": float(full.stats[1]), "recall50": recall50(full),
            "recall50_at_threshold": at}


def matches50(gt: COCO, results: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Every scored detection at IoU 0.5, as COCO matches them (up to 100 per photo, all areas).

    Returns ``(scores, hit, faces)``: each detection's score and whether it matched a ground-truth
    box, best score first, and the number of ground-truth boxes. COCO matches an image's
    detections best score first, so the detections above any threshold match exactly as they do
    here: the operating point at any threshold is a prefix of these arrays.
    """
    faces = sum(1 for ann in gt.dataset["annotations"] if not ann.get("iscrowd", 0))
    if not results:
        return np.zeros(0), np.zeros(0, bool), faces
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.params.imgIds = sorted(gt.getImgIds())
        evaluator.evaluate()
    scores, hits = [], []
    for entry in evaluator.evalImgs:
        if entry is None or entry["aRng"] != evaluator.params.areaRng[0]:
            continue
        ignored = np.asarray(entry["dtIgnore"], bool).reshape(len(evaluator.params.iouThrs), -1)[0]
        matched = np.asarray(entry["dtMatches"]).reshape(len(evaluator.params.iouThrs), -1)[0] > 0
        scores += [s for s, skip in zip(entry["dtScores"], ignored) if not skip]
        hits += [m for m, skip in zip(matched, ignored) if not skip]
    order = np.argsort(-np.asarray(scores, float), kind="stable")
    return np.asarray(scores, float)[order], np.asarray(hits, bool)[order], faces


def operating_point(gt: COCO, results: list[dict[str, Any]], threshold: float) -> dict[str, float]:
    """Recall and precision at IoU 0.5 of the detections scoring at least ``threshold``.

    Precision of no detection at all is 1 (nothing false was said); recall of no face is 1.
    """
    scores, hits, faces = matches50(gt, results)
    kept = scores >= threshold
    found = int(hits[kept].sum())
    return {"threshold": float(threshold), "recall50": found / faces if faces else 1.0,
            "precision50": found / int(kept.sum()) if kept.any() else 1.0, "detections": int(kept.sum())}


def choose_threshold(gt: COCO, results: list[dict[str, Any]], min_recall: float) -> tuple[float, bool]:
    """The highest score threshold whose recall at IoU 0.5 is at least ``min_recall``.

    Returns ``(threshold, reached)``; when no threshold reaches ``min_recall`` (faces never
    found), ``(0.0, False)``: every detection is kept, the most recall there is.
    """
    if not 0.0 < min_recall <= 1.0:
        raise ValueError(f"min_recall must be in (0, 1], got {min_recall}")
    scores, hits, faces = matches50(gt, results)
    if faces == 0:
        raise ValueError("the validation file has no ground-truth box: no recall to choose a threshold by")
    reached = np.nonzero(np.cumsum(hits) >= min_recall * faces - 1e-9)[0]
    return (float(scores[reached[0]]), True) if len(reached) else (0.0, False)


def _results(detections: dict[str, Any], image_id: int, label_to_cat: dict[int, int]) -> list[dict[str, Any]]:
    out = []
    for box, label, score in zip(detections["boxes"].tolist(), detections["labels"].tolist(), detections["scores"].tolist()):
        x1, y1, x2, y2 = box
        out.append({"image_id": image_id, "category_id": label_to_cat.get(int(label), int(label)),
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return out


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    with torch.inference_mode():
        value = fn()
    return value, (time.perf_counter() - start) * 1000.0


def _prepare(name: str, checkpoint: Path, work_dir: Path, calib: Sequence[Path], threads: int) -> dict[str, Any]:
    model, cfg = load_detector(checkpoint)
    size = cfg.model.ssd.size
    fp32, int8 = work_dir / f"{name}.onnx", work_dir / f"{name}.int8.onnx"
    try:
        export_checkpoint(checkpoint, fp32, int8=True, calib_images=list(calib), parity_images=list(calib),
                          num_calib=32, num_parity=4, threads=threads)
    except ParityError as exc:
        # The int8 check compares with PyTorch on a few photos; the accuracy measured below on
        # the evaluation photos is what the table reports, so a failed check is only printed.
        if not int8.is_file():
            raise
        print(f"{name}: {exc}")
    ids = list(cfg.model.category_ids) or list(range(1, cfg.model.num_classes))
    return {
        "name": name, "checkpoint": str(checkpoint), "size": size, "width_mult": cfg.model.backbone.width_mult,
        "macs": count_macs(model, [torch.zeros(3, size, size)]), "params": count_params(model),
        "runners": {
            "torch_fp32": model,
            "ort_fp32": OrtSSD(fp32, threads=threads),
            "ort_int8": OrtSSD(int8, threads=threads),
        },
        "label_to_cat": {label: int(cat) for label, cat in enumerate(ids, start=1)},
    }


def _load_photos(ann_file: str | Path, images_root: str | Path) -> tuple[COCO, list[dict], list[torch.Tensor]]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
    images = [gt.imgs[i] for i in sorted(gt.getImgIds())]
    empty = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    photos = [sample_to_tensors(load_rgb(Path(images_root) / image["file_name"]), *empty)[0] for image in images]
    return gt, images, photos


def _val_thresholds(rows: list[dict[str, Any]], val: tuple[str | Path, str | Path], min_recall: float) -> None:
    """Each row's operating point chosen on the validation photos by its PyTorch model (untimed)."""
    gt, images, photos = _load_photos(*val)
    for row in rows:
        results = []
        for image, photo in zip(images, photos):
            with torch.inference_mode():
                results += _results(row["runners"]["torch_fp32"]([photo])[0], image["id"], row["label_to_cat"])
        threshold, reached = choose_threshold(gt, results, min_recall)
        row["val"] = {"file": str(val[0]), "min_recall": min_recall, "reached": reached,
                      **operating_point(gt, results, threshold)}


def compare_detectors(
    checkpoints: dict[str, str | Path],
    ann_file: str | Path,
    images_root: str | Path,
    calib_photos: Sequence[Path],
    work_dir: str | Path,
    *,
    threads: int = 1,
    score_threshold: float = 0.5,
    warmup: int = 2,
    val: tuple[str | Path, str | Path] | None = None,
    min_val_recall: float = 0.9,
) -> list[dict[str, Any]]:
    """One row per checkpoint (see the module docstring), measured in one interleaved run.

    Args:
        checkpoints: row name -> detection checkpoint (SSD heads: ONNX export and int8).
        ann_file, images_root: the COCO annotation file the photos and ground truth come from.
        calib_photos: photos for int8 calibration and the export's parity check (not the
            evaluation photos).
        work_dir: where the ``.onnx`` files are written.
        threads: torch and ONNX Runtime intra-op threads.
        score_threshold: operating point of ``recall50_at_threshold``.
        warmup: untimed calls per model and runtime before the timed pass.
        val: ``(annotation file, images root)`` of validation photos (not the compared ones) to
            choose each model's operating point on: the highest threshold keeping at least
            ``min_val_recall`` of their faces at IoU 0.5. Each row then holds ``val`` (the threshold
            and the validation recall / precision there) and ``<backend>_at_val`` (recall and
            precision at IoU 0.5 at that threshold on the compared photos).
    """
    torch.set_num_threads(threads)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    gt, images, photos = _load_photos(ann_file, images_root)
    rows = [_prepare(name, Path(path), work_dir, calib_photos, threads) for name, path in checkpoints.items()]
    if val is not None:
        _val_thresholds(rows, val, min_val_recall)
    for row in rows:
        for runner in row["runners"].values():
            for photo in photos[:warmup]:
                _timed(lambda: runner([photo]))
        row["times"] = {backend: [] for backend in BACKENDS}
        row["results"] = {backend: [] for backend in BACKENDS}
    for image, photo in zip(images, photos):
        for row in rows:
            for backend in BACKENDS:
                detections, ms = _timed(lambda: row["runners"][backend]([photo])[0])
                row["times"][backend].append(ms)
                row["results"][backend] += _results(detections, image["id"], row["label_to_cat"])
    table = []
    for row in rows:
        entry = {key: row[key] for key in ("name", "checkpoint", "size", "width_mult", "macs", "params")}
        for backend in BACKENDS:
            entry[f"{backend}_ms"] = statistics.mean(row["times"][backend])
            scores = coco_scores(gt, row["results"][backend], score_threshold)
            entry.update({f"{backend}_{key}": value for key, value in scores.items()})
            if "val" in row:
                entry[f"{backend}_at_val"] = operating_point(gt, row["results"][backend], row["val"]["threshold"])
        if "val" in row:
            entry["val"] = row["val"]
        table.append(entry)
    return table
