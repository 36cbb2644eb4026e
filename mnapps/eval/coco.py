"""COCO detection metrics for every mnapps detector, computed by pycocotools' own COCOeval.

This module owns the path from model outputs to COCO numbers: torchvision-style predictions
(contiguous labels, xyxy pixel boxes) become a COCO results list with the dataset's ORIGINAL category
ids, scored by ``pycocotools.cocoeval.COCOeval`` (imported, never copied); it reads out the 12
summary numbers, per-class AP and the printed summary, and writes ``metrics.json``. Ground-truth
boxes pycocotools would mis-score are left out and counted; a results entry that is not four finite
numbers with integer ids and a finite score is refused naming the entry. :func:`evaluate_detector`
restricts COCOeval to the images actually evaluated. ``-1`` means "no ground truth in that range".
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from tqdm import tqdm

from mnapps.data.coco_index import load_coco_json
from mnapps.files import atomic_write

__all__ = [
    "COCO_METRIC_NAMES",
    "evaluate_results",
    "evaluate_detector",
    "predictions_to_coco_results",
    "format_per_class_table",
    "write_metrics_json",
    "load_coco_gt",
]

# The order of COCOeval.stats for bbox/segm, i.e. the 12 lines COCOeval.summarize() prints.
COCO_METRIC_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip

_IOU_TYPES = ("bbox", "segm")
# Results-file precision: 0.01 px moves IoU by < 1e-3 even for 10 px boxes; 5 score decimals
# keep the ranking of any realistic detector while making the JSON ~3x smaller.
_BOX_DECIMALS = 2
_SCORE_DECIMALS = 5


def load_coco_gt(coco_gt: COCO | str | os.PathLike) -> COCO:
    """Return a pycocotools ``COCO`` ground truth, loading it (quietly) from a path if needed.

    A path is read and checked by :func:`mnapps.data.coco_index.load_coco_json`, the same reader
    training uses: duplicate annotation ids, ``iscrowd`` other than 0/1/bool, non-numeric
    ``area`` and ids that are bools or strings are errors naming the entry.

    Raises:
        FileNotFoundError: the annotation file does not exist.
        ValueError: the file is not a valid COCO annotation JSON.
    """
    if isinstance(coco_gt, COCO):
        return coco_gt
    path = Path(coco_gt)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path} (pass an instances_*.json file)")
    gt = COCO()
    gt.dataset = load_coco_json(path)
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        gt.createIndex()
    return gt


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from err


def _load_results(results: Sequence[Mapping[str, Any]] | str | os.PathLike) -> tuple[list[dict], str]:
    """Results list (copied: pycocotools' loadRes mutates its input) and a name for messages."""
    if isinstance(results, (str, os.PathLike)):
        path = Path(results)
        if not path.is_file():
            raise FileNotFoundError(f"COCO results file not found: {path}")
        data = _read_json(path, what="COCO results file")
        source = str(path)
    else:
        data = results
        source = "results list"
    if not isinstance(data, (list, tuple)):
        raise ValueError(
            f"{source} must be a JSON list of detections "
            f"[{{'image_id', 'category_id', 'bbox', 'score'}}, ...], got {type(data).__name__}"
        )
    return [dict(det) for det in data], source


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _is_id(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value) and float(value).is_integer()


def _check_detection(index: int, det: Mapping[str, Any], iou_type: str, source: str) -> None:
    """One results entry: its keys, ids, score and (for bbox) four finite numbers."""
    geometry_key = "bbox" if iou_type == "bbox" else "segmentation"
    required = ("image_id", "category_id", geometry_key, "score")
    missing = [key for key in required if key not in det]
    if missing:
        raise ValueError(f"{source}: detection #{index} lacks {missing}; each needs keys {list(required)}")
    for key in ("image_id", "category_id"):
        if not _is_id(det[key]):
            raise ValueError(f"{source}: detection #{index} has {key} {det[key]!r}; ids are integers")
    if not (_is_number(det["score"]) and math.isfinite(det["score"])):
        raise ValueError(f"{source}: detection #{index} has score {det['score']!r}; expected a finite number")
    if iou_type == "bbox":
        box = det["bbox"]
        # A NaN coordinate gives a NaN overlap, which COCOeval counts as a match.
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)) or not all(
            math.isfinite(v) for v in box
        ):
            raise ValueError(
                f"{source}: detection #{index} has bbox {box!r}; expected [x, y, width, height], four finite numbers"
            )


