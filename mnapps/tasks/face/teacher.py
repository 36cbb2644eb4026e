"""The face task's teacher: building it for a run, and its cached embeddings of the crops.

This module owns :func:`prepare_teacher` (the FaceNet teacher a config names; a random one gets
its BatchNorm statistics re-estimated on training crops) and :func:`teacher_cache` (the
teacher's embeddings of a face folder, computed once by rank 0 and mapped by the others).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from mnapps.tasks.face.data.faces import FaceFolder, face_collate
from mnapps.tasks.face.distill.teacher import (
    FacenetTeacher,
    build_teacher,
    cache_teacher_embeddings,
    reestimate_batchnorm_statistics,
)
from mnapps.engine.distributed import DistInfo

from .config import TeacherConfig
from .data.datasets import FaceDistillData

__all__ = ["prepare_teacher", "teacher_cache"]


def prepare_teacher(cfg: TeacherConfig, data: FaceDistillData, *, device: str | torch.device = "cpu",
                    batch_size: int = 64) -> FacenetTeacher:
    """Build the teacher of ``cfg``; a random one gets BatchNorm statistics re-estimated (``calibrate_bn``)."""
    teacher = build_teacher(cfg.name if cfg.weights is None else None, weights=cfg.weights, seed=cfg.seed,
                            input_size=cfg.input_size, device=device)
    if cfg.weights is None and cfg.name == "random" and cfg.calibrate_bn != "none":
        count = min(cfg.calibration_images, len(data.train_plain))
        subset = data.train_plain.subset(range(count))
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=face_collate)
        batches = (images for images, _, _ in tqdm(loader, desc="teacher BN calibration", unit="batch", leave=False)
                   if images.shape[0] > 0)
        reestimate_batchnorm_statistics(teacher, batches, device=device, scope=cfg.calibrate_bn)
    return teacher


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teacher_cache(teacher: FacenetTeacher, dataset: FaceFolder, path: Path, batch_size: int,
                   device: torch.device, info: DistInfo) -> np.ndarray:
    """The cached teacher embeddings of ``dataset``: rank 0 computes, the others map the finished file."""
    if info.is_main:
        cache_teacher_embeddings(teacher, dataset, path, keys=dataset.keys, batch_size=batch_size,
                                 device=device, desc=f"teacher {path.name}")
    _barrier()
    return cache_teacher_embeddings(teacher, dataset, path, keys=dataset.keys, batch_size=batch_size, device=device)
