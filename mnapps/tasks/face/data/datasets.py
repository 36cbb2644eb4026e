"""The face task's data: the training and held-out crops, and the clean person-labelled pool.

This module owns :func:`build_distill_data` (the face folders a config names, or the embedded
generated faces when it names none, and the held-out split: a folder of its own, or a share of
the crops, by person on request), :func:`clean_pool` (a real teacher's clean, person-labelled
crops, :func:`mnapps.tasks.face.distill.protocol.prepare_pool`) and :func:`face_image_files`, the crops
export's parity and calibration read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mnapps.tasks.face.data.faces import FaceFolder, RepeatedFaces, build_face_transforms, split_holdout
from mnapps.data.image_io import IMAGE_EXTENSIONS, list_images
from mnapps.tasks.face.data.persons import name_from_identity
from mnapps.tasks.face.data.synthetic_faces import ensure_synthetic_faces
from mnapps.tasks.face.distill.protocol import person_groups_by_name, prepare_pool
from mnapps.tasks.face.distill.teacher import build_teacher

from ..config import FaceDataConfig, FaceDistillConfig, real_teacher

__all__ = ["FaceDistillData", "build_distill_data", "clean_pool", "face_datasets", "face_image_files"]


@dataclass
class FaceDistillData:
    """The three views of the data distillation uses."""

    train: FaceFolder | RepeatedFaces  # augmented (when data.augment) training crops, repeated
    train_plain: FaceFolder  # the same files, un-augmented (teacher cache, BN calibration)
    val: FaceFolder  # held-out crops, un-augmented


def build_distill_data(cfg: FaceDataConfig, pool: tuple[FaceFolder, list[str]] | None = None) -> FaceDistillData:
    """Build the training and held-out face folders described by ``cfg`` (from ``pool``: crops and
    person labels of :func:`mnapps.tasks.face.distill.protocol.prepare_pool`, when given)."""
    plain = build_face_transforms(False, cfg.image_size)
    augment = (build_face_transforms(True, cfg.image_size, strength=cfg.augment_strength, erasing=cfg.random_erasing)
               if cfg.augment else plain)
    if not cfg.roots:
        paths = ensure_synthetic_faces(train_identities=cfg.synthetic_identities,
                                       images_per_identity=cfg.synthetic_images_per_identity)
        roots: list[str | Path] = [paths.train]
        val_root: str | Path | None = cfg.val_root or paths.val
    else:
        roots, val_root = list(cfg.roots), cfg.val_root
    everything = pool[0].with_transform(plain) if pool else FaceFolder(roots, transform=plain)
    if val_root:
        train_plain = everything
        val = FaceFolder(val_root, transform=plain)
    else:
        groups = (pool[1] if pool else person_groups_by_name(everything)) if cfg.split_by_identity else None
        train_idx, val_idx = split_holdout(len(everything), cfg.val_fraction, seed=cfg.seed, groups=groups)
        train_plain, val = everything.subset(train_idx), everything.subset(val_idx)
    train = train_plain.with_transform(augment)
    return FaceDistillData(train=RepeatedFaces(train, cfg.repeats) if cfg.repeats > 1 else train,
                           train_plain=train_plain, val=val)


def clean_pool(cfg: FaceDistillConfig, device: torch.device, verbose: bool) -> tuple[FaceFolder, list[str]] | None:
    """A real teacher's clean, person-labelled crops (:func:`mnapps.tasks.face.distill.protocol.prepare_pool`), or None."""
    data = cfg.data
    if not real_teacher(cfg.teacher) or not data.roots or not (data.min_face_score > 0 or data.exclude_people or data.split_by_identity):
        return None
    folder = FaceFolder(data.roots, image_size=data.image_size)
    if not (data.min_face_score > 0 or data.exclude_people) and all(map(name_from_identity, folder.identities)):
        return None  # identity folders name every crop (VGGFace2, LFW): the split needs no teacher
    teacher = build_teacher(cfg.teacher.name if cfg.teacher.weights is None else None, weights=cfg.teacher.weights,
                            input_size=cfg.teacher.input_size, device=device)
    pool, labels, report = prepare_pool(folder, teacher,
                                        min_face_score=data.min_face_score, exclude=data.exclude_people,
                                        threshold=data.person_threshold, batch_size=data.eval_batch_size, device=device)
    if verbose:
        tqdm.write(f"training pool: {report}")
    return pool, labels


def face_datasets(cfg: FaceDistillConfig) -> tuple[object, object]:
    """The training views and the held-out crops of ``cfg.data`` (no clean pool: no teacher is run)."""
    data = build_distill_data(cfg.data)
    return data.train, data.val


def _files(folder: str | Path) -> list[Path]:
    found = list_images(folder)
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    return found


def face_image_files(cfg: FaceDistillConfig, split: str) -> list[Path]:
    """Held-out crops (``"parity"``) or training crops (``"calibration"``); the generated faces when
    the config names no folders."""
    if not cfg.data.roots:
        paths = ensure_synthetic_faces()
        return _files(paths.val if split == "parity" else paths.train)
    if split == "parity" and cfg.data.val_root:
        return _files(cfg.data.val_root)
    return [path for root in cfg.data.roots for path in _files(root)]
