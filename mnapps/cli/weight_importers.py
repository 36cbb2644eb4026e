"""The importer of each kind of :data:`mnapps.weights.WEIGHTS` entry: official file -> mnapps checkpoint.

Kept apart from ``mnapps/cli/weights.py`` because these pull in torch and the tasks, which
``mnapps weights list`` and ``--help`` never need.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mnapps.tasks.face.distill.teacher import build_teacher, load_teacher_state_dict
from mnapps.tasks.classification import import_tf_slim_checkpoint
from mnapps.tasks.detection import import_tf_od_api_ssd_checkpoint


def import_classifier(source: Path, output: Path) -> str:
    path, info = import_tf_slim_checkpoint(source, output)
    return f"imported {info.mapped} TF-slim tensors: MobileNetV1 width {info.width_mult:g}, {info.num_classes} classes"


def import_ssd(source: Path, output: Path) -> str:
    path, info = import_tf_od_api_ssd_checkpoint(source, output)
    return (f"imported SSD-MobileNetV1: input {info.ssd.size}, classes {', '.join(info.class_names)}, "
            f"{info.layout} layout")  # fmt: skip


def import_face_teacher(source: Path, output: Path) -> str:
    state = load_teacher_state_dict(source)  # drops facenet-pytorch's classifier (logits.*)
    torch.save(state, output)
    build_teacher(weights=output)  # refuses a file that does not fit InceptionResnetV1 exactly
    return f"imported InceptionResnetV1 features ({len(state)} tensors; classifier dropped if present)"


IMPORTERS = {"classifier": import_classifier, "ssd": import_ssd, "face_teacher": import_face_teacher}
