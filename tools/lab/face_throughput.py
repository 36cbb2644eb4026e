"""How fast a distillation step runs, with the teacher cache and with the teacher online.

This module owns :func:`benchmark_distill_step` (``tools/bench_distill_step.py``): the
same batch trained through the engine's own step (:func:`lab.engine_step.time_engine_steps`
runs ``fit`` with the config's optimiser) both ways, so the cost of embedding each view with
the teacher is a ratio measured side by side.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import Tensor, nn

from lab.engine_step import time_engine_steps
from mnapps.engine.steps import to_device
from mnapps.heads.face_embedding import build_face_embedder
from mnapps.tasks.face.config import FaceDistillConfig
from mnapps.tasks.face.data.datasets import build_distill_data
from mnapps.tasks.face.data.faces import face_collate
from mnapps.tasks.face.distill.losses import DistillationLoss
from mnapps.tasks.face.teacher import prepare_teacher

__all__ = ["benchmark_distill_step"]


class _DistillStepLoss:
    """The engine's ``loss_fn`` for the benchmark: targets given, or embedded by the teacher in the step.

    With the teacher in the step, the seconds it takes are kept in ``teacher_seconds`` (one per
    step; on CUDA after waiting for its kernels).
    """

    def __init__(self, criterion: DistillationLoss, teacher: nn.Module, targets: Tensor | None,
                 channels_last: bool) -> None:
        self.criterion = criterion
        self.teacher = teacher
        self.targets = targets
        self.channels_last = channels_last
        self.teacher_seconds: list[float] = []

    def __call__(self, model: nn.Module, batch: Tensor, device: torch.device) -> dict[str, Tensor]:
        views = to_device(batch, device, channels_last=self.channels_last)
        targets = self.targets
        if targets is None:
            started = time.perf_counter()
            targets = self.teacher(views)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.teacher_seconds.append(time.perf_counter() - started)
        return self.criterion(model(views).float(), targets.float())


def benchmark_distill_step(
    cfg: FaceDistillConfig,
    *,
    steps: int = 5,
    device: str | torch.device | None = None,
    weights_backbone: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Time the engine's distillation step, with the teacher's targets cached and with the teacher in it.

    One batch of ``cfg.train.batch_size`` training views is drawn once; then ``steps`` steps run
    with the targets computed beforehand (the teacher cache: no teacher in the step) and
    ``steps`` with the teacher embedding the batch inside the step, after one untimed warm-up
    step each. Both go through :func:`mnapps.engine.loop.fit` with ``cfg.train``'s optimiser,
    channels_last and AMP (on CUDA: the student and the teacher run under autocast, float16).
    Unlike a training run the views are not mixed, so both ways see the very same batch.

    Returns:
        ``{"cached": {"images_per_s", "step_s"}, "online": {"images_per_s", "step_s",
        "teacher_s", "teacher_share"}, "batch_size", "device"}``; times are means over the steps.
    """
    if steps < 1:
        raise ValueError(f"benchmark steps must be >= 1, got {steps}")
    run_device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    data = build_distill_data(cfg.data)
    teacher = prepare_teacher(cfg.teacher, data, device=run_device, batch_size=cfg.data.eval_batch_size)
    student = build_face_embedder(cfg.model, weights_backbone=weights_backbone or cfg.model.backbone.weights)
    loader = torch.utils.data.DataLoader(data.train, batch_size=cfg.train.batch_size, shuffle=True,
                                         collate_fn=face_collate)
    images = next(iter(loader))[0]
    cached_targets = teacher(to_device(images, run_device, channels_last=cfg.train.channels_last))
    criterion = DistillationLoss(cfg.loss)
    result: dict[str, Any] = {"batch_size": int(images.shape[0]), "device": str(run_device)}
    for name, online in (("cached", False), ("online", True)):
        loss_fn = _DistillStepLoss(criterion, teacher, None if online else cached_targets, cfg.train.channels_last)
        timings = time_engine_steps(student, images, loss_fn, cfg.train, images=int(images.shape[0]),
                                    device=run_device, warmup=1, repeats=steps)
        step_s = sum(timings) / steps
        result[name] = {"images_per_s": images.shape[0] / step_s, "step_s": step_s}
        if online:
            teacher_s = sum(loss_fn.teacher_seconds[-steps:]) / steps
            result[name].update(teacher_s=teacher_s, teacher_share=teacher_s / step_s)
    return result
