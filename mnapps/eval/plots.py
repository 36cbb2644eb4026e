"""Pictures of a detector's quality: per-class PR curves from COCOeval, drawn validation images.

* :func:`draw_boxes` draws boxes and captions with ``torchvision.utils.draw_bounding_boxes``,
  caption text scaled to the image (DejaVu Sans, the TrueType font matplotlib ships), so a
  caption stays readable on a 4000 px photo and does not bury a 200 px one.
* :func:`plot_pr_curves` plots, per class, the precision-recall curve that COCOeval's own
  accumulated ``eval["precision"]`` array holds ([IoU, recall, class, area, maxDets]) at IoU
  0.50 and 0.50:0.95, with the class's AP50 in the legend.
* :func:`write_detection_report` takes what the final evaluation's pass kept
  (:class:`EvaluatedDetections`), scores it with pycocotools' COCOeval, and writes
  ``pr_curves.png`` and ``val_predictions.png`` (ground truth beside prediction for the first
  images); given no such record, it runs the detector over those images itself.
"""

from __future__ import annotations

import contextlib
import io
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from matplotlib import font_manager
from matplotlib.figure import Figure
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

from mnapps.data.coco import collate_fn
from mnapps.engine.distributed import build_eval_loader
# The metrics' own ground-truth filter and empty-result object, so the curves match the printed AP.
from mnapps.eval.coco import _empty_detections, _without_bad_gt_boxes, evaluate_detector
from mnapps.files import atomic_write

__all__ = ["draw_boxes", "caption_font_size", "plot_pr_curves", "coco_precision", "EvaluatedDetections",
           "write_detection_report"]

PR_CURVES = "pr_curves.png"
VAL_GRID = "val_predictions.png"

# Distinct, readable colours cycled over class labels.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
)  # fmt: skip


@lru_cache(maxsize=1)
def _font_path() -> str:
    # matplotlib ships DejaVu Sans, so a TrueType font is there wherever mnapps is installed.
    return font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=True)


def caption_font_size(height: int, width: int) -> int:
    """Caption size in pixels: 1/40 of the shorter side, at least 10 px (readable at any photo size)."""
    return max(10, round(min(height, width) / 40))


def draw_boxes(
    image: Tensor | np.ndarray,
    boxes: Tensor,
    labels: Sequence[int],
    class_names: Sequence[str],
    scores: Sequence[float] | None = None,
) -> Tensor:
    """Boxes with ``"name score"`` captions on a copy of ``image``.

    Args:
        image: ``uint8[3, H, W]`` tensor, ``float[3, H, W]`` in [0, 1], or ``uint8[H, W, 3]`` array.
        boxes: ``[N, 4]`` xyxy pixels; ``labels[i]`` indexes ``class_names``; ``scores`` optional.

    Returns:
        ``uint8[3, H, W]``.
    """
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.dtype != torch.uint8:
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    image = image.cpu()
    labels = [int(label) for label in labels]
    if not labels:
        return image.clone()
    names = [class_names[i] if 0 <= i < len(class_names) else f"class_{i}" for i in labels]
    captions = names if scores is None else [f"{n} {float(s):.2f}" for n, s in zip(names, scores)]
    height, width = image.shape[-2:]
    return draw_bounding_boxes(
        image, torch.as_tensor(boxes, dtype=torch.float32).cpu().reshape(-1, 4), labels=captions,
        colors=[PALETTE[i % len(PALETTE)] for i in labels], width=max(2, round(min(height, width) / 200)),
        font=_font_path(), font_size=caption_font_size(height, width), fill_labels=True,
    )  # fmt: skip