def _check_results(detections: list[dict], gt: COCO, iou_type: str, source: str) -> None:
    """Fail with a message naming the bad entry instead of an assert deep inside pycocotools."""
    for index, det in enumerate(detections):
        _check_detection(index, det, iou_type, source)
    known_images = set(gt.getImgIds())
    unknown_images = {det["image_id"] for det in detections} - known_images
    if unknown_images:
        shown = sorted(unknown_images)[:10]
        raise ValueError(
            f"{source}: {len(unknown_images)} image_id(s) not in the ground truth, e.g. {shown}; "
            f"the results must come from the same annotation file's images"
        )
    known_categories = set(gt.getCatIds())
    unknown_categories = {det["category_id"] for det in detections} - known_categories
    if unknown_categories:
        raise ValueError(
            f"{source}: category_id(s) {sorted(unknown_categories)} are not in the ground truth "
            f"(valid: {sorted(known_categories)}); results must use the annotation file's original "
            f"category ids, not contiguous training labels"
        )


def _valid_gt_box(ann: Mapping[str, Any]) -> bool:
    box = ann.get("bbox")
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)):
        return False
    return all(math.isfinite(v) for v in box) and box[2] > 0 and box[3] > 0


def _valid_area(ann: Mapping[str, Any]) -> bool:
    area = ann.get("area")
    return _is_number(area) and math.isfinite(area) and area >= 0


def _without_bad_gt_boxes(gt: COCO, img_ids: Iterable[int] | None) -> tuple[COCO, dict[str, int]]:
    """Ground truth as pycocotools can score it honestly, and counts of what was changed.

    * Boxes that are non-finite, malformed or of non-positive size are left out: pycocotools
      counts a NaN overlap as a match, so one NaN box makes random detections "correct".
    * ``area`` missing (optional in many exporters, needed by COCOeval's area ranges), negative
      or non-finite is replaced by the box's width x height: COCOeval would otherwise drop a
      valid box from every area range (negative) or compare against NaN.
    * Annotation id 0 is renumbered (to one above the largest id): COCOeval records a match as
      the matched ground truth's id and tests it for truth, so a box with id 0 can never count
      as found, and 0-based exporters lose one box per image.

    Returns a cleaned copy (the caller's ``COCO`` is left as it is) and
    ``{"dropped", "area_fixed", "renumbered"}`` counted on the evaluated images (all images when
    ``img_ids`` is None).
    """
    annotations = gt.dataset.get("annotations", [])
    bad = [ann for ann in annotations if not _valid_gt_box(ann)]
    no_area = [ann for ann in annotations if "area" not in ann]
    wrong_area = [ann for ann in annotations if "area" in ann and not _valid_area(ann)]
    zero_id = [ann for ann in annotations if ann.get("id") == 0]
    wanted = None if img_ids is None else {int(i) for i in img_ids}

    def count(anns: list) -> int:
        return sum(1 for ann in anns if wanted is None or ann.get("image_id") in wanted)

    bad_ids = {id(ann) for ann in bad}
    counts = {"dropped": count(bad), "area_fixed": count([a for a in wrong_area if id(a) not in bad_ids]),
              "renumbered": count([a for a in zero_id if id(a) not in bad_ids])}
    if not (bad or no_area or wrong_area or zero_id):
        return gt, counts
    next_id = max((int(ann["id"]) for ann in annotations if _is_id(ann.get("id"))), default=0) + 1
    kept = []
    for ann in annotations:
        if id(ann) in bad_ids:
            continue
        if not _valid_area(ann):
            ann = {**ann, "area": float(ann["bbox"][2]) * float(ann["bbox"][3])}
        if ann.get("id") == 0:
            ann = {**ann, "id": next_id}
        kept.append(ann)
    filtered = COCO()
    filtered.dataset = {**gt.dataset, "annotations": kept}
    with contextlib.redirect_stdout(io.StringIO()):
        filtered.createIndex()
    return filtered, counts


