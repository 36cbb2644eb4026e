"""How fast a distillation step runs, with the teacher cache and with the teacher online.

This module owns :func:`benchmark_distill_step` (``tools/bench_distill_step.py``): the
same batch timed through forward, loss, backward and optimiser step both ways, so the cost of
embedding each view with the teacher is a ratio measured side by side.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from mnapps.tasks.face.data.faces import face_collate
from mnapps.tasks.face.distill.losses import DistillationLoss
from mnapps.heads.face_embedding import build_face_embedder

from mnapps.tasks.face.config import FaceDistillConfig
from mnapps.tasks.face.data.datasets import build_distill_data
from mnapps.tasks.face.teacher import prepare_teacher

__all__ = ["benchmark_distill_step"]


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
