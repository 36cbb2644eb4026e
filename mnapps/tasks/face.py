"""The face task: distil a FaceNet teacher into a MobileNetV1 embedder, load it, and score it.

This module owns everything ``tools/distill_face.py``, ``eval_face.py`` and ``embed_faces.py``
do beyond parsing arguments:

* :class:`FaceDistillConfig` (the YAML schema of ``configs/face_*.yaml``) and
  :func:`distill_face`, which builds the face folders (the embedded generated faces when no
  folder is given) and a held-out split, the frozen teacher, the student (its trunk from
  :func:`mnapps.backbones.prepare_trunk`, weights from ``model.backbone.weights`` or
  ``--weights-backbone``), and trains through :func:`mnapps.engine.loop.fit` (checkpoints,
  ``--resume``, ``--overwrite``, DDP under ``torchrun``). Targets are either the teacher's
  cached embeddings of the *un-augmented* crops (``data.cache_teacher``: cheap, but the student
  then maps a changed view to the clean crop's point) or the teacher's embedding of each view
  it is shown, computed online (exact, and the only choice with mixed views).
* The few-face recipe's pieces, each a config key: strong augmentation and random erasing
  (:func:`mnapps.data.faces.build_face_transforms`), mixup/cutmix of two faces
  (:func:`mnapps.distill.views.mix_faces`), the relational loss
  (:mod:`mnapps.distill.losses`), the ImageNet trunk as the start, crops repeated per epoch.
* Reference points printed before training and kept in ``distill_summary.json``: the untrained
  student's held-out cosine and the best *constant* prediction's, which a student must beat to
  have learnt anything image-dependent. Every evaluation also measures the spread of the
  student's held-out embeddings (:func:`mnapps.eval.face.embedding_spread`) and how well its
  pairwise similarities follow the teacher's (``pair_agreement``, what verification uses), and
  the run warns loudly when the embeddings collapse. Throughput is printed at the end: images/s
  of a training step and the share of it the teacher took.
* :func:`load_face_embedder` (a distilled student), :func:`load_trunk_embedder` (any mnapps
  checkpoint's trunk as pooled features: the no-distillation baseline), and
  :func:`evaluate_face_verification`, the pair evaluation behind ``tools/eval_face.py``
  (alignment on request, one embedding pass per model, metrics, spread, ROC curves).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mnapps.backbones import prepare_trunk
from mnapps.checkpoint import Checkpoint, read_checkpoint
from mnapps.config import BackboneConfig, ConfigError, TrainConfig, from_dict, load_config, to_dict
from mnapps.data.align import FaceAligner, align_folder
from mnapps.data.cache import default_cache_dir
from mnapps.data.faces import FaceFolder, RepeatedFaces, build_face_transforms, face_collate, split_holdout
from mnapps.data.persons import name_from_identity
from mnapps.data.synthetic_faces import ensure_synthetic_faces
from mnapps.distill.losses import DistillationLoss, DistillLossConfig
from mnapps.distill.ood import RandomPhotoCrops
from mnapps.distill.protocol import person_groups_by_name, prepare_pool, write_training_set
from mnapps.distill.teacher import (
    PRETRAINED_TEACHERS,
    FacenetTeacher,
    build_teacher,
    cache_teacher_embeddings,
    recalibrate_batchnorm,
)
from mnapps.distill.views import mix_faces
from mnapps.distill.warm_start import WarmStartConfig, ridge_embedding_init, views_cache_path
from mnapps.engine.distributed import DistInfo, build_train_loader, run_distributed
from mnapps.engine.loop import TaskHooks, to_device
from mnapps.eval.face import (
    DEFAULT_FARS,
    PairList,
    collapse_warning,
    embed_faces,
    embedding_spread,
    is_collapsed,
    pair_distances,
    resolve_pairs,
    roc_curve,
    verification_metrics,
)
from mnapps.files import check_output_path
from mnapps.heads.face_embedding import FaceEmbedder, FaceModelConfig, PooledTrunkEmbedder, build_face_embedder
from mnapps.weights import resolve_weights

from .training import RunRequest, TaskSteps, train_task

__all__ = [
    "TeacherConfig",
    "FaceDataConfig",
    "FaceDistillConfig",
    "FaceDistillData",
    "build_distill_data",
    "prepare_teacher",
    "distill_face",
    "load_distill_config",
    "load_face_embedder",
    "load_trunk_embedder",
    "pair_agreement",
    "align_pair_images",
    "evaluate_face_verification",
    "VerificationResult",
    "benchmark_distill_step",
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

    name: Literal["vggface2", "casia-webface", "random"] = "random"
    weights: str | None = None
    seed: int = 0
    input_size: int = 160
    calibrate_bn: Literal["none", "embedding", "all"] = "embedding"
    calibration_images: int = 256


@dataclass(frozen=True)
class FaceDataConfig:
    """Where the face crops come from and how they become training views.

    Attributes:
        roots: folders of aligned face crops (identity sub-folders optional); empty: the
            embedded generated faces (:func:`mnapps.data.synthetic_faces.ensure_synthetic_faces`).
        val_root: a folder of held-out crops; when empty a share of ``roots`` is held out.
        val_fraction: that share (of files, or of identities with ``split_by_identity``).
        split_by_identity: hold out whole persons, so no person is on both sides: persons are
            named by identity folders and, with a real teacher, joined by its same-person
            distance (:func:`mnapps.distill.protocol.prepare_pool`); without one, a crop that no
            folder names is its own group.
        image_size: side of the crops fed to teacher and student (the student resizes to its
            own ``model.input_size``).
        augment: augment the training crops.
        augment_strength: ``light`` (safe with cached targets) or ``strong`` (for a teacher
            that embeds each view); see :func:`mnapps.data.faces.build_face_transforms`.
        random_erasing: probability of erasing one to three rectangles of a view.
        mix_prob: chance that a view is mixed with another crop of its batch (mixup or cutmix;
            needs ``cache_teacher: false``: the teacher must embed the mixed image).
        mix_alpha: Beta(alpha, alpha) of the mixing weight.
        cutmix_share: share of the mixed views made by cutmix rather than mixup.
        repeats: views of each crop per epoch (few crops: a longer epoch).
        cache_teacher: use cached teacher embeddings of the un-augmented crops as targets.
        cache_dir: where the ``.npy`` caches go (default: the output folder).
        eval_batch_size: batch size for embedding the held-out crops and building caches.
        seed: seed of the held-out split.
        synthetic_identities, synthetic_images_per_identity: size of the generated training
            set used when ``roots`` is empty (its 10 held-out identities are always the same).
        min_face_score: drop crops that MTCNN, looking again at the crop alone, scores below
            this (:class:`mnapps.data.face_check.FaceCheck`; 0 keeps every crop).
        exclude_people: folders of crops whose people must stay out of training (e.g. the
            evaluation's aligned photos): a crop within ``person_threshold`` of any is dropped.
        person_threshold: the teacher's same-person L2 distance.
    """

    roots: list[str] = field(default_factory=list)
    val_root: str | None = None
    val_fraction: float = 0.2
    split_by_identity: bool = False
    image_size: int = 160
    augment: bool = True
    augment_strength: Literal["light", "strong"] = "light"
    random_erasing: float = 0.0
    mix_prob: float = 0.0
    mix_alpha: float = 1.0
    cutmix_share: float = 0.5
    repeats: int = 1
    cache_teacher: bool = True
    cache_dir: str | None = None
    eval_batch_size: int = 64
    seed: int = 0
    synthetic_identities: int = 40
    synthetic_images_per_identity: int = 8
    min_face_score: float = 0.0
    exclude_people: list[str] = field(default_factory=list)
    person_threshold: float = 1.1


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
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    train: TrainConfig = field(default_factory=_default_face_train)


def load_distill_config(path: str | os.PathLike | None, overrides: Sequence[str] | None = None) -> FaceDistillConfig:
    """:func:`mnapps.config.load_config` for :class:`FaceDistillConfig`."""
    return load_config(path, FaceDistillConfig, overrides)


# ------------------------------------------------------------------------------------------
# data and teacher


@dataclass
class FaceDistillData:
    """The three views of the data distillation uses."""

    train: FaceFolder | RepeatedFaces  # augmented (when data.augment) training crops, repeated
    train_plain: FaceFolder  # the same files, un-augmented (teacher cache, BN calibration)
    val: FaceFolder  # held-out crops, un-augmented


def build_distill_data(cfg: FaceDataConfig, pool: tuple[FaceFolder, list[str]] | None = None) -> FaceDistillData:
    """Build the training and held-out face folders described by ``cfg`` (from ``pool``: crops and
    person labels of :func:`mnapps.distill.protocol.prepare_pool`, when given)."""
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


def prepare_teacher(cfg: TeacherConfig, data: FaceDistillData, *, device: str | torch.device = "cpu",
                    batch_size: int = 64) -> FacenetTeacher:
    """Build the teacher of ``cfg``; a random one gets BatchNorm statistics re-estimated (``calibrate_bn``)."""
    teacher = build_teacher(cfg.name if cfg.weights is None else None, weights=resolve_weights(cfg.weights),
                            seed=cfg.seed, input_size=cfg.input_size, device=device)
    if cfg.weights is None and cfg.name == "random" and cfg.calibrate_bn != "none":
        count = min(cfg.calibration_images, len(data.train_plain))
        subset = data.train_plain.subset(range(count))
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=face_collate)
        batches = (images for images, _, _ in tqdm(loader, desc="teacher BN calibration", unit="batch", leave=False)
                   if images.shape[0] > 0)
        recalibrate_batchnorm(teacher, batches, device=device, scope=cfg.calibrate_bn)
    return teacher


def _check_distill_config(cfg: FaceDistillConfig) -> None:
    real_teacher = cfg.teacher.weights is not None or cfg.teacher.name in PRETRAINED_TEACHERS
    if cfg.model.embedding_dim != 512 and real_teacher:
        raise ValueError(f"model.embedding_dim must be the teacher's 512, got {cfg.model.embedding_dim}")
    if cfg.data.mix_prob > 0 and cfg.data.cache_teacher:
        raise ValueError(
            f"data.mix_prob={cfg.data.mix_prob} needs data.cache_teacher=false: a mixed view has no cached "
            f"embedding, the teacher must embed it (or set data.mix_prob=0)"
        )
    if cfg.data.augment and cfg.data.augment_strength == "strong" and cfg.data.cache_teacher:
        raise ValueError(
            "data.augment_strength=strong needs data.cache_teacher=false: a strongly changed view may no longer "
            "match the clean crop's cached embedding (or use augment_strength=light)"
        )


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _teacher_cache(teacher: FacenetTeacher, dataset: FaceFolder, path: Path, batch_size: int,
                   device: torch.device, info: DistInfo) -> np.ndarray:
    """The cached teacher embeddings of ``dataset``: rank 0 computes, the others map the finished file."""
    if info.is_main:
        cache_teacher_embeddings(teacher, dataset, path, keys=dataset.keys, batch_size=batch_size,
                                 device=device, desc=f"teacher {path.name}")
    _barrier()
    return cache_teacher_embeddings(teacher, dataset, path, keys=dataset.keys, batch_size=batch_size, device=device)


# ------------------------------------------------------------------------------------------
# training pieces


def pair_agreement(student: Tensor, teacher: Tensor) -> float:
    """Pearson correlation of the pairwise cosines of two embedding sets (distinct pairs only).

    Verification ranks pairs by distance, so what a student must copy from its teacher is the
    *order* of its pairwise similarities more than each point: 1.0 means the same geometry.
    Rows with NaN in either set are left out; NaN when fewer than three rows remain.
    """
    keep = ~(torch.isnan(student).any(1) | torch.isnan(teacher).any(1))
    s, t = F.normalize(student[keep].double(), dim=1), F.normalize(teacher[keep].double(), dim=1)
    n = s.shape[0]
    if n < 3:
        return math.nan
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    a, b = (s @ s.T)[upper], (t @ t.T)[upper]
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else math.nan


def _row_cosines(a: Tensor, b: Tensor) -> Tensor:
    """Per-row cosine of two [N, D] tensors, rows with NaN (unreadable images) dropped."""
    keep = ~(torch.isnan(a).any(1) | torch.isnan(b).any(1))
    return F.cosine_similarity(a[keep], b[keep], dim=1)


def _make_evaluate(data: FaceDistillData, val_targets: Tensor, batch_size: int, device: torch.device):
    """fit's ``evaluate``: held-out cosine to the teacher, pair agreement and embedding spread."""

    def evaluate(model: nn.Module, epoch: int) -> dict[str, float]:
        embeddings = embed_faces(model, data.val, batch_size=batch_size, device=device, unreadable="nan")
        cosine = _row_cosines(embeddings, val_targets)
        spread = embedding_spread(embeddings)
        return {"cosine": float(cosine.mean()), "cosine_min": float(cosine.min()),
                "pair_agreement": pair_agreement(embeddings, val_targets),
                "spread_cosine": float(spread["mean_pairwise_cosine"]),
                "effective_rank": float(spread["effective_rank"])}

    return evaluate


@dataclass
class _TeacherClock:
    """Seconds the online teacher took during training, and the images it embedded."""

    seconds: float = 0.0
    images: int = 0


def _make_loss_fn(cfg: FaceDistillConfig, teacher: FacenetTeacher, train_targets: np.ndarray | None,
                  criterion: DistillationLoss, clock: _TeacherClock):
    """fit's ``loss_fn``: (mixed) views -> student, targets cached or embedded by the teacher now."""
    data = cfg.data

    def loss_fn(model: nn.Module, batch: Any, device: torch.device) -> dict[str, Tensor]:
        images, indices, _ = batch
        if images.shape[0] < 2:  # all but one unreadable: BatchNorm cannot train on one sample
            return {"loss_l2": sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0}
        images = mix_faces(images, prob=data.mix_prob, alpha=data.mix_alpha, cutmix_share=data.cutmix_share)
        images = to_device(images, device, channels_last=cfg.train.channels_last)
        if train_targets is not None:
            targets = torch.from_numpy(np.asarray(train_targets[indices.numpy()])).to(device)
        else:
            started = time.perf_counter()
            targets = teacher(images)  # the very view the student sees (function matching)
            clock.seconds += time.perf_counter() - started
            clock.images += int(images.shape[0])
        return criterion(model(images).float(), targets.float())

    return loss_fn


def _warm_start(cfg: FaceDistillConfig, data: FaceDistillData, student: FaceEmbedder, teacher: FacenetTeacher,
                device: torch.device) -> dict[str, float]:
    """Solve the student's embedding layer on the clean crops, then augmented views of them (seeded)."""
    batch_size, warm = cfg.data.eval_batch_size, cfg.warm_start
    augment = build_face_transforms(True, cfg.data.image_size, strength=warm.augment_strength)

    def batches():
        plain = torch.utils.data.DataLoader(data.train_plain, batch_size=batch_size, collate_fn=face_collate)
        yield from (images for images, _, _ in plain)
        if warm.extra_images and warm.extra_views > 0:  # out-of-domain crops: the teacher off the faces
            extra = RandomPhotoCrops(warm.extra_images, warm.extra_views, image_size=cfg.data.image_size,
                                     seed=cfg.train.seed)
            yield from (images for images, _, _ in torch.utils.data.DataLoader(extra, batch_size=batch_size,
                                                                              collate_fn=face_collate))
        views = torch.utils.data.DataLoader(data.train_plain.with_transform(augment), batch_size=batch_size,
                                            shuffle=True, collate_fn=face_collate)
        while True:
            for images, _, _ in views:
                yield mix_faces(images, prob=warm.mix_prob, alpha=cfg.data.mix_alpha, cutmix_share=cfg.data.cutmix_share)

    # The views depend on the crops, both networks' weights and these settings only: cached by them.
    settings = {"warm_start": to_dict(warm), "image_size": cfg.data.image_size, "batch_size": batch_size,
                "seed": cfg.train.seed, "mix": [cfg.data.mix_alpha, cfg.data.cutmix_share]}
    cache = views_cache_path(default_cache_dir(), student, teacher, data.train_plain.files, settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return ridge_embedding_init(student, teacher, batches(), max_views=cfg.warm_start.views,
                                    ridge=cfg.warm_start.ridge, device=device, cache=cache, progress=True)


def _reference_points(data: FaceDistillData, teacher: FacenetTeacher, student: nn.Module, val_targets: Tensor,
                      train_targets: np.ndarray | None, evaluate, batch_size: int, device: torch.device,
                      resume: Any) -> dict[str, float]:
    """The untrained student's held-out scores and the best constant prediction's cosine."""
    start = evaluate(student, 0) if not resume else {"cosine": math.nan, "pair_agreement": math.nan}
    if train_targets is not None:
        reference = torch.from_numpy(np.array(train_targets))
    else:
        reference = embed_faces(teacher, data.train_plain, batch_size=batch_size, device=device, unreadable="nan")
    reference = reference[~torch.isnan(reference).any(1)]
    constant = F.normalize(reference.mean(0, keepdim=True), dim=1).expand_as(val_targets)
    return {"start_cosine": start["cosine"], "start_pair_agreement": start["pair_agreement"],
            "constant_baseline_cosine": float(_row_cosines(constant, val_targets).mean()),
            "teacher_val_spread_cosine": float(embedding_spread(val_targets)["mean_pairwise_cosine"])}


def _before_training(cfg: FaceDistillConfig, data: FaceDistillData, teacher: FacenetTeacher, student: FaceEmbedder,
                     val_targets: Tensor, train_targets: np.ndarray | None, evaluate, device: torch.device,
                     resume: Any) -> dict[str, Any]:
    """Rank 0: reference points, the embedding warm start, and the line that says both."""
    points = _reference_points(data, teacher, student, val_targets, train_targets, evaluate,
                               cfg.data.eval_batch_size, device, resume)
    line = (f"distilling {teacher.name} into MobileNetV1-{cfg.model.backbone.width_mult}/{cfg.model.input_size}: "
            f"{len(data.train_plain)} training crops ({len(data.train)} views per epoch) / {len(data.val)} held out; "
            f"held-out cosine before training {points['start_cosine']:.4f}, best constant prediction "
            f"{points['constant_baseline_cosine']:.4f}")
    if cfg.warm_start.views > 0 and not resume:
        # Rank 0 only: DDP hands its parameters and buffers to the other ranks when fit wraps the model.
        started = time.perf_counter()
        warm = _warm_start(cfg, data, student, teacher, device)
        after = evaluate(student, 0)
        points["warm_start"] = {**warm, "time_s": time.perf_counter() - started, "cosine": after["cosine"],
                                "pair_agreement": after["pair_agreement"]}
        line += (f"; after the embedding warm start on {int(warm['views'])} views "
                 f"({points['warm_start']['time_s']:.0f} s{', views read from the cache' if warm['cached'] else ''}): "
                 f"cosine {after['cosine']:.4f}, "
                 f"pair agreement {after['pair_agreement']:.4f}")
    tqdm.write(line)
    return points


def distill_face(
    cfg: FaceDistillConfig,
    *,
    output_dir: str | os.PathLike,
    resume: str | os.PathLike | bool | None = None,
    device: str | torch.device | None = None,
    weights_backbone: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Distil the teacher of ``cfg`` into a MobileNetV1 face embedder.

    Args:
        cfg: the experiment.
        output_dir: receives ``config.yaml``, ``last.pt``/``best.pt`` (task ``"face"``), the
            teacher caches and ``distill_summary.json``.
        resume: True or a checkpoint path to continue an interrupted run (see ``fit``).
        device: ``"cuda"``/``"cuda:N"``/``"cpu"``/None (CUDA when available); under
            ``torchrun`` each process takes its own GPU.
        weights_backbone: an mnapps checkpoint whose MobileNetV1 trunk initialises the student;
            default ``model.backbone.weights``; ignored when resuming.
        overwrite: start over in an ``output_dir`` that already holds checkpoints.

    Returns:
        A summary: ``start_cosine`` (untrained student), ``constant_baseline_cosine``,
        ``final_cosine``, ``best_cosine``, ``final_pair_agreement``, ``final_spread`` and
        ``collapsed`` on the held-out crops, ``throughput`` (images/s of a training step and
        the teacher's share), sizes, and ``fit``'s result under ``"fit"``.

    Raises:
        ValueError: a bad config, no images, or a run folder holding another run's checkpoints
            (:func:`mnapps.engine.loop.check_run_folder`).
    """
    request = RunRequest(output_dir, resume=resume, overwrite=overwrite, weights_backbone=weights_backbone)
    return run_distributed(_distill_face, device, cfg, request)


def _distill_steps(request: RunRequest, state: dict[str, Any]) -> TaskSteps:
    """The face steps of the training skeleton; ``state`` collects what the summary needs."""
    output_dir = Path(request.output_dir)

    def prepare(cfg: FaceDistillConfig, info: DistInfo) -> tuple[FaceDistillConfig, FaceDistillData]:
        _check_distill_config(cfg)
        check_output_path(output_dir, [*cfg.data.roots, *([cfg.data.val_root] if cfg.data.val_root else [])],
                          what="output folder")
        data = build_distill_data(cfg.data, pool=_clean_pool(cfg, info.device, info.is_main))
        state["teacher"] = prepare_teacher(cfg.teacher, data, device=info.device, batch_size=cfg.data.eval_batch_size)
        return cfg, data

    def start(cfg: FaceDistillConfig, student: nn.Module, data: FaceDistillData, info: DistInfo):
        teacher, device, batch_size = state["teacher"], info.device, cfg.data.eval_batch_size
        cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else output_dir
        val_targets = torch.from_numpy(np.array(_teacher_cache(teacher, data.val, cache_dir / "teacher_val.npy",
                                                               batch_size, device, info)))
        train_targets = (_teacher_cache(teacher, data.train_plain, cache_dir / "teacher_train.npy", batch_size, device,
                                        info) if cfg.data.cache_teacher else None)
        evaluate = _make_evaluate(data, val_targets, batch_size, device)
        state["summary"] = {"train_images": len(data.train_plain), "views_per_epoch": len(data.train),
                            "val_images": len(data.val), "teacher": teacher.name}
        if info.is_main:
            write_training_set(output_dir / "train_crops.txt", data.train_plain)
            state["summary"].update(_before_training(cfg, data, teacher, student, val_targets, train_targets, evaluate,
                                                     device, request.resume))
        state["clock"], state["cached"] = _TeacherClock(), train_targets is not None
        loader = build_train_loader(data.train, cfg.train, collate_fn=face_collate, distributed=info)
        loss_fn = _make_loss_fn(cfg, teacher, train_targets, DistillationLoss(cfg.loss), state["clock"])
        return loader, TaskHooks(loss_fn, evaluate, "cosine", batch_size_fn=lambda batch: int(batch[0].shape[0]))

    return TaskSteps(task="face", head="face_embedding", prepare=prepare,
                     build=lambda cfg, weights, data: build_face_embedder(cfg.model, weights_backbone=weights),
                     start=start)


def _distill_face(cfg: FaceDistillConfig, request: RunRequest, *, info: DistInfo) -> dict[str, Any]:
    state: dict[str, Any] = {}
    trained = train_task(cfg, request, info, _distill_steps(request, state))
    result, output_dir, summary = trained.fit, Path(request.output_dir), state["summary"]
    summary.update(_final_summary(result, state["clock"], state["cached"], len(trained.data.val)))
    if info.is_main:
        (output_dir / "distill_summary.json").write_text(json.dumps(summary, indent=2))
        warning = collapse_warning("student", summary["final_spread"]) if summary["collapsed"] else None
        if warning:
            print(warning, file=sys.stderr)
    summary["fit"] = result
    return summary


def _clean_pool(cfg: FaceDistillConfig, device: torch.device, verbose: bool) -> tuple[FaceFolder, list[str]] | None:
    """A real teacher's clean, person-labelled crops (:func:`mnapps.distill.protocol.prepare_pool`), or None."""
    data = cfg.data
    real = cfg.teacher.weights is not None or cfg.teacher.name in PRETRAINED_TEACHERS
    if not real or not data.roots or not (data.min_face_score > 0 or data.exclude_people or data.split_by_identity):
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


def _final_summary(result: dict[str, Any], clock: _TeacherClock, cached: bool, val_images: int) -> dict[str, Any]:
    """Held-out figures of the last evaluation, collapse verdict and step throughput."""
    last = result["last_metrics"]
    spread = {"count": val_images, "mean_pairwise_cosine": last.get("spread_cosine", math.nan),
              "effective_rank": last.get("effective_rank", math.nan)}
    spread["collapsed"] = is_collapsed(spread["mean_pairwise_cosine"], spread["effective_rank"])
    epochs = [h["train"] for h in result["history"][-result["epochs_run"]:]] if result["epochs_run"] else []
    train_seconds = sum(e.get("time_s", 0.0) for e in epochs)
    images = sum(e.get("images_per_s", 0.0) * e.get("time_s", 0.0) for e in epochs)
    throughput = {
        "targets": "cached" if cached else "online teacher",
        "images_per_s": images / train_seconds if train_seconds > 0 else math.nan,
        "teacher_share": 0.0 if cached else (clock.seconds / train_seconds if train_seconds > 0 else math.nan),
        "teacher_images_per_s": clock.images / clock.seconds if clock.seconds > 0 else math.nan,
    }
    return {"final_cosine": last.get("cosine", math.nan), "best_cosine": result["best"],
            "final_pair_agreement": last.get("pair_agreement", math.nan), "final_spread": spread,
            "collapsed": spread["collapsed"], "throughput": throughput, "checkpoint": result["checkpoint"],
            "best_checkpoint": result["best_checkpoint"]}


# ------------------------------------------------------------------------------------------
# loading models


def load_face_embedder(path: str | os.PathLike | Checkpoint, device: str | torch.device = "cpu") -> tuple[FaceEmbedder, Checkpoint]:
    """Rebuild a trained student from its checkpoint (``best.pt``/``last.pt`` of distillation).

    Returns:
        ``(model in eval mode on device, the checkpoint record)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the checkpoint is not a face-embedding checkpoint, or does not fit.
    """
    checkpoint = read_checkpoint(path)
    checkpoint.require_task("face", "pass the best.pt/last.pt written by tools/distill_face.py")
    try:
        model_cfg = from_dict(FaceModelConfig, checkpoint.model_config, "model")
    except ConfigError as exc:
        raise ValueError(f"{checkpoint.origin}: its model config does not fit this version of mnapps: {exc}") from None
    model = build_face_embedder(model_cfg)  # weights come from the checkpoint, not backbone.weights
    try:
        model.load_state_dict(checkpoint.weights)
    except RuntimeError as exc:
        raise ValueError(f"{checkpoint.origin}: weights do not fit the model its config describes: "
                         f"{str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), checkpoint


def _checkpoint_backbone(checkpoint: Checkpoint) -> BackboneConfig:
    """The trunk settings recorded in any mnapps checkpoint (``model.backbone``; legacy flat keys
    are nested by :func:`mnapps.checkpoint.read_checkpoint`)."""
    try:
        return from_dict(BackboneConfig, checkpoint.backbone_config, "model.backbone")
    except ConfigError as exc:
        raise ValueError(f"{checkpoint.origin}: its backbone config does not fit this version of mnapps: {exc}") from None


def load_trunk_embedder(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                        input_size: int = 160) -> PooledTrunkEmbedder:
    """The MobileNetV1 trunk of any mnapps checkpoint as a face embedder (pooled features).

    The baseline a distilled student must beat: e.g. the imported ImageNet classifier
    (``tools/import_weights.py``), which is where the few-face recipe starts. The trunk is built
    from the checkpoint's own ``model.backbone`` settings (so TF padding and ReLU6 of the TF-slim
    import are kept) and loaded strictly.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the checkpoint holds no MobileNetV1 trunk that fits its recorded settings.
    """
    checkpoint = read_checkpoint(path)
    backbone = _checkpoint_backbone(checkpoint)
    plain = BackboneConfig(width_mult=backbone.width_mult, variant=backbone.variant, activation=backbone.activation,
                           bn_eps=backbone.bn_eps, tf_padding=backbone.tf_padding)
    trunk, _ = prepare_trunk(plain, weights=checkpoint.weights)
    return PooledTrunkEmbedder(trunk, input_size=input_size).to(device).eval()


# ------------------------------------------------------------------------------------------
# verification


@dataclass
class VerificationResult:
    """What :func:`evaluate_face_verification` measured (``results``/``spreads`` keyed by model label)."""

    pairs: PairList
    image_dir: Path
    files: list[Path]
    results: dict[str, dict]
    spreads: dict[str, dict]
    curves: dict[str, tuple[np.ndarray, np.ndarray]]
    agreement: float | None = None  # mean student-teacher cosine over the images
    distances: dict[str, np.ndarray] = field(default_factory=dict)  # per model label: L2 per pair
    embeddings: dict[str, Tensor] = field(default_factory=dict)  # per model label: [len(files), D]
    index_pairs: list[tuple[int, int]] = field(default_factory=list)  # each pair as indices into files

    def summary(self) -> dict[str, Any]:
        """A JSON-ready record (``metrics.json``)."""
        record: dict[str, Any] = {"pairs_file": str(self.pairs.path), "images": str(self.image_dir),
                                  "unique_images": len(self.files), "models": self.results, "spread": self.spreads}
        if self.agreement is not None:
            record["student_teacher_cosine"] = self.agreement
        return record


def align_pair_images(pairs: PairList, image_dir: str | os.PathLike, aligned_dir: str | os.PathLike, *,
                      resize_shorter: int | None = None) -> str:
    """MTCNN-align only the photos ``pairs`` uses into ``aligned_dir`` (resumable); returns the report line."""
    used = sorted({p for pair in resolve_pairs(pairs, image_dir) for p in pair})
    report = align_folder(image_dir, aligned_dir, aligner=FaceAligner(resize_shorter=resize_shorter), files=used)
    return str(report)


def evaluate_face_verification(
    pairs: PairList,
    image_dir: str | os.PathLike,
    models: Mapping[str, nn.Module],
    *,
    image_size: int = 160,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    flip_tta: bool = False,
    fars: Sequence[float] = DEFAULT_FARS,
    threshold: float | None = None,
) -> VerificationResult:
    """Score every model on the pairs: one embedding pass each, then every verification figure.

    Args:
        pairs: the pair list (:func:`mnapps.eval.face.read_pairs`).
        image_dir: the (aligned) crops the pairs name.
        models: label -> embedder, e.g. ``{"student": ..., "teacher": ..., "imagenet trunk": ...}``.
            With labels ``student`` and ``teacher`` both present, their mean cosine over the
            images is reported too.
        image_size, batch_size, device, flip_tta: as :func:`mnapps.eval.face.embed_faces`.
        fars, threshold: as :func:`mnapps.eval.face.verification_metrics`.

    Raises:
        ValueError: a pair names no image, or an image cannot be read (named).
    """
    if not models:
        raise ValueError("evaluate_face_verification needs at least one model")
    resolved = resolve_pairs(pairs, image_dir)
    files = sorted({p for pair in resolved for p in pair})
    position = {path: i for i, path in enumerate(files)}
    index_pairs = [(position[a], position[b]) for a, b in resolved]
    results, spreads, curves, embeddings, all_distances = {}, {}, {}, {}, {}
    for label, model in models.items():
        embeddings[label] = embed_faces(model, files, image_size=image_size, batch_size=batch_size, device=device,
                                        flip_tta=flip_tta, desc=f"embedding ({label})")
        distances = all_distances[label] = pair_distances(embeddings[label], index_pairs)
        results[label] = verification_metrics(distances, pairs.issame, n_folds=pairs.n_folds, fars=fars,
                                              threshold=threshold)
        spreads[label] = embedding_spread(embeddings[label])
        far, tar, _ = roc_curve(distances, pairs.issame)
        curves[label] = (far, tar)
    agreement = None
    if "student" in embeddings and "teacher" in embeddings:
        agreement = float((embeddings["student"] * embeddings["teacher"]).sum(1).mean())
    return VerificationResult(pairs, Path(image_dir), files, results, spreads, curves, agreement, all_distances,
                              embeddings, index_pairs)


# ------------------------------------------------------------------------------------------
# throughput


def benchmark_distill_step(
    cfg: FaceDistillConfig,
    *,
    steps: int = 5,
    device: str | torch.device | None = None,
    weights_backbone: str | os.PathLike | None = None,
) -> dict[str, dict[str, float]]:
    """Time distillation steps (forward, loss, backward, optimiser step) with and without the cache.

    One batch of ``cfg.train.batch_size`` training views is drawn once; then ``steps`` steps run
    with targets looked up (the teacher cache: no teacher in the step) and ``steps`` with the
    teacher embedding the batch inside the step, after one untimed warm-up step each. On CUDA
    with ``train.amp`` both the student and the teacher run under autocast (float16).

    Returns:
        ``{"cached": {"images_per_s", "step_s"}, "online": {"images_per_s", "step_s",
        "teacher_s", "teacher_share"}, "batch_size", "device"}``.
    """
    if steps < 1:
        raise ValueError(f"benchmark steps must be >= 1, got {steps}")
    run_device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    data = build_distill_data(cfg.data)
    teacher = prepare_teacher(cfg.teacher, data, device=run_device, batch_size=cfg.data.eval_batch_size)
    student = build_face_embedder(cfg.model, weights_backbone=weights_backbone or cfg.model.backbone.weights)
    student = student.to(run_device).train()
    loader = torch.utils.data.DataLoader(data.train, batch_size=cfg.train.batch_size, shuffle=True,
                                         collate_fn=face_collate)
    images = next(iter(loader))[0].to(run_device)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
    criterion = DistillationLoss(cfg.loss)
    amp = run_device.type == "cuda" and cfg.train.amp
    cached_targets = teacher(images)

    def step(online: bool) -> tuple[float, float]:
        if run_device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(run_device.type, dtype=torch.float16, enabled=amp):
            targets = teacher(images) if online else cached_targets
            if run_device.type == "cuda":
                torch.cuda.synchronize()
            teacher_s = time.perf_counter() - started if online else 0.0
            loss = sum(criterion(student(images).float(), targets.float()).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if run_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, teacher_s

    result: dict[str, Any] = {"batch_size": int(images.shape[0]), "device": str(run_device)}
    for name, online in (("cached", False), ("online", True)):
        step(online)  # warm-up: allocator, oneDNN/cuDNN kernel choice
        timings = [step(online) for _ in range(steps)]
        step_s = sum(t for t, _ in timings) / steps
        teacher_s = sum(t for _, t in timings) / steps
        result[name] = {"images_per_s": images.shape[0] / step_s, "step_s": step_s}
        if online:
            result[name].update(teacher_s=teacher_s, teacher_share=teacher_s / step_s)
    return result
