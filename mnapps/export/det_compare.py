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
* optionally an operating point chosen on *other* photos (a validation file): the score threshold
  at which the PyTorch model is expected to find ``target_recall`` of new faces at IoU 0.5, by
  default the split-conformal one (:func:`threshold_for_recall`), and each runtime's recall and
  precision at IoU 0.5 at that threshold on the compared photos (:func:`operating_point`).
  Nothing is chosen on the photos the table scores.
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

from mnapps.choices import THRESHOLD_RULE_NAMES
from mnapps.data.image_io import load_rgb
from mnapps.data.transforms import sample_to_tensors
from mnapps.eval.plots import coco_precision
from mnapps.graph_kind import GraphKind
from mnapps.stats import count_macs, count_params

from .onnx import OrtSSD, ParityError
from .pipeline import export_checkpoint, load_export_spec

__all__ = ["BACKENDS", "choose_threshold", "coco_scores", "compare_detectors", "matches50",
           "operating_point", "threshold_for_recall"]

BACKENDS = ("torch_fp32", "ort_fp32", "ort_int8")


def coco_scores(gt: COCO, results: list[dict[str, Any]], score_threshold: float) -> dict[str, float]:
    """AP, AP50, recall at IoU 0.5 (all results) and recall at IoU 0.5 of results >= the threshold."""

    def recall50(evaluator: COCOeval) -> float:
        # recall[T, K, A, M]: IoU 0.5, the (only or mean over) categories, all areas, 100 detections
        values = evaluator.eval["recall"][0, :, 0, -1]
        values = values[values > -1]
        return float(values.mean()) if len(values) else 0.0

    if not results:
        return {"AP": 0.0, "AP50": 0.0, "recall50": 0.0, "recall50_at_threshold": 0.0}
    full = coco_precision(gt, results, gt.getImgIds())
    kept = [r for r in results if r["score"] >= score_threshold]
    at = recall50(coco_precision(gt, kept, gt.getImgIds())) if kept else 0.0
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


def threshold_for_recall(face_scores: np.ndarray, faces: int, target_recall: float,
                         rule: str = "conformal") -> tuple[float, bool]:
    """A score threshold for finding ``target_recall`` of the faces, from validation faces' scores.

    ``face_scores`` are the scores of the detections that matched a validation face (one per
    found face); the other ``faces - len(face_scores)`` faces were never found and rank lowest.

    * ``"conformal"`` (split-conformal): the m-th lowest face score, m = floor((n + 1)(1 - target)).
      A new face drawn like the validation ones scores at least that with probability
      1 - m / (n + 1) >= target, so the recall expected on new photos is at least the target.
    * ``"val-recall"``: the highest threshold keeping ``target`` of the *validation* faces. It
      lands on the (n - k + 1)-th lowest face score (k = ceil(target * n) faces kept), and a new
      face clears that with probability only (k) / (n + 1): on 14 faces and a target of 0.9,
      13 / 15 = 0.867. It fits the validation faces, not the faces to come.

    Returns ``(threshold, reached)``; ``(0.0, False)`` when no threshold gives the target (too
    few validation faces for the conformal bound, or the faces it needs were never found):
    every detection is kept, the most recall there is.
    """
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"the target recall must be in (0, 1], got {target_recall}")
    if rule not in THRESHOLD_RULE_NAMES:
        raise ValueError(f"unknown threshold rule {rule!r}; valid: {', '.join(THRESHOLD_RULE_NAMES)}")
    if faces == 0:
        raise ValueError("the validation file has no ground-truth box: no recall to choose a threshold by")
    found = np.sort(np.asarray(face_scores, float))[::-1]  # best first
    if rule == "val-recall":
        keep = int(np.ceil(target_recall * faces - 1e-9))
    else:
        lowest = int(np.floor((faces + 1) * (1.0 - target_recall) + 1e-9))
        if lowest == 0:
            return 0.0, False
        keep = faces - lowest + 1  # the m-th lowest face is the (n - m + 1)-th best
    return (float(found[keep - 1]), True) if keep <= len(found) else (0.0, False)


def choose_threshold(gt: COCO, results: list[dict[str, Any]], min_recall: float,
                     rule: str = "conformal") -> tuple[float, bool]:
    """The score threshold for ``min_recall`` at IoU 0.5 by ``rule`` (:func:`threshold_for_recall`),
    from these detections on these (validation) photos."""
    scores, hits, faces = matches50(gt, results)
    return threshold_for_recall(scores[hits], faces, min_recall, rule)


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
    spec = load_export_spec(checkpoint)  # the checkpoint is read once, for the table and the export
    if spec.graph.kind is not GraphKind.SSD:
        raise ValueError(f"{checkpoint}: compare_detectors compares SSD detectors, not a {spec.head or spec.task} model")
    model, cfg = spec.model, spec.config
    size = cfg.model.head_settings.size
    fp32, int8 = work_dir / f"{name}.onnx", work_dir / f"{name}.int8.onnx"
    try:
        export_checkpoint(spec, fp32, int8=True, calib_images=list(calib), parity_images=list(calib),
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


def _val_thresholds(rows: list[dict[str, Any]], val: tuple[str | Path, str | Path], target_recall: float,
                    rule: str) -> None:
    """Each row's operating point chosen on the validation photos by its PyTorch model (untimed)."""
    gt, images, photos = _load_photos(*val)
    for row in rows:
        results = []
        for image, photo in zip(images, photos):
            with torch.inference_mode():
                results += _results(row["runners"]["torch_fp32"]([photo])[0], image["id"], row["label_to_cat"])
        threshold, reached = choose_threshold(gt, results, target_recall, rule)
        row["val"] = {"file": str(val[0]), "target_recall": target_recall, "rule": rule, "reached": reached,
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
    target_recall: float = 0.9,
    threshold_rule: str = "conformal",
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
            choose each model's operating point on, for ``target_recall`` at IoU 0.5 by
            ``threshold_rule`` (:func:`threshold_for_recall`). Each row then holds ``val`` (the
            threshold and the validation recall / precision there) and ``<backend>_at_val``
            (recall and precision at IoU 0.5 at that threshold on the compared photos).
    """
    torch.set_num_threads(threads)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    gt, images, photos = _load_photos(ann_file, images_root)
    rows = [_prepare(name, Path(path), work_dir, calib_photos, threads) for name, path in checkpoints.items()]
    if val is not None:
        _val_thresholds(rows, val, target_recall, threshold_rule)
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
