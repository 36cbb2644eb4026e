"""Face distillation on the shared engine: config schema, datasets, teacher targets, fit().

This module owns the glue of ``tools/distill_face.py``: :class:`FaceDistillConfig` (the YAML
schema of ``configs/face_*.yaml``), and :func:`distill_face`, which

1. builds the face folders (the embedded generated faces when no folder is given) and a
   held-out split (a ``val_root``, whole identities, or a seeded share of the files);
2. builds the frozen teacher (local weights, facenet-pytorch's download, or a seeded random
   InceptionResnetV1 whose embedding BatchNorm statistics (or all of them, ``calibrate_bn``)
   are re-estimated on the training crops so its embeddings are not all the same vector);
3. optionally caches the teacher embeddings of the *un-augmented* training crops in a
   memory-mapped ``.npy`` (the student then sees augmented crops and learns to map them to
   the clean crop's embedding; without the cache the teacher embeds the same augmented batch
   every step, which costs a teacher forward per step but matches the functions exactly);
4. trains the student with the paper's squared-L2 loss (plus optional cosine / relational
   terms) through :func:`mnapps.engine.loop.fit`, which brings checkpoints, ``--resume``,
   progress bars and DDP under ``torchrun``; evaluation is the mean student-teacher cosine
   on the held-out crops, and ``best.pt`` keeps the best one.

Before training it also reports two reference points on the held-out split: the untrained
student's cosine, and the cosine of the best *constant* prediction (the normalised mean
teacher embedding of the training crops), which a student must beat to have learnt anything
image-dependent.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mnapps.config import ConfigError, TrainConfig, apply_overrides, from_dict, read_yaml, save_config, to_dict
from mnapps.data.faces import FaceFolder, build_face_transforms, face_collate, split_holdout
from mnapps.distill.losses import DistillationLoss, DistillLossConfig
from mnapps.distill.teacher import (
    PRETRAINED_TEACHERS,
    FacenetTeacher,
    build_teacher,
    cache_teacher_embeddings,
    recalibrate_batchnorm,
)
from mnapps.engine.distributed import DistInfo, build_train_loader, distributed_run
from mnapps.engine.loop import fit, to_device
from mnapps.heads.face_embedding import FaceEmbedder, FaceModelConfig, build_face_embedder

__all__ = [
    "TeacherConfig",
    "FaceDataConfig",
    "FaceDistillConfig",
    "FaceDistillData",
    "build_distill_data",
    "prepare_teacher",
    "embed_dataset",
    "distill_face",
    "load_distill_config",
]


@dataclass(frozen=True)
class TeacherConfig:
    """Which teacher, and how to obtain it.

    Attributes:
        name: ``vggface2`` | ``casia-webface`` (facenet-pytorch downloads them on a connected
            machine) | ``random`` (seeded random InceptionResnetV1, for tests and the demo).
        weights: a local InceptionResnetV1 state dict; overrides ``name``.
        seed: initialisation seed of the random teacher.
        input_size: side the teacher runs at (160 for FaceNet).
        calibrate_bn: which BatchNorm statistics of the random teacher are re-estimated on up
            to ``calibration_images`` un-augmented training crops (ignored for real weights):
            ``embedding`` (the default: only the output BatchNorm, so the embeddings are
            centred over the data while the network keeps its own, fairly stable function),
            ``all`` (every layer: a chaotic function, far harder to learn than a trained
            FaceNet's) or ``none`` (default statistics: every image gets nearly the same
            embedding, so a constant prediction already scores a cosine of ~1).
    """

    name: str = "random"
    weights: str | None = None
    seed: int = 0
    input_size: int = 160
    calibrate_bn: Literal["none", "embedding", "all"] = "embedding"
    calibration_images: int = 256


@dataclass(frozen=True)
class FaceDataConfig:
    """Where the face crops come from and how they are used.

    Attributes:
        roots: folders of aligned face crops (identity sub-folders optional); empty: the
            embedded generated faces (:func:`mnapps.data.synthetic_faces.ensure_synthetic_faces`).
        val_root: a folder of held-out crops; when empty a share of ``roots`` is held out.
        val_fraction: that share (of files, or of identities with ``split_by_identity``).
        split_by_identity: hold out whole identity folders, so no person is on both sides.
        image_size: side of the crops fed to teacher and student (the student resizes to its
            own ``model.input_size``).
        augment: augment the training crops (flip, affine and colour jitter).
        cache_teacher: use cached teacher embeddings of the un-augmented crops as targets.
        cache_dir: where the ``.npy`` caches go (default: the output folder).
        eval_batch_size: batch size for embedding the held-out crops and building caches.
        seed: seed of the held-out split.
        synthetic_identities, synthetic_images_per_identity: size of the generated training
            set used when ``roots`` is empty (its 10 held-out identities are always the same).
    """

    roots: list[str] = field(default_factory=list)
    val_root: str | None = None
    val_fraction: float = 0.2
    split_by_identity: bool = False
    image_size: int = 160
    augment: bool = True
    cache_teacher: bool = True
    cache_dir: str | None = None
    eval_batch_size: int = 64
    seed: int = 0
    synthetic_identities: int = 40
    synthetic_images_per_identity: int = 8


def _default_face_train() -> TrainConfig:
    return TrainConfig(epochs=30, batch_size=32, optimizer="adamw", lr=2e-3, weight_decay=1e-4,
                       warmup_epochs=1.0, num_workers=0, channels_last=False, log_every=5)


@dataclass(frozen=True)
class FaceDistillConfig:
    """Everything ``tools/distill_face.py`` needs (one YAML file in ``configs/face_*.yaml``)."""

    model: FaceModelConfig = field(default_factory=FaceModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: FaceDataConfig = field(default_factory=FaceDataConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    train: TrainConfig = field(default_factory=_default_face_train)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def load_distill_config(path: str | os.PathLike | None, overrides: Sequence[str] | None = None) -> FaceDistillConfig:
    """Load a ``configs/face_*.yaml`` file (or only defaults) with ``section.key=value`` overrides.

    Unlike a plain :func:`mnapps.config.load_config`, a partial section keeps the *face*
    defaults of the keys it does not mention (e.g. ``train.epochs=5`` keeps the face recipe's
    optimiser and learning rate instead of falling back to the generic ``TrainConfig``).

    Raises:
        mnapps.config.ConfigError: unknown keys or badly typed values (valid keys listed).
    """
    data = _merge(to_dict(FaceDistillConfig()), read_yaml(path) if path is not None else {})
    data = apply_overrides(data, overrides)
    try:
        return from_dict(FaceDistillConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path if path is not None else 'defaults'}: {exc}") from None


@dataclass
class FaceDistillData:
    """The three views of the data distillation uses."""

    train: FaceFolder  # augmented (when data.augment) training crops
    train_plain: FaceFolder  # the same files, un-augmented (teacher cache, BN calibration)
    val: FaceFolder  # held-out crops, un-augmented


def build_distill_data(cfg: FaceDataConfig) -> FaceDistillData:
    """Build the training and held-out face folders described by ``cfg``."""
    plain = build_face_transforms(False, cfg.image_size)
    augment = build_face_transforms(True, cfg.image_size) if cfg.augment else plain
    if not cfg.roots:
        from mnapps.data.synthetic_faces import ensure_synthetic_faces

        paths = ensure_synthetic_faces(train_identities=cfg.synthetic_identities,
                                       images_per_identity=cfg.synthetic_images_per_identity)
        roots: list[str | Path] = [paths.train]
        val_root: str | Path | None = cfg.val_root or paths.val
    else:
        roots, val_root = list(cfg.roots), cfg.val_root
    everything = FaceFolder(roots, transform=plain)
    if val_root:
        train_plain = everything
        val = FaceFolder(val_root, transform=plain)
    else:
        groups = everything.identities if cfg.split_by_identity else None
        train_idx, val_idx = split_holdout(len(everything), cfg.val_fraction, seed=cfg.seed, groups=groups)
        train_plain, val = everything.subset(train_idx), everything.subset(val_idx)
    return FaceDistillData(train=train_plain.with_transform(augment), train_plain=train_plain, val=val)


@torch.no_grad()
def embed_dataset(
    model: nn.Module, dataset: FaceFolder, *, batch_size: int = 64, device: str | torch.device = "cpu",
    desc: str | None = None,
) -> Tensor:
    """Embed every item of ``dataset`` with ``model`` (eval mode restored afterwards as it was).

    Returns:
        ``FloatTensor[len(dataset), D]`` on the CPU; rows of unreadable images are NaN.
    """
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=face_collate)
    out: Tensor | None = None
    try:
        for images, indices, _ in tqdm(loader, desc=desc, unit="batch", leave=False, disable=desc is None):
            if images.shape[0] == 0:
                continue
            embeddings = model(images.to(device)).float().cpu()
            if out is None:
                out = torch.full((len(dataset), embeddings.shape[1]), float("nan"))
            out[indices] = embeddings
    finally:
        model.train(was_training)
    if out is None:
        raise ValueError(f"no readable image among the {len(dataset)} files to embed")
    return out


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
        recalibrate_batchnorm(teacher, batches, device=device, scope=cfg.calibrate_bn)
    return teacher


def _mean_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Per-row cosine of two [N, D] tensors, rows with NaN (unreadable images) dropped."""
    keep = ~(torch.isnan(a).any(1) | torch.isnan(b).any(1))
    return F.cosine_similarity(a[keep], b[keep], dim=1)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def distill_face(
    cfg: FaceDistillConfig,
    *,
    output_dir: str | os.PathLike,
    resume: str | os.PathLike | bool | None = None,
    device: str | torch.device | None = None,
    weights_backbone: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Distil the teacher of ``cfg`` into a MobileNetV1 face embedder.

    Args:
        cfg: the experiment.
        output_dir: receives ``config.yaml``, ``last.pt``/``best.pt`` (task ``"face"``), the
            teacher caches and ``distill_summary.json``.
        resume: True or a checkpoint path to continue an interrupted run (see ``fit``).
        device: ``"cuda"``/``"cpu"``/None (CUDA when available); under ``torchrun`` each
            process takes its own GPU.
        weights_backbone: an mnapps checkpoint whose MobileNetV1 trunk initialises the student.

    Returns:
        A summary: ``start_cosine`` (untrained student), ``constant_baseline_cosine``,
        ``final_cosine``, ``best_cosine`` on the held-out crops, sizes, and ``fit``'s result
        under ``"fit"``.
    """
    with distributed_run(device) as info:
        return _distill_face(cfg, output_dir, resume, weights_backbone, info)


def _distill_face(
    cfg: FaceDistillConfig,
    output_dir: str | os.PathLike,
    resume: str | os.PathLike | bool | None,
    weights_backbone: str | os.PathLike | None,
    info: DistInfo,
) -> dict[str, Any]:
    run_device = info.device
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.model.embedding_dim != 512 and (cfg.teacher.weights or cfg.teacher.name in PRETRAINED_TEACHERS):
        raise ValueError(f"model.embedding_dim must be the teacher's 512, got {cfg.model.embedding_dim}")
    if info.is_main:
        save_config(cfg, output_dir / "config.yaml")

    data = build_distill_data(cfg.data)
    teacher = prepare_teacher(cfg.teacher, data, device=run_device, batch_size=cfg.data.eval_batch_size)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else output_dir

    def cached(dataset: FaceFolder, name: str) -> np.ndarray:
        # Rank 0 computes, the others wait and then map the finished file.
        if info.is_main:
            cache_teacher_embeddings(teacher, dataset, cache_dir / name, keys=dataset.keys,
                                     batch_size=cfg.data.eval_batch_size, device=run_device, desc=f"teacher {name}")
        _barrier()
        return cache_teacher_embeddings(teacher, dataset, cache_dir / name, keys=dataset.keys,
                                        batch_size=cfg.data.eval_batch_size, device=run_device)

    val_targets = torch.from_numpy(np.array(cached(data.val, "teacher_val.npy")))
    train_targets = cached(data.train_plain, "teacher_train.npy") if cfg.data.cache_teacher else None

    student = build_face_embedder(cfg.model, weights_backbone=weights_backbone).to(run_device)
    criterion = DistillationLoss(cfg.loss)

    def evaluate(model: nn.Module, epoch: int) -> dict[str, float]:
        embeddings = embed_dataset(model, data.val, batch_size=cfg.data.eval_batch_size, device=run_device)
        cosine = _mean_cosine(embeddings, val_targets)
        return {"cosine": float(cosine.mean()), "cosine_min": float(cosine.min()),
                "l2": float((2.0 - 2.0 * cosine).mean())}

    summary: dict[str, Any] = {"train_images": len(data.train), "val_images": len(data.val), "teacher": teacher.name}
    if info.is_main:
        start = evaluate(student, 0) if not resume else {"cosine": math.nan}
        if train_targets is not None:
            reference = torch.from_numpy(np.array(train_targets))
        else:
            reference = embed_dataset(teacher, data.train_plain, batch_size=cfg.data.eval_batch_size, device=run_device)
        reference = reference[~torch.isnan(reference).any(1)]
        constant = F.normalize(reference.mean(0, keepdim=True), dim=1).expand_as(val_targets)
        summary["start_cosine"] = start["cosine"]
        summary["constant_baseline_cosine"] = float(_mean_cosine(constant, val_targets).mean())
        tqdm.write(
            f"distilling {teacher.name} into MobileNetV1-{cfg.model.backbone.width_mult}/{cfg.model.input_size}: "
            f"{len(data.train)} training / {len(data.val)} held-out crops; held-out cosine before training "
            f"{summary['start_cosine']:.4f}, best constant prediction {summary['constant_baseline_cosine']:.4f}"
        )

    def loss_fn(model: nn.Module, batch: Any, device: torch.device) -> dict[str, Tensor]:
        images, indices, _ = batch
        if images.shape[0] < 2:  # all but one unreadable: BatchNorm cannot train on one sample
            return {"loss_l2": sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0}
        images = to_device(images, device, channels_last=cfg.train.channels_last)
        student_embeddings = model(images)
        if train_targets is not None:
            targets = torch.from_numpy(np.asarray(train_targets[indices.numpy()])).to(device)
        else:
            targets = teacher(images)
        return criterion(student_embeddings.float(), targets.float())

    loader = build_train_loader(data.train, cfg.train, collate_fn=face_collate, distributed=info)
    result = fit(
        student, loader, cfg.train,
        loss_fn=loss_fn, output_dir=output_dir, evaluate=evaluate, best_metric="cosine",
        checkpoint_meta={"task": "face", "head": "face_embedding", "config": to_dict(cfg)},
        resume=resume, device=run_device, batch_size_fn=lambda batch: int(batch[0].shape[0]),
    )
    final = result["last_metrics"].get("cosine", math.nan)
    summary.update({"final_cosine": final, "best_cosine": result["best"], "checkpoint": result["checkpoint"],
                    "best_checkpoint": result["best_checkpoint"]})
    if info.is_main:
        (output_dir / "distill_summary.json").write_text(json.dumps(summary, indent=2))
    summary["fit"] = result
    return summary
