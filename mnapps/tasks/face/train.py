"""Distilling the face teacher into a MobileNetV1 embedder: :class:`FaceTask` and :func:`distill_face`.

This module owns the face implementation of :class:`mnapps.tasks.task.Task` (its per-run state
is one :class:`FaceRun`, its result one :class:`FaceResult`): the data and the frozen teacher, the student (its
trunk from :func:`mnapps.backbones.prepare_trunk`), the targets (the teacher's cached embeddings
of the *un-augmented* crops, ``data.cache_teacher``: cheap, but the student then maps a changed
view to the clean crop's point; or the teacher's embedding of each view it is shown, computed
online: exact, and the only choice with mixed views), the loss with mixup/cutmix of two faces
(:func:`mnapps.tasks.face.distill.views.mix_faces`) and the relational terms of
:mod:`mnapps.tasks.face.distill.losses`, and the embedding warm start.

Reference points are printed before training and kept in ``distill_summary.json``: the
untrained student's held-out cosine and the best *constant* prediction's, which a student must
beat to have learnt anything image-dependent. Every evaluation also measures the spread of the
student's held-out embeddings (:func:`mnapps.tasks.face.evaluation.embedding_spread`) and how well its
pairwise similarities follow the teacher's (:func:`pair_agreement`, what verification uses), and
the run warns loudly when the embeddings collapse. Throughput is printed at the end: images/s of
a training step and the share of it the teacher took.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mnapps.checkpoint import Checkpoint
from mnapps.config import to_dict
from mnapps.data.cache import default_cache_dir
from mnapps.tasks.face.data.faces import build_face_transforms, face_collate
from mnapps.tasks.face.distill.losses import DistillationLoss
from mnapps.tasks.face.distill.ood import RandomPhotoCrops
from mnapps.tasks.face.distill.protocol import write_training_set
from mnapps.tasks.face.distill.teacher import FacenetTeacher
from mnapps.tasks.face.distill.views import mix_faces
from mnapps.tasks.face.distill.warm_start import ridge_embedding_init, views_cache_path
from mnapps.engine.distributed import DistInfo, build_train_loader
from mnapps.engine.loop import to_device
from mnapps.engine.result import FitResult
from mnapps.tasks.face.evaluation import collapse_warning, embed_faces, embedding_spread, is_collapsed
from mnapps.files import check_output_path
from mnapps.heads.face_embedding import FaceEmbedder, build_face_embedder

from ..spec import ExportPlan
from ..task import RunRequest, Task, TaskRun, WeightsPath
from .config import FaceDistillConfig, check_distill_config
from .data.datasets import FaceDistillData, build_distill_data, clean_pool, face_datasets, face_image_files
from .model import face_export_plan, load_face_task
from .teacher import prepare_teacher, teacher_cache

__all__ = ["FaceTask", "FaceRun", "FaceResult", "ReferencePoints", "WarmStartReport", "FinalSpread", "Throughput",
           "distill_face", "pair_agreement"]


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


@dataclass
class TeacherClock:
    """Seconds the online teacher took during training, and the images it embedded."""

    seconds: float = 0.0
    images: int = 0


@dataclass(frozen=True)
class WarmStartReport:
    """The embedding warm start (:func:`ridge_embedding_init`'s figures, then the held-out scores after it)."""

    views: float
    ridge: float
    fit_cosine: float
    cached: float  # 1.0: the views came from the cache
    time_s: float
    cosine: float
    pair_agreement: float


@dataclass(frozen=True)
class ReferencePoints:
    """What the student must beat, measured on rank 0 before training.

    Attributes:
        start_cosine, start_pair_agreement: the untrained student's held-out scores (NaN when
            resuming).
        constant_baseline_cosine: the best *constant* prediction's held-out cosine.
        teacher_val_spread_cosine: the mean pairwise cosine of the teacher's held-out embeddings.
        warm_start: the embedding warm start, when one ran.
    """

    start_cosine: float
    start_pair_agreement: float
    constant_baseline_cosine: float
    teacher_val_spread_cosine: float
    warm_start: WarmStartReport | None = None


@dataclass
class FaceRun(TaskRun[FaceDistillConfig]):
    """The state of one distillation run (see :class:`mnapps.tasks.task.TaskRun`).

    Attributes:
        data: the training and held-out crops.
        teacher: the frozen teacher.
        val_targets: the teacher's held-out embeddings (set when training starts).
        train_targets: its cached embeddings of the clean training crops (None: computed online).
        criterion: the distillation loss (set when training starts).
        clock: the online teacher's time.
        reference: the reference points (rank 0; set when training starts).
    """

    data: FaceDistillData
    teacher: FacenetTeacher
    val_targets: Tensor | None = None
    train_targets: np.ndarray | None = None
    criterion: DistillationLoss | None = None
    clock: TeacherClock = field(default_factory=TeacherClock)
    reference: ReferencePoints | None = None


@dataclass(frozen=True)
class FinalSpread:
    """The spread of the final student's held-out embeddings (:func:`embedding_spread`'s figures)."""

    count: int
    mean_pairwise_cosine: float
    effective_rank: float
    collapsed: bool


@dataclass(frozen=True)
class Throughput:
    """Images/s of a training step, and the online teacher's share of it."""

    targets: str  # "cached" or "online teacher"
    images_per_s: float
    teacher_share: float
    teacher_images_per_s: float


@dataclass(frozen=True)
class FaceResult:
    """What :func:`distill_face` returns (and ``distill_summary.json`` holds, :meth:`to_json`).

    Attributes:
        train_images, views_per_epoch, val_images: the data's sizes.
        teacher: the teacher's name.
        reference: the reference points (None on ranks other than 0).
        final_cosine, best_cosine, final_pair_agreement: held-out scores of the last and best
            evaluation.
        final_spread: the final embeddings' spread; ``collapsed`` says they collapsed.
        throughput: images/s of a training step and the teacher's share.
        fit: what the engine reports (history, checkpoints).
    """

    train_images: int
    views_per_epoch: int
    val_images: int
    teacher: str
    reference: ReferencePoints | None
    final_cosine: float
    best_cosine: float | None
    final_pair_agreement: float
    final_spread: FinalSpread
    throughput: Throughput
    fit: FitResult

    @property
    def collapsed(self) -> bool:
        return self.final_spread.collapsed

    def to_json(self) -> dict[str, Any]:
        """The layout of ``distill_summary.json``: sizes, teacher, reference points, final figures."""
        reference = asdict(self.reference) if self.reference is not None else {}
        if reference.get("warm_start") is None:
            reference.pop("warm_start", None)
        best = self.fit.best_checkpoint
        return {"train_images": self.train_images, "views_per_epoch": self.views_per_epoch,
                "val_images": self.val_images, "teacher": self.teacher, **reference,
                "final_cosine": self.final_cosine, "best_cosine": self.best_cosine,
                "final_pair_agreement": self.final_pair_agreement, "final_spread": asdict(self.final_spread),
                "collapsed": self.collapsed, "throughput": asdict(self.throughput),
                "checkpoint": str(self.fit.checkpoint), "best_checkpoint": None if best is None else str(best)}


def held_out_scores(model: nn.Module, run: FaceRun) -> dict[str, float]:
    """Held-out cosine to the teacher, pair agreement and embedding spread of ``model``."""
    embeddings = embed_faces(model, run.data.val, batch_size=run.cfg.data.eval_batch_size, device=run.device,
                             unreadable="nan")
    cosine = _row_cosines(embeddings, run.val_targets)
    spread = embedding_spread(embeddings)
    return {"cosine": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "pair_agreement": pair_agreement(embeddings, run.val_targets),
            "spread_cosine": float(spread["mean_pairwise_cosine"]),
            "effective_rank": float(spread["effective_rank"])}


def _distillation_losses(run: FaceRun, model: nn.Module, batch: Any, device: torch.device) -> dict[str, Tensor]:
    """(Mixed) views -> student, the targets cached or embedded by the teacher now."""
    data = run.cfg.data
    images, indices, _ = batch
    if images.shape[0] < 2:  # all but one unreadable: BatchNorm cannot train on one sample
        return {"loss_l2": sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0}
    images = mix_faces(images, prob=data.mix_prob, alpha=data.mix_alpha, cutmix_share=data.cutmix_share)
    images = to_device(images, device, channels_last=run.cfg.train.channels_last)
    if run.train_targets is not None:
        targets = torch.from_numpy(np.asarray(run.train_targets[indices.numpy()])).to(device)
    else:
        started = time.perf_counter()
        targets = run.teacher(images)  # the very view the student sees (function matching)
        run.clock.seconds += time.perf_counter() - started
        run.clock.images += int(images.shape[0])
    return run.criterion(model(images).float(), targets.float())


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


def _reference_points(run: FaceRun, student: nn.Module) -> ReferencePoints:
    """The untrained student's held-out scores and the best constant prediction's cosine."""
    nan = {"cosine": math.nan, "pair_agreement": math.nan}
    start = held_out_scores(student, run) if not run.request.resume else nan
    if run.train_targets is not None:
        reference = torch.from_numpy(np.array(run.train_targets))
    else:
        reference = embed_faces(run.teacher, run.data.train_plain, batch_size=run.cfg.data.eval_batch_size,
                                device=run.device, unreadable="nan")
    reference = reference[~torch.isnan(reference).any(1)]
    constant = F.normalize(reference.mean(0, keepdim=True), dim=1).expand_as(run.val_targets)
    return ReferencePoints(
        start_cosine=start["cosine"], start_pair_agreement=start["pair_agreement"],
        constant_baseline_cosine=float(_row_cosines(constant, run.val_targets).mean()),
        teacher_val_spread_cosine=float(embedding_spread(run.val_targets)["mean_pairwise_cosine"]),
    )


def _before_training(run: FaceRun, student: FaceEmbedder) -> ReferencePoints:
    """Rank 0: reference points, the embedding warm start, and the line that says both."""
    cfg, data = run.cfg, run.data
    points = _reference_points(run, student)
    line = (f"distilling {run.teacher.name} into MobileNetV1-{cfg.model.backbone.width_mult}/{cfg.model.input_size}: "
            f"{len(data.train_plain)} training crops ({len(data.train)} views per epoch) / {len(data.val)} held out; "
            f"held-out cosine before training {points.start_cosine:.4f}, best constant prediction "
            f"{points.constant_baseline_cosine:.4f}")
    if cfg.warm_start.views > 0 and not run.request.resume:
        # Rank 0 only: DDP hands its parameters and buffers to the other ranks when fit wraps the model.
        started = time.perf_counter()
        warm = _warm_start(cfg, data, student, run.teacher, run.device)
        after = held_out_scores(student, run)
        report = WarmStartReport(**warm, time_s=time.perf_counter() - started, cosine=after["cosine"],
                                 pair_agreement=after["pair_agreement"])
        points = dataclasses.replace(points, warm_start=report)
        line += (f"; after the embedding warm start on {int(report.views)} views "
                 f"({report.time_s:.0f} s{', views read from the cache' if report.cached else ''}): "
                 f"cosine {report.cosine:.4f}, "
                 f"pair agreement {report.pair_agreement:.4f}")
    tqdm.write(line)
    return points


class FaceTask(Task[FaceDistillConfig, FaceRun, FaceResult]):
    """Face: a FaceNet teacher distilled into a MobileNetV1 face embedder."""

    name = "face"
    config_cls = FaceDistillConfig
    best_metric = "cosine"
    scored_by = "tools/eval_face.py (face embedders are scored on verification pairs)"

    def head(self, cfg: FaceDistillConfig) -> str:
        return "face_embedding"

    def prepare(self, cfg: FaceDistillConfig, request: RunRequest, info: DistInfo) -> FaceRun:
        check_distill_config(cfg)
        check_output_path(Path(request.output_dir),
                          [*cfg.data.roots, *([cfg.data.val_root] if cfg.data.val_root else [])], what="output folder")
        data = build_distill_data(cfg.data, pool=clean_pool(cfg, info.device, info.is_main))
        teacher = prepare_teacher(cfg.teacher, data, device=info.device, batch_size=cfg.data.eval_batch_size)
        return FaceRun(cfg, request, info, data, teacher)

    def build_model(self, run: FaceRun, weights: WeightsPath) -> nn.Module:
        return build_face_embedder(run.cfg.model, weights_backbone=weights)

    def start(self, run: FaceRun, model: nn.Module) -> DataLoader:
        """The teacher's targets (cached on rank 0), rank 0's reference points and warm start, the loader."""
        cfg, info, data = run.cfg, run.info, run.data
        batch_size, device = cfg.data.eval_batch_size, run.device
        cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run.output_dir
        run.val_targets = torch.from_numpy(np.array(teacher_cache(run.teacher, data.val, cache_dir / "teacher_val.npy",
                                                                   batch_size, device, info)))
        if cfg.data.cache_teacher:
            run.train_targets = teacher_cache(run.teacher, data.train_plain, cache_dir / "teacher_train.npy",
                                              batch_size, device, info)
        if info.is_main:
            write_training_set(run.output_dir / "train_crops.txt", data.train_plain)
            run.reference = _before_training(run, model)
        loader = build_train_loader(data.train, cfg.train, collate_fn=face_collate, distributed=info)
        run.criterion = DistillationLoss(cfg.loss)
        return loader

    def training_step(self, run: FaceRun, model: nn.Module, batch: Any, device: torch.device) -> dict[str, Tensor]:
        return _distillation_losses(run, model, batch, device)

    def evaluate_epoch(self, run: FaceRun, model: nn.Module, epoch: int) -> dict[str, float]:
        return held_out_scores(model, run)

    def batch_images(self, batch: Any) -> int:
        return int(batch[0].shape[0])

    def finish(self, run: FaceRun, model: nn.Module, fitted: FitResult, time_s: float) -> FaceResult:
        result = _face_result(run, fitted)
        if run.info.is_main:
            (run.output_dir / "distill_summary.json").write_text(json.dumps(result.to_json(), indent=2))
            warning = collapse_warning("student", asdict(result.final_spread)) if result.collapsed else None
            if warning:
                print(warning, file=sys.stderr)
        return result

    def load(self, checkpoint: Checkpoint) -> tuple[nn.Module, FaceDistillConfig]:
        return load_face_task(checkpoint)

    def datasets(self, cfg: FaceDistillConfig) -> tuple[Any, Any]:
        return face_datasets(cfg)

    def image_files(self, cfg: FaceDistillConfig, split: str) -> list[Path]:
        return face_image_files(cfg, split)

    def export(self, checkpoint: Checkpoint, model: nn.Module, cfg: FaceDistillConfig) -> ExportPlan:
        return face_export_plan(checkpoint, model, cfg)


def distill_face(
    cfg: FaceDistillConfig,
    *,
    output_dir: str | os.PathLike,
    resume: str | os.PathLike | bool | None = None,
    overwrite: bool = False,
    weights_backbone: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> FaceResult:
    """Distil the teacher of ``cfg`` into a MobileNetV1 face embedder.

    Args:
        cfg: the experiment.
        output_dir: receives ``config.yaml``, ``last.pt``/``best.pt`` (task ``"face"``), the
            teacher caches and ``distill_summary.json``.
        resume: continue from this checkpoint, or True for ``output_dir/last.pt``.
        overwrite: start over in a folder holding checkpoints.
        weights_backbone: starts the student's trunk (default ``model.backbone.weights``).
        device: ``"cuda"``/``"cuda:N"``/``"cpu"``/None (CUDA when available); under
            ``torchrun`` each process takes its own GPU.

    Returns:
        The run's :class:`FaceResult`: the reference points (untrained student, best constant
        prediction), the final and best held-out cosine, pair agreement, spread and collapse
        verdict, throughput (images/s of a training step and the teacher's share), sizes, and
        the engine's result.

    Raises:
        ValueError: a bad config, no images, or a run folder holding another run's checkpoints
            (:func:`mnapps.engine.run_folder.check_run_folder`).
    """
    request = RunRequest(output_dir, resume=resume, overwrite=overwrite, weights_backbone=weights_backbone)
    return FaceTask().train(cfg, request, device=device)


def _face_result(run: FaceRun, fitted: FitResult) -> FaceResult:
    """Held-out figures of the last evaluation, collapse verdict and step throughput."""
    last, clock, cached = fitted.last_metrics, run.clock, run.train_targets is not None
    mean_cosine, rank = last.get("spread_cosine", math.nan), last.get("effective_rank", math.nan)
    spread = FinalSpread(len(run.data.val), mean_cosine, rank, is_collapsed(mean_cosine, rank))
    epochs = [record.train for record in fitted.epochs_trained_here]
    train_seconds = sum(e.time_s for e in epochs)
    images = sum(e.images_per_s * e.time_s for e in epochs)
    throughput = Throughput(
        targets="cached" if cached else "online teacher",
        images_per_s=images / train_seconds if train_seconds > 0 else math.nan,
        teacher_share=0.0 if cached else (clock.seconds / train_seconds if train_seconds > 0 else math.nan),
        teacher_images_per_s=clock.images / clock.seconds if clock.seconds > 0 else math.nan,
    )
    return FaceResult(
        train_images=len(run.data.train_plain), views_per_epoch=len(run.data.train), val_images=len(run.data.val),
        teacher=run.teacher.name, reference=run.reference, final_cosine=last.get("cosine", math.nan),
        best_cosine=fitted.best, final_pair_agreement=last.get("pair_agreement", math.nan), final_spread=spread,
        throughput=throughput, fit=fitted,
    )