def _empty_detections(gt: COCO) -> COCO:
    """A detections COCO object with no annotations (``COCO.loadRes([])`` raises IndexError)."""
    dets = COCO()
    dets.dataset = {
        "images": list(gt.dataset.get("images", [])),
        "categories": copy.deepcopy(gt.dataset.get("categories", [])),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        dets.createIndex()
    return dets


def _category_names(gt: COCO, cat_ids: Sequence[int]) -> dict[int, str]:
    names = {cid: str(gt.cats[cid].get("name", cid)) for cid in cat_ids}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    # User exports sometimes repeat a name under two ids; keep both rows distinguishable.
    return {cid: (f"{name} (id {cid})" if counts[name] > 1 else name) for cid, name in names.items()}


def _per_class_ap(evaluator: COCOeval, gt: COCO) -> dict[str, float]:
    """AP@[.5:.95], area all, largest maxDets, for each category with ground truth.

    ``eval["precision"]`` is [T iou thresholds, R recall points, K categories, A areas, M maxDets];
    COCOeval leaves -1 where a category has no (non-ignored) ground truth in the evaluated images,
    and those categories are left out instead of being reported as 0 or nan.
    """
    params = evaluator.params
    precision = evaluator.eval["precision"]
    area_index = params.areaRngLbl.index("all")
    names = _category_names(gt, params.catIds)
    per_class: dict[str, float] = {}
    for k, cat_id in enumerate(params.catIds):
        values = precision[:, :, k, area_index, -1]
        values = values[values > -1]
        if values.size:
            per_class[names[cat_id]] = float(np.mean(values))
    return per_class


def evaluate_results(
    coco_gt: COCO | str | os.PathLike,
    results: Sequence[Mapping[str, Any]] | str | os.PathLike,
    iou_type: str = "bbox",
    *,
    img_ids: Iterable[int] | None = None,
) -> tuple[dict[str, float], dict[str, float], str]:
    """Run pycocotools' COCOeval on a results list or file.

    Args:
        coco_gt: ground truth as a ``pycocotools.coco.COCO`` or a path to an annotation JSON.
        results: COCO results, ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``
            with the annotation file's category ids, or a path to such a JSON file. For
            ``iou_type="segm"`` each entry carries an RLE ``"segmentation"`` instead of a box.
            An empty list is valid: every AP/AR is then 0 wherever ground truth exists.
        iou_type: ``"bbox"`` or ``"segm"``.
        img_ids: evaluate only these images (default: every image of the ground truth).

    Returns:
        ``(metrics, per_class_ap, summary_text)``: ``metrics`` maps the 12 names of
        :data:`COCO_METRIC_NAMES` to COCOeval's stats in order (-1 = no ground truth for that
        entry, COCO's convention), followed by ``"num_gt_dropped"`` only when ground-truth
        boxes were left out (see below); ``per_class_ap`` maps category name to AP@[.5:.95] for
        the categories that have ground truth among the evaluated images (others are omitted);
        ``summary_text`` is what ``COCOeval.summarize()`` prints, preceded by a note line when
        ground-truth boxes were left out or there were no detections.

    Ground-truth boxes that are non-finite, malformed or of zero/negative width or height are
    left out before COCOeval (``iou_type="bbox"``) and counted: pycocotools would count their
    NaN overlaps as matches and inflate AP.

    Raises:
        FileNotFoundError: an annotation or results path does not exist.
        ValueError: unknown ``iou_type``, malformed detections (a bbox that is not four finite
            numbers, a non-numeric score or id), image or category ids that are not in the
            ground truth, or ``img_ids`` outside the ground truth.
    """
    if iou_type not in _IOU_TYPES:
        raise ValueError(f"iou_type must be one of {_IOU_TYPES}, got {iou_type!r}")
    img_ids = None if img_ids is None else list(img_ids)
    gt = load_coco_gt(coco_gt)
    detections, source = _load_results(results)
    _check_results(detections, gt, iou_type, source)
    note, dropped = "", 0
    if iou_type == "bbox":
        gt, changed = _without_bad_gt_boxes(gt, img_ids)
        dropped = changed["dropped"]
        note = _cleaning_note(changed, _gt_name(coco_gt))
    with contextlib.redirect_stdout(io.StringIO()):  # loadRes/evaluate/accumulate chatter
        if detections:
            dets = gt.loadRes(detections)
        else:
            dets = _empty_detections(gt)
            note += f"note: {source} holds no detections; every AP/AR is 0 where ground truth exists\n"
        evaluator = COCOeval(gt, dets, iouType=iou_type)
        if img_ids is not None:
            wanted = sorted({int(i) for i in img_ids})
            unknown = sorted(set(wanted) - set(gt.getImgIds()))
            if unknown:
                raise ValueError(f"img_ids {unknown[:10]} are not images of the ground truth")
            if not wanted:
                raise ValueError("img_ids is empty: there is no image to evaluate")
            evaluator.params.imgIds = wanted
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()

    metrics = {name: float(value) for name, value in zip(COCO_METRIC_NAMES, evaluator.stats)}
    if dropped:
        metrics["num_gt_dropped"] = dropped
    return metrics, _per_class_ap(evaluator, gt), note + summary.getvalue()


def _cleaning_note(changed: Mapping[str, int], name: str) -> str:
    note = ""
    if changed["dropped"]:
        note += (f"note: {changed['dropped']} ground-truth box(es) with a non-finite, malformed, zero or negative-size "
                 f"bbox were left out of the evaluation; fix them in {name}\n")
    if changed["area_fixed"]:
        note += (f"note: {changed['area_fixed']} ground-truth annotation(s) with a negative or non-finite area were "
                 f"scored with the box's width x height instead; fix them in {name}\n")
    if changed["renumbered"]:
        note += (f"note: {changed['renumbered']} ground-truth annotation(s) with id 0 were renumbered for COCOeval "
                 f"(which cannot match a box whose id is 0); ids in {name} should start at 1\n")
    return note


def _gt_name(coco_gt: COCO | str | os.PathLike) -> str:
    return "the annotation file" if isinstance(coco_gt, COCO) else str(coco_gt)


def _to_numpy(values: Any, dtype: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64 if dtype is float else torch.int64)
        return values.numpy()
    return np.asarray(values, dtype=np.float64 if dtype is float else np.int64)


def _per_image_scales(scale: Any, count: int) -> list[tuple[float, float]]:
    if scale is None:
        return [(1.0, 1.0)] * count
    if isinstance(scale, (int, float)):
        return [(float(scale), float(scale))] * count
    scales = list(scale)
    if len(scales) != count:
        raise ValueError(f"scale must be a number or hold one entry per image ({count}), got {len(scales)} entries")
    pairs = []
    for entry in scales:
        if isinstance(entry, (int, float)):
            pairs.append((float(entry), float(entry)))
        elif len(entry) == 2:
            pairs.append((float(entry[0]), float(entry[1])))
        else:
            raise ValueError(f"each per-image scale must be a number or an (sx, sy) pair, got {entry!r}")
    return pairs


def predictions_to_coco_results(
    predictions: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int],
    scale: float | Sequence[float | tuple[float, float]] | None = None,
) -> list[dict[str, Any]]:
    """Convert detector outputs into COCO results entries with the ORIGINAL category ids.

    Args:
        predictions: one dict per image, ``{"boxes": [N,4] xyxy pixels, "labels": [N] int
            contiguous labels (1..K), "scores": [N]}`` (tensors on any device, or arrays).
        image_ids: the COCO image id of each prediction, same length as ``predictions``.
        label_to_cat_id: contiguous label -> dataset category id (e.g. ``dataset.label_to_cat_id``).
        scale: multiplies boxes to reach original-image pixels when the model saw a resized image:
            ``None`` (already original pixels), one number for all images, or one entry per image,
            each a number or an ``(sx, sy)`` pair.

    Returns:
        ``[{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}]`` with
        boxes rounded to 0.01 px and scores to 1e-5.

    Raises:
        ValueError: length mismatch, malformed prediction, non-finite boxes, or a label with no
            category (naming the label; 0 is background and never a valid prediction).
    """
    if len(predictions) != len(image_ids):
        raise ValueError(f"got {len(predictions)} predictions but {len(image_ids)} image ids; pass one id per image")
    scales = _per_image_scales(scale, len(predictions))
    results: list[dict[str, Any]] = []
    for prediction, image_id, (sx, sy) in zip(predictions, image_ids, scales):
        missing = [key for key in ("boxes", "labels", "scores") if key not in prediction]
        if missing:
            raise ValueError(f"prediction for image {image_id} lacks {missing}; expected boxes, labels, scores")
        boxes = _to_numpy(prediction["boxes"], float).reshape(-1, 4)
        labels = _to_numpy(prediction["labels"], int).reshape(-1)
        scores = _to_numpy(prediction["scores"], float).reshape(-1)
        if not len(boxes) == len(labels) == len(scores):
            raise ValueError(
                f"prediction for image {image_id} has {len(boxes)} boxes, {len(labels)} labels and "
                f"{len(scores)} scores; they must have the same length"
            )
        if not np.isfinite(boxes).all() or not np.isfinite(scores).all():
            raise ValueError(f"prediction for image {image_id} has non-finite boxes or scores")
        xywh = np.empty_like(boxes)
        xywh[:, 0] = boxes[:, 0] * sx
        xywh[:, 1] = boxes[:, 1] * sy
        xywh[:, 2] = (boxes[:, 2] - boxes[:, 0]) * sx
        xywh[:, 3] = (boxes[:, 3] - boxes[:, 1]) * sy
        xywh = np.round(xywh, _BOX_DECIMALS)
        for box, label, score in zip(xywh.tolist(), labels.tolist(), scores.tolist()):
            if label not in label_to_cat_id:
                raise ValueError(
                    f"prediction for image {image_id} has label {label}, which maps to no category "
                    f"(known labels {sorted(label_to_cat_id)}; 0 is background and must not be predicted)"
                )
            results.append({"image_id": int(image_id), "category_id": int(label_to_cat_id[label]), "bbox": box,
                            "score": round(score, _SCORE_DECIMALS)})
    return results


