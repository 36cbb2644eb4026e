""":data:`TASKS`: the one table of mnapps tasks, beside :data:`mnapps.heads.HEADS`.

Each entry (:class:`mnapps.tasks.spec.TaskSpec`) names the task's config class, training entry
point, checkpoint loader, dataset factory and export plan. A checkpoint's ``task`` selects its
entry, so export (and anything else that takes "any checkpoint") dispatches through this table
rather than on model classes. The face task's adapters live here because its module returns the
checkpoint record with the model and keeps its data settings in its own config.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mnapps.checkpoint import Checkpoint
from mnapps.data.image_io import IMAGE_EXTENSIONS, list_images
from mnapps.data.synthetic_faces import ensure_synthetic_faces

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
from .face import FaceDistillConfig, build_distill_data, distill_face, load_face_embedder
from .spec import ExportPlan, TaskSpec

__all__ = ["TASKS", "task_spec", "TaskSpec", "ExportPlan"]


def _load_face(checkpoint: Checkpoint) -> tuple[nn.Module, FaceDistillConfig]:
    model, record = load_face_embedder(checkpoint)
    return model, record.typed_config(FaceDistillConfig)


def _files(folder: str | Path) -> list[Path]:
    found = list_images(folder)
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    return found


def _face_image_files(cfg: FaceDistillConfig, split: str) -> list[Path]:
    """Held-out crops (``"parity"``) or training crops (``"calibration"``); the generated faces when
    the config names no folders."""
    if not cfg.data.roots:
        paths = ensure_synthetic_faces()
        return _files(paths.val if split == "parity" else paths.train)
    if split == "parity" and cfg.data.val_root:
        return _files(cfg.data.val_root)
    return [path for root in cfg.data.roots for path in _files(root)]


def _face_datasets(cfg: FaceDistillConfig) -> tuple[object, object]:
    data = build_distill_data(cfg.data)
    return data.train, data.val


def _face_export_plan(checkpoint: Checkpoint, model: nn.Module, cfg: FaceDistillConfig) -> ExportPlan:
    size = model.input_size
    metadata = {
        "task": "face",
        "input": f"images [N, 3, {size}, {size}] RGB in [0, 1] (aligned face crops)",
        "output": "embeddings [N, D], unit L2 norm",
    }
    return ExportPlan("tensor", metadata, input_size=size, output_names=("embeddings",))


TASKS: dict[str, TaskSpec] = {
    "classification": TaskSpec(
        ClsConfig, train_classifier, lambda c: load_classifier(c)[:2], build_cls_datasets, cls_image_files,
        cls_export_plan,
    ),
    "detection": TaskSpec(
        DetConfig, train_detector, load_detector, build_det_datasets, det_image_files, det_export_plan
    ),
    "face": TaskSpec(
        FaceDistillConfig, distill_face, _load_face, _face_datasets, _face_image_files, _face_export_plan
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
