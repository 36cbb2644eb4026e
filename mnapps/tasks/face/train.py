"""Distilling the face teacher into a MobileNetV1 embedder: :func:`distill_face`.

This module owns the face steps of the shared training skeleton
(:func:`mnapps.tasks.training.train_task`): the data and the frozen teacher, the student (its
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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

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
from mnapps.engine.loop import TaskHooks, to_device
from mnapps.tasks.face.evaluation import collapse_warning, embed_faces, embedding_spread, is_collapsed
from mnapps.files import check_output_path
from mnapps.heads.face_embedding import FaceEmbedder, build_face_embedder

from ..training import RunRequest, TaskSteps, launch, train_task
from .config import FaceDistillConfig, check_distill_config
from .data.datasets import FaceDistillData, build_distill_data, clean_pool
from .teacher import prepare_teacher, teacher_cache

__all__ = ["distill_face", "pair_agreement"]


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


def distill_face(cfg: FaceDistillConfig, *, device: str | torch.device | None = None, **run: Any) -> dict[str, Any]:
    """Distil the teacher of ``cfg`` into a MobileNetV1 face embedder.

    Args:
        cfg: the experiment.
        device: ``"cuda"``/``"cuda:N"``/``"cpu"``/None (CUDA when available); under
            ``torchrun`` each process takes its own GPU.
        run: the run, as :class:`mnapps.tasks.training.RunRequest`'s fields: ``output_dir``
            receives ``config.yaml``, ``last.pt``/``best.pt`` (task ``"face"``), the teacher
            caches and ``distill_summary.json``; ``resume``, ``overwrite``; ``weights_backbone``
            starts the student's trunk.

    Returns:
        A summary: ``start_cosine`` (untrained student), ``constant_baseline_cosine``,
        ``final_cosine``, ``best_cosine``, ``final_pair_agreement``, ``final_spread`` and
        ``collapsed`` on the held-out crops, ``throughput`` (images/s of a training step and
        the teacher's share), sizes, and ``fit``'s result under ``"fit"``.

    Raises:
        ValueError: a bad config, no images, or a run folder holding another run's checkpoints
            (:func:`mnapps.engine.loop.check_run_folder`).
    """
    return launch(_distill_face, cfg, device, run)


def _distill_steps(request: RunRequest, state: dict[str, Any]) -> TaskSteps:
    """The face steps of the training skeleton; ``state`` collects what the summary needs."""
    output_dir = Path(request.output_dir)

    def prepare(cfg: FaceDistillConfig, info: DistInfo) -> tuple[FaceDistillConfig, FaceDistillData]:
        check_distill_config(cfg)
        check_output_path(output_dir, [*cfg.data.roots, *([cfg.data.val_root] if cfg.data.val_root else [])],
                          what="output folder")
        data = build_distill_data(cfg.data, pool=clean_pool(cfg, info.device, info.is_main))
        state["teacher"] = prepare_teacher(cfg.teacher, data, device=info.device, batch_size=cfg.data.eval_batch_size)
        return cfg, data

    def start(cfg: FaceDistillConfig, student: nn.Module, data: FaceDistillData, info: DistInfo):
        teacher, device, batch_size = state["teacher"], info.device, cfg.data.eval_batch_size
        cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else output_dir
        val_targets = torch.from_numpy(np.array(teacher_cache(teacher, data.val, cache_dir / "teacher_val.npy",
                                                               batch_size, device, info)))
        train_targets = (teacher_cache(teacher, data.train_plain, cache_dir / "teacher_train.npy", batch_size, device,
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
