"""Evaluating a detector checkpoint with COCOeval: the detection entry of the task table's evaluators.

This module owns :func:`evaluate_detection`: rebuild the detector a checkpoint describes (or the
one a given config describes), read the validation data the config names (or the ones the
request names instead), score it with :func:`mnapps.eval.coco.evaluate_detector`, and draw the
PR curves and predictions when the request names a folder for them.
"""

from __future__ import annotations

from mnapps.checkpoint import Checkpoint
from mnapps.data.coco import collate_fn
from mnapps.engine.distributed import build_eval_loader
from mnapps.eval.coco import evaluate_detector
from mnapps.eval.plots import EvaluatedDetections, write_detection_report

from ..spec import EvalRequest, Evaluation
from .data import build_eval_dataset
from .model import load_detector

__all__ = ["evaluate_detection"]


def evaluate_detection(checkpoint: Checkpoint, request: EvalRequest) -> Evaluation:
    """COCO metrics, per-class AP and COCOeval's summary of the detector in ``checkpoint``.

    Raises:
        ValueError: not a detection checkpoint, weights that do not fit the config, or bad
            validation data (each named).
    """
    model, cfg = load_detector(checkpoint, device=request.device, config=request.config)
    dataset = build_eval_dataset(cfg, request.val_ann, request.val_images)
    batch_size = request.batch_size or cfg.data.eval_batch_size
    workers = cfg.train.num_workers if request.workers is None else request.workers
    loader = build_eval_loader(dataset, batch_size, collate_fn, workers)
    seen = EvaluatedDetections() if request.report_dir is not None else None  # kept for the pictures
    metrics, per_class, summary = evaluate_detector(
        model, loader, dataset, request.device, max_images=request.max_images, progress=request.progress, on_image=seen
    )
    if seen is not None:
        write_detection_report(model, dataset, request.report_dir, device=request.device, max_images=request.max_images,
                               batch_size=batch_size, log=print, prefix="eval_", evaluated=seen)
    extra = {"checkpoint": checkpoint.origin, "val_ann": str(dataset.ann_file), "device": str(request.device)}
    return Evaluation(metrics, per_class, summary, extra)