def _loader_image_count(loader: Any, dataset: Any) -> int | None:
    for owner in (getattr(loader, "sampler", None), getattr(loader, "dataset", None), dataset):
        try:
            return len(owner)
        except TypeError:
            continue
    return None


def _detect_all(model: nn.Module, loader: Iterable, dataset: Any, device: torch.device | str, max_images: int | None,
                progress: bool, on_image: Callable | None) -> tuple[list[dict[str, Any]], set[int], int]:
    """evaluate_detector's pass: COCO results, the evaluated image ids, the images skipped as unreadable."""
    total = _loader_image_count(loader, dataset)
    if max_images is not None:
        total = max_images if total is None else min(total, max_images)
    results: list[dict[str, Any]] = []
    evaluated: set[int] = set()
    skipped = 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=total, desc="evaluate", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for images, targets, num_skipped in loader:
                skipped += int(num_skipped)
                if max_images is not None:
                    room = max_images - len(evaluated)
                    if room <= 0:
                        break
                    images, targets = images[:room], targets[:room]
                if not images:
                    continue
                outputs = model([image.to(device, non_blocking=True) for image in images])
                for image, output, target in zip(images, outputs, targets):
                    image_id = int(target["image_id"])
                    # A DistributedSampler pads with repeats; counting them twice would add
                    # false positives, so each image contributes once.
                    if image_id in evaluated:
                        continue
                    evaluated.add(image_id)
                    found = predictions_to_coco_results([output], [image_id], dataset.label_to_cat_id)
                    results.extend(found)
                    if on_image is not None:
                        on_image(image, target, output, found)
                bar.update(len(images))
                bar.set_postfix(dets=len(results))
    finally:
        bar.close()
        model.train(was_training)
    return results, evaluated, skipped


