"""Soft targets: a detection student taught by a teacher detector's per-anchor outputs as well as boxes.

This module owns the distillation terms a detection run adds to its box loss when its config has
a ``distill:`` section (:class:`~mnapps.tasks.detection.config.DetDistillConfig`). The teacher,
a detection checkpoint, runs in eval mode and without gradients on the very input tensor the
student's backbone receives in each training step. The student's per-anchor class logits are
pulled towards the teacher's class probabilities (a KL divergence: per class and binary for
sigmoid-scored SSDs, over the classes for softmax ones), and its box offsets towards the
teacher's on the anchors the teacher calls foreground. Pseudo-labels hand the student one box per
face above a threshold; the teacher's outputs also say how sure it is, and what it thinks of
every other anchor. Per-anchor targets only mean something when anchor i is the same box for both
networks, so :func:`check_compatible` refuses a teacher whose anchors, preprocessing or classes
differ from the student's, and says which.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnapps.weights import resolve_weights

from .config import DetDistillConfig
from .model import load_detector

__all__ = ["load_teacher", "check_compatible", "soft_target_losses", "with_soft_targets"]

LossFn = Callable[[nn.Module, Any, torch.device], dict[str, Tensor]]


def load_teacher(cfg: DetDistillConfig, device: torch.device) -> nn.Module:
    """The teacher detector of ``cfg``, frozen, in eval mode on ``device``."""
    teacher, _ = load_detector(resolve_weights(cfg.teacher), device)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.eval()


def _features(model: nn.Module, inputs: Tensor) -> list[Tensor]:
    """The SSD backbone's feature maps of an already-preprocessed batch (torchvision's SSD.forward steps)."""
    features = model.backbone(inputs)
    return [features] if isinstance(features, Tensor) else list(features.values())


def _head_outputs(model: nn.Module, inputs: Tensor) -> dict[str, Tensor]:
    """What the SSD's head gives for an already-preprocessed batch."""
    return model.head(_features(model, inputs))


def _activation(model: nn.Module) -> str:
    return getattr(model, "score_activation", "softmax")


@torch.no_grad()
def check_compatible(student: nn.Module, teacher: nn.Module, name: str) -> int:
    """Refuse a teacher whose anchor i is not the student's anchor i; return the anchor count.

    Raises:
        ValueError: naming what differs (head type, preprocessing, input size, anchors, classes,
            score activation) and the fix.
    """
    fix = "soft targets need the teacher's anchors: use a teacher of the student's input size and anchor settings"
    for model, role in ((student, "student"), (teacher, "teacher")):
        if not all(hasattr(model, part) for part in ("anchor_generator", "head", "backbone", "transform")):
            raise ValueError(f"distill.teacher {name}: the {role} is not an SSD-family detector; {fix}")
    sizes = [getattr(m.transform, "fixed_size", None) or getattr(m.transform, "size", None) for m in (student, teacher)]
    preprocess = [getattr(m.transform, "preprocess", type(m.transform).__name__) for m in (student, teacher)]
    if sizes[0] != sizes[1] or preprocess[0] != preprocess[1]:
        raise ValueError(f"distill.teacher {name}: input {sizes[1]} ({preprocess[1]}) but the student's is "
                         f"{sizes[0]} ({preprocess[0]}); {fix}")
    if _activation(student) != _activation(teacher):
        raise ValueError(f"distill.teacher {name}: {_activation(teacher)} scores but the student's are "
                         f"{_activation(student)}; use a teacher with the student's head")
    was_training = student.training
    student.eval()
    try:
        probe = [torch.zeros(3, 96, 128, device=next(student.parameters()).device)]
        anchors, classes = [], []
        for model in (student, teacher):
            images, _ = model.transform(probe)
            features = _features(model, images.tensors)
            anchors.append(model.anchor_generator(images, features)[0])
            classes.append(model.head(features)["cls_logits"].shape[-1])
    finally:
        student.train(was_training)
    if anchors[0].shape != anchors[1].shape or not torch.allclose(anchors[0], anchors[1], atol=1e-4):
        raise ValueError(f"distill.teacher {name}: {len(anchors[1])} anchors that are not the student's "
                         f"{len(anchors[0])}; {fix}")
    if classes[0] != classes[1]:
        raise ValueError(f"distill.teacher {name}: {classes[1] - 1} classes but the student has {classes[0] - 1}; "
                         "use a teacher of the student's classes")
    return int(len(anchors[0]))


def soft_target_losses(student: dict[str, Tensor], teacher: dict[str, Tensor], activation: str,
                       cfg: DetDistillConfig) -> dict[str, Tensor]:
    """The two weighted soft-target terms from both heads' outputs (``cls_logits`` [B, A, C],
    ``bbox_regression`` [B, A, 4]); class 0 is background."""
    logits, target_logits = student["cls_logits"].float(), teacher["cls_logits"].float()
    if activation == "sigmoid":
        target = torch.sigmoid(target_logits)
        # KL of two Bernoulli per class: the student's cross-entropy minus the target's own entropy
        divergence = (F.binary_cross_entropy_with_logits(logits, target, reduction="none")
                      - F.binary_cross_entropy_with_logits(target_logits, target, reduction="none")).sum(-1)
    else:
        target = torch.softmax(target_logits, -1)
        divergence = (target * (torch.log_softmax(target_logits, -1) - torch.log_softmax(logits, -1))).sum(-1)
    foreground = target[..., 1:].amax(-1) >= cfg.foreground_score
    count = max(1, int(foreground.sum()))
    box = F.smooth_l1_loss(student["bbox_regression"][foreground].float(),
                           teacher["bbox_regression"][foreground].float(), reduction="sum")
    return {"soft_classification": cfg.weight * divergence.sum() / count,
            "soft_bbox_regression": cfg.box_weight * box / count}


def with_soft_targets(loss_fn: LossFn, teacher: nn.Module, cfg: DetDistillConfig) -> LossFn:
    """``loss_fn`` plus the soft-target terms, the teacher run on the student's own input tensor."""

    def loss(model: nn.Module, batch: Any, device: torch.device) -> dict[str, Tensor]:
        net = getattr(model, "module", model)  # under DistributedDataParallel
        seen: dict[str, Any] = {}
        handles = [
            net.backbone.register_forward_pre_hook(lambda module, args: seen.__setitem__("inputs", args[0])),
            net.head.register_forward_hook(lambda module, args, output: seen.__setitem__("student", output)),
        ]
        try:
            losses = loss_fn(model, batch, device)
        finally:
            for handle in handles:
                handle.remove()
        if "student" not in seen:  # a skipped batch: the base loss is already a zero
            zero = next(iter(losses.values())) * 0.0
            return {**losses, "soft_classification": zero, "soft_bbox_regression": zero}
        with torch.no_grad():
            target = _head_outputs(teacher, seen["inputs"])
        return {**losses, **soft_target_losses(seen["student"], target, _activation(net), cfg)}

    return loss
