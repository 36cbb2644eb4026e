"""The face task's config: :class:`FaceDistillConfig` (the YAML schema of ``configs/face_*.yaml``).

This module owns the sections of a distillation experiment (``model``, ``teacher``, ``data``,
``loss``, ``warm_start``, ``train``), their defaults, :func:`load_distill_config`, and
:func:`check_distill_config`, the checks across sections that the typed loader cannot make
(a real teacher's embedding size; mixed or strongly changed views need the teacher online).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Sequence

from mnapps.config import TaskConfig, TrainConfig, load_config
from mnapps.tasks.face.distill.losses import DistillLossConfig
from mnapps.choices import PRETRAINED_TEACHERS
from mnapps.tasks.face.distill.warm_start import WarmStartConfig
from mnapps.heads.face_embedding import FaceModelConfig

__all__ = ["TeacherConfig", "FaceDataConfig", "FaceDistillConfig", "load_distill_config", "check_distill_config",
           "real_teacher"]


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
            embedded generated faces (:func:`mnapps.tasks.face.data.synthetic_faces.ensure_synthetic_faces`).
        val_root: a folder of held-out crops; when empty a share of ``roots`` is held out.
        val_fraction: that share (of files, or of identities with ``split_by_identity``).
        split_by_identity: hold out whole persons, so no person is on both sides: persons are
            named by identity folders and, with a real teacher, joined by its same-person
            distance (:func:`mnapps.tasks.face.distill.protocol.prepare_pool`); without one, a crop that no
            folder names is its own group.
        image_size: side of the crops fed to teacher and student (the student resizes to its
            own ``model.input_size``).
        augment: augment the training crops.
        augment_strength: ``light`` (safe with cached targets) or ``strong`` (for a teacher
            that embeds each view); see :func:`mnapps.tasks.face.data.faces.build_face_transforms`.
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
            this (:class:`mnapps.tasks.face.data.face_check.FaceCheck`; 0 keeps every crop).
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
class FaceDistillConfig(TaskConfig):
    """Everything ``tools/distill_face.py`` needs (one YAML file in ``configs/face_*.yaml``): the
    common sections and the ``teacher``, the ``loss`` and the embedding ``warm_start``."""

    model: FaceModelConfig = field(default_factory=FaceModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: FaceDataConfig = field(default_factory=FaceDataConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    train: TrainConfig = field(default_factory=_default_face_train)


def load_distill_config(path: str | os.PathLike | None, overrides: Sequence[str] | None = None) -> FaceDistillConfig:
    """:func:`mnapps.config.load_config` for :class:`FaceDistillConfig`."""
    return load_config(path, FaceDistillConfig, overrides)


def real_teacher(cfg: TeacherConfig) -> bool:
    """True for pretrained FaceNet weights (a file or a named set), False for the seeded random teacher."""
    return cfg.weights is not None or cfg.name in PRETRAINED_TEACHERS


def check_distill_config(cfg: FaceDistillConfig) -> None:
    if cfg.model.embedding_dim != 512 and real_teacher(cfg.teacher):
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