def evaluate_detector(
    model: nn.Module,
    loader: Iterable[tuple[list[torch.Tensor], list[dict[str, Any]], int]],
    dataset: Any,
    device: torch.device | str,
    max_images: int | None = None,
    progress: bool = True,
    on_image: Callable[[torch.Tensor, dict, dict, list], None] | None = None,
) -> tuple[dict[str, float], dict[str, float], str]:
    """Run a torchvision-style detector over ``loader`` and score it with COCOeval.

    Args:
        model: detector already on ``device``; in eval mode ``model(list[Tensor[3,H,W] in [0,1]])``
            returns ``[{"boxes": [N,4] xyxy pixels of that image, "labels": [N], "scores": [N]}]``.
            Its train/eval mode is restored afterwards.
        loader: yields ``(images, targets, num_skipped)`` as ``mnapps.data.coco.collate_fn`` makes
            them; each target carries its COCO ``"image_id"``.
        dataset: has ``coco`` (the ground-truth ``COCO``) and ``label_to_cat_id``.
        device: where the images are sent.
        max_images: stop after this many images (COCOeval is restricted to them).
        progress: show a tqdm bar.
        on_image: called as ``on_image(image, target, output, coco_results)`` once per evaluated
            image, so that pictures of the evaluation need no second pass (``eval.plots``).

    Returns:
        ``(metrics, per_class_ap, summary_text)`` as :func:`evaluate_results`, restricted to the
        images evaluated; the summary ends with a line counting images the loader skipped as
        unreadable, if any.

    Raises:
        ValueError: ``max_images`` < 1, a dataset without ``coco``/``label_to_cat_id``, or a loader
            that yielded no image.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    for attribute in ("coco", "label_to_cat_id"):
        if not hasattr(dataset, attribute):
            raise ValueError(f"dataset {type(dataset).__name__} has no '{attribute}'; pass a mnapps CocoDetection")

    results, evaluated, skipped = _detect_all(model, loader, dataset, device, max_images, progress, on_image)
    if not evaluated:
        raise ValueError("the loader yielded no image to evaluate (empty dataset, or every image unreadable)")
    metrics, per_class, summary = evaluate_results(dataset.coco, results, img_ids=evaluated)
    if skipped:
        summary += f"note: {skipped} unreadable image(s) were skipped and are not part of these numbers\n"
    return metrics, per_class, summary


def format_per_class_table(per_class_ap: Mapping[str, float], columns: int = 3) -> str:
    """Per-class AP@[.5:.95] as a fixed-width text table, ``columns`` (name, AP) pairs per row.

    Example::

        category         AP     | category         AP     | ...
        person           0.512  | bicycle          0.301  | ...
    """
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    if not per_class_ap:
        return "per-class AP: no category has ground truth among the evaluated images\n"
    width = max(8, *(len(name) for name in per_class_ap))
    cells = [
        f"{name:<{width}}  {'nan' if math.isnan(ap) else f'{ap:.3f}':>6}" for name, ap in per_class_ap.items()
    ]
    header = " | ".join([f"{'category':<{width}}  {'AP':>6}"] * min(columns, len(cells)))
    rows = [" | ".join(cells[i : i + columns]) for i in range(0, len(cells), columns)]
    return "\n".join([header, "-" * len(header), *rows]) + "\n"


def _json_safe(value: Any) -> Any:
    """nan/inf are not JSON; write them as null so every JSON reader accepts the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_metrics_json(
    path: str | os.PathLike,
    metrics: Mapping[str, float],
    per_class_ap: Mapping[str, float],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write ``metrics.json``: the 12 COCO numbers at top level, then the rest.

    The file holds ``{"AP": ..., ..., "ARl": ..., "per_class_AP": {name: AP}, **extra}``
    (``extra`` e.g. the checkpoint path or image count; it may not reuse those keys).

    Raises:
        ValueError: ``metrics`` lacks one of :data:`COCO_METRIC_NAMES`, or ``extra`` collides.
    """
    missing = [name for name in COCO_METRIC_NAMES if name not in metrics]
    if missing:
        raise ValueError(f"metrics lacks {missing}; pass the dict returned by evaluate_results")
    payload: dict[str, Any] = {name: float(metrics[name]) for name in COCO_METRIC_NAMES}
    payload["per_class_AP"] = dict(per_class_ap)
    for key, value in (extra or {}).items():
        if key in payload:
            raise ValueError(f"extra key {key!r} would overwrite a metric; rename it")
        payload[key] = value
    text = json.dumps(_json_safe(payload), indent=2, default=str) + "\n"
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