def _save_png(figure: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def coco_precision(coco_gt: Any, results: list[dict[str, Any]], img_ids: Sequence[int]) -> COCOeval:
    """pycocotools' COCOeval on ``results`` over ``img_ids``, evaluated, accumulated and summarised (quietly).

    Ground-truth boxes that are non-finite or empty are left out first, as for the printed metrics.
    """
    coco_gt, _ = _without_bad_gt_boxes(coco_gt, img_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        detections = coco_gt.loadRes(results) if results else _empty_detections(coco_gt)
        evaluator = COCOeval(coco_gt, detections, iouType="bbox")
        evaluator.params.imgIds = sorted(set(int(i) for i in img_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()  # fills evaluator.stats (AP first)
    return evaluator


def plot_pr_curves(evaluator: COCOeval, names: dict[int, str], path: Path, title: str = "") -> dict[str, float]:
    """Per-class precision-recall from ``evaluator.eval["precision"]``; returns each class's AP50.

    Classes without ground truth in the evaluated images (precision -1) are left out.
    """
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    params = evaluator.params
    recall = params.recThrs
    area, max_dets = params.areaRngLbl.index("all"), len(params.maxDets) - 1
    iou50 = int(np.argmin(np.abs(params.iouThrs - 0.5)))
    figure = Figure(figsize=(11, 5), dpi=100, layout="constrained")
    at50, over_iou = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    ap50: dict[str, float] = {}
    curves50, curves_all = [], []
    for k, cat_id in enumerate(params.catIds):
        curve = precision[iou50, :, k, area, max_dets]
        if (curve < 0).all():
            continue
        name = names.get(cat_id, str(cat_id))
        ap50[name] = float(curve[curve > -1].mean())
        mean_over_iou = np.where(precision[:, :, k, area, max_dets] < 0, np.nan, precision[:, :, k, area, max_dets])
        curves50.append(curve.clip(0))
        curves_all.append(np.nanmean(mean_over_iou, axis=0))
        colour = np.array(PALETTE[k % len(PALETTE)]) / 255
        show_legend = len(params.catIds) <= 20
        at50.plot(recall, curve.clip(0), color=colour, linewidth=1.2,
                  label=f"{name} {ap50[name]:.3f}" if show_legend else None)  # fmt: skip
        over_iou.plot(recall, curves_all[-1], color=colour, linewidth=1.2)
    if curves50:
        mean50 = float(np.mean(list(ap50.values())))
        at50.plot(recall, np.mean(curves50, axis=0), color="black", linewidth=2.5, label=f"all classes {mean50:.3f}")
        over_iou.plot(recall, np.mean(curves_all, axis=0), color="black", linewidth=2.5, label="all classes")
    for axes, name in ((at50, "IoU 0.50 (legend: AP50)"), (over_iou, "mean over IoU 0.50:0.95")):
        axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=name)
        axes.grid(alpha=0.3)
        axes.legend(loc="best", fontsize=8)
    figure.suptitle(title or "precision-recall per class (COCOeval, area all, maxDets 100)")
    _save_png(figure, path)
    return ap50


def _grid(pairs: list[tuple[Tensor, Tensor]], path: Path, title: str) -> Path:
    """Ground truth beside prediction, two pairs per row."""
    columns = 4 if len(pairs) > 1 else 2
    rows = math.ceil(2 * len(pairs) / columns)
    figure = Figure(figsize=(3.2 * columns, 3.3 * rows), dpi=110, layout="constrained")
    for index, (truth, predicted) in enumerate(pairs):
        for offset, (picture, label) in enumerate(((truth, "ground truth"), (predicted, "prediction"))):
            axes = figure.add_subplot(rows, columns, 2 * index + offset + 1)
            axes.imshow(picture.permute(1, 2, 0).numpy())
            axes.set_title(label, fontsize=9)
            axes.axis("off")
    figure.suptitle(title)
    return _save_png(figure, path)


class EvaluatedDetections:
    """What one evaluation pass saw, kept for its pictures: every image's COCO results, the
    evaluated image ids, and the first ``keep`` images with their targets and outputs.

    Pass it as ``evaluate_detector(..., on_image=...)``, then to :func:`write_detection_report`,
    which then draws without running the detector again.
    """

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self.results: list[dict[str, Any]] = []
        self.image_ids: list[int] = []
        self.samples: list[tuple[Tensor, dict, dict]] = []

    def __call__(self, image: Tensor, target: dict, output: dict, coco_results: list[dict[str, Any]]) -> None:
        self.image_ids.append(int(target["image_id"]))
        self.results.extend(coco_results)
        if len(self.samples) < self.keep:
            self.samples.append((image.cpu(), target, {k: v.detach().cpu() for k, v in output.items()}))


def _evaluate_once(model, dataset, device, max_images: int | None, batch_size: int, keep: int) -> EvaluatedDetections:
    """One evaluation pass of ``model`` over ``dataset``, for a caller that did not keep its own."""
    seen = EvaluatedDetections(keep)
    loader = build_eval_loader(dataset, batch_size, collate_fn)
    evaluate_detector(model, loader, dataset, device, max_images=max_images, progress=False, on_image=seen)
    return seen


def write_detection_report(
    model: torch.nn.Module,
    dataset: Any,
    out_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    max_images: int | None = None,
    batch_size: int = 8,
    score_threshold: float = 0.3,
    grid_images: int = 8,
    log: Callable[[str], None] | None = None,
    prefix: str = "",
    evaluated: EvaluatedDetections | None = None,
) -> dict[str, Any]:
    """Write ``pr_curves.png`` and ``val_predictions.png`` for ``model`` on ``dataset``'s first images.

    Args:
        evaluated: what the evaluation pass kept (:class:`EvaluatedDetections`); without it the
            detector is run over the images once more.
        dataset: a :class:`mnapps.data.coco.CocoDetection` (its ``coco`` and ``label_to_cat_id``).
        max_images: the same limit the evaluation used (None: every image).
        score_threshold: lowest score drawn in the grid (the PR curves use every detection).
        log: prints one line naming the two files, when given.
        prefix: put before both file names (``eval_`` keeps a training run's own pictures).

    Returns:
        ``{"pr_curves": path, "val_predictions": path, "images": evaluated count, "AP50": {class: AP50},
        "AP": COCOeval's AP@[.5:.95]}``; ``{}`` after logging a note when drawing fails (a run keeps its metrics).
    """
    try:
        if evaluated is None:
            evaluated = _evaluate_once(model, dataset, device, max_images, batch_size, grid_images)
        return _write_detection_report(evaluated, dataset, Path(out_dir), score_threshold, grid_images, log, prefix)
    except Exception as exc:  # pictures are extras: they never cost a run its metrics or exit status
        if log is not None:
            log(f"note: pr_curves/val_predictions not written ({type(exc).__name__}: {exc})")
        return {}


def _write_detection_report(seen: EvaluatedDetections, dataset, out_dir: Path, score_threshold, grid_images, log,
                            prefix) -> dict[str, Any]:  # fmt: skip
    pr_path, grid_path = out_dir / f"{prefix}{PR_CURVES}", out_dir / f"{prefix}{VAL_GRID}"
    evaluated, kept = seen.image_ids, seen.samples[:grid_images]
    evaluator = coco_precision(dataset.coco, seen.results, evaluated)
    names = {cat_id: cat["name"] for cat_id, cat in dataset.coco.cats.items()}
    count = len(set(evaluated))
    ap50 = plot_pr_curves(evaluator, names, pr_path,
                          title=f"precision-recall per class, {count} val images (COCOeval)")  # fmt: skip
    class_names = ["background"] + [names[dataset.label_to_cat_id[label]] for label in sorted(dataset.label_to_cat_id)]
    pairs = []
    for image, target, output in kept:
        keep = output["scores"] >= score_threshold
        pairs.append((
            draw_boxes(image, target["boxes"], target["labels"].tolist(), class_names),
            draw_boxes(image, output["boxes"][keep], output["labels"][keep].tolist(), class_names,
                       output["scores"][keep].tolist()),
        ))  # fmt: skip
    grid = _grid(pairs, grid_path, f"first {len(pairs)} val images: ground truth | prediction "
                 f"(score >= {score_threshold:g})")  # fmt: skip
    if log is not None:
        log(f"wrote {pr_path} (per-class precision-recall, {count} val images) and {grid}")
    return {"pr_curves": pr_path, "val_predictions": grid, "images": count, "AP50": ap50,
            "AP": float(evaluator.stats[0]) if evaluator.stats is not None and len(evaluator.stats) else None}  # fmt: skip
