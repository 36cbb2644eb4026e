""":data:`TASKS`: the one table of mnapps tasks, beside :data:`mnapps.heads.HEADS`.

Each entry (:class:`mnapps.tasks.spec.TaskSpec`) names the task's config class, training entry
point, checkpoint loader, dataset factory and export plan. A checkpoint's ``task`` selects its
entry, so export (and anything else that takes "any checkpoint") dispatches through this table
rather than on model classes.
"""

from __future__ import annotations

from mnapps.checkpoint import Checkpoint

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
    load_detector,
    train_detector,
)
from .face import FaceDistillConfig, distill_face, face_datasets, face_export_plan, face_image_files, load_face_task
from .spec import ExportPlan, TaskSpec

__all__ = ["TASKS", "task_spec", "TaskSpec", "ExportPlan"]


TASKS: dict[str, TaskSpec] = {
    "classification": TaskSpec(
        ClsConfig, train_classifier, lambda c: load_classifier(c)[:2], build_cls_datasets, cls_image_files,
        cls_export_plan,
    ),
    "detection": TaskSpec(
        DetConfig, train_detector, load_detector, build_det_datasets, det_image_files, det_export_plan
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
