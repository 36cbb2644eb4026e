""":data:`TASKS`: the one table of mnapps tasks, beside :data:`mnapps.heads.HEADS`.

Each entry (:class:`mnapps.tasks.spec.TaskSpec`) names the task's config class, training entry
point, checkpoint loader, dataset factory, export plan and evaluator. A checkpoint's ``task``
selects its entry, so export and evaluation (:func:`evaluate_checkpoint`), and anything else that
takes "any checkpoint", dispatch through this table rather than on model classes.
"""

from __future__ import annotations

import os

from mnapps.checkpoint import Checkpoint, read_checkpoint

from .classification import (
    ClsConfig,
    build_cls_datasets,
    cls_export_plan,
    cls_image_files,
    load_classifier,
    train_classifier,
)
from .detection import (
    DetConfig,
    build_det_datasets,
    det_export_plan,
    det_image_files,
    evaluate_detection,
    load_detector,
    train_detector,
)
from .face import FaceDistillConfig, distill_face, face_datasets, face_export_plan, face_image_files, load_face_task
from .spec import EvalRequest, Evaluation, ExportPlan, TaskSpec

__all__ = ["TASKS", "task_spec", "evaluate_checkpoint", "TaskSpec", "ExportPlan", "EvalRequest", "Evaluation"]


TASKS: dict[str, TaskSpec] = {
    "classification": TaskSpec(
        ClsConfig, train_classifier, lambda c: load_classifier(c)[:2], build_cls_datasets, cls_image_files,
        cls_export_plan,
    ),
    "detection": TaskSpec(
        DetConfig, train_detector, load_detector, build_det_datasets, det_image_files, det_export_plan,
        evaluate_detection,
    ),
    "face": TaskSpec(
        FaceDistillConfig, distill_face, load_face_task, face_datasets, face_image_files, face_export_plan
    ),
}


def task_spec(checkpoint: Checkpoint) -> TaskSpec:
    """The :data:`TASKS` entry of a checkpoint's task; any other is a ValueError naming the choices."""
    if checkpoint.task not in TASKS:
        raise ValueError(
            f"{checkpoint.origin}: a checkpoint with task={checkpoint.task!r}, which no mnapps task reads; expected "
            f"one of {sorted(TASKS)} (a checkpoint "
            "written by tools/train_cls.py, train_det.py, distill_face.py or import_weights.py)"
        )
    return TASKS[checkpoint.task]


def evaluate_checkpoint(checkpoint: str | os.PathLike | Checkpoint, request: EvalRequest) -> Evaluation:
    """Score a checkpoint with its task's evaluator (its :data:`TASKS` entry's ``evaluate``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an mnapps task checkpoint, a task without an evaluator, or the
            evaluator's own errors (each named).
    """
    record = read_checkpoint(checkpoint)
    spec = task_spec(record)
    if spec.evaluate is None:
        scored = ", ".join(sorted(name for name, entry in TASKS.items() if entry.evaluate is not None))
        raise ValueError(
            f"{record.origin}: a {record.task} checkpoint; only {scored} checkpoints are scored here "
            "(face embedders are scored on verification pairs by tools/eval_face.py)"
        )
    return spec.evaluate(record, request)
