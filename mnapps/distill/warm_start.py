"""A closed-form start for the student's embedding layer: ridge regression onto the teacher.

This module owns the few-face recipe's first step. A student that starts from the ImageNet
trunk already tells faces apart somewhat (its pooled features, L2-normalised, are the baseline
``eval_face --trunk`` scores); a randomly initialised embedding layer throws that away, and
the first epochs of gradient descent on a few dozen crops spend themselves (and the trunk's
features) recovering it. Instead, the embedding layer is solved once: with the trunk's pooled
features ``x`` of a set of views (standardised per dimension) and the teacher's embeddings
``t`` of the same views,

    W = argmin ||X W - T||^2 + lam ||W||^2 = (X^T X + lam I)^-1 X^T T,   lam = ridge * N

(the least-squares fitting of added layers in Li et al. 2020, "Few Sample Knowledge
Distillation for Efficient Network Compression", applied to the one new layer; ridge because
1024 features and a few hundred views leave the plain solution ill-posed). ``ridge`` is
relative to the number of views ``N``, so one value fits any number of views. The student's
``Linear -> BatchNorm1d`` pair is then set so that it computes exactly ``x_std @ W`` in eval
mode and, with batch statistics close to those of the views, in train mode too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

import torch
from torch import Tensor, nn

__all__ = ["WarmStartConfig", "ridge_embedding_init"]


@dataclass(frozen=True)
class WarmStartConfig:
    """The embedding layer's closed-form start (``warm_start`` section of a face config).

    Attributes:
        views: images to solve on: the un-augmented training crops first, then augmented views
            of them; 0 leaves the random initialisation.
        ridge: ``lam / views``; larger trusts the teacher less and the trunk's own geometry more.
        augment_strength: augmentation of those views (``light`` or ``strong``, as
            :func:`mnapps.data.faces.build_face_transforms`), independent of training's.
        mix_prob: mixup/cutmix share of those views (``data.mix_alpha``/``cutmix_share`` apply).
        extra_images: folders of photos *without* the training people (any photos: street
            scenes, animals); ``extra_views`` random crops of them are embedded by the teacher and
            fitted on too, after the clean crops (:class:`mnapps.distill.ood.RandomPhotoCrops`).
            They count towards ``views``.
        extra_views: how many such crops.
    """

    views: int = 0
    ridge: float = 1.0
    augment_strength: Literal["light", "strong"] = "light"
    mix_prob: float = 0.0
    extra_images: list[str] = field(default_factory=list)
    extra_views: int = 0


@torch.no_grad()
def _collect(student: nn.Module, teacher: Callable[[Tensor], Tensor], batches: Iterable[Tensor],
             max_views: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    features, targets, count = [], [], 0
    for images in batches:
        images = images[: max_views - count].to(device)
        if images.shape[0] == 0:
            break
        if images.shape[-2:] != (student.input_size, student.input_size):
            images_student = nn.functional.interpolate(images, size=(student.input_size,) * 2, mode="bilinear",
                                                       align_corners=False, antialias=True)
        else:
            images_student = images
        features.append(student.backbone(images_student * 2.0 - 1.0).double().cpu())
        targets.append(teacher(images).double().cpu())
        count += images.shape[0]
        if count >= max_views:
            break
    if count < 2:
        raise ValueError(f"the embedding warm start needs at least 2 views, got {count}")
    return torch.cat(features), torch.cat(targets)


@torch.no_grad()
def ridge_embedding_init(
    student: nn.Module,
    teacher: Callable[[Tensor], Tensor],
    batches: Iterable[Tensor],
    *,
    max_views: int,
    ridge: float = 1.0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Set ``student.embedding`` and ``student.bn`` to the ridge regression onto the teacher.

    Args:
        student: a :class:`mnapps.heads.face_embedding.FaceEmbedder` (``backbone``,
            ``embedding`` without bias, ``bn``); its trunk runs in eval mode here.
        teacher: maps ``[N, 3, H, W]`` images in [0, 1] to ``[N, D]`` embeddings.
        batches: image batches (``[B, 3, H, W]`` in [0, 1]): the views to fit on.
        max_views: stop after this many images.
        ridge: ``lam / N`` (see the module docstring); > 0.
        device: where student and teacher run.

    Returns:
        ``{"views", "ridge", "fit_cosine"}``: the mean cosine between ``x_std @ W`` and the
        teacher's embeddings over the views (how well the layer fits what it was solved on).

    Raises:
        ValueError: ``ridge <= 0``, fewer than 2 views, or a student without the expected layers.
    """
    if ridge <= 0:
        raise ValueError(f"warm_start.ridge must be > 0, got {ridge}")
    if not all(hasattr(student, name) for name in ("backbone", "embedding", "bn")):
        raise ValueError("ridge_embedding_init needs a FaceEmbedder (backbone, embedding, bn)")
    was_training = student.training
    student.eval()
    try:
        x, t = _collect(student, teacher, batches, max_views, device)
    finally:
        student.train(was_training)
    n = x.shape[0]
    mean, std = x.mean(0), x.std(0) + 1e-6
    standardised = (x - mean) / std
    gram = standardised.T @ standardised + ridge * n * torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(gram, standardised.T @ t)  # [C, D]
    weight = (w / std[:, None]).T  # Linear(x) = x @ (W / std) = x_std @ W + offset
    offset = (mean / std) @ w  # what the Linear's missing bias would have to subtract
    z = x @ weight.T
    z_mean, z_var = z.mean(0), z.var(0, unbiased=False)
    bn = student.bn
    student.embedding.weight.copy_(weight.to(student.embedding.weight))
    # BN(z) = (z - m) / sqrt(v + eps) * gamma + beta = z - offset, with m, v the views' statistics.
    bn.running_mean.copy_(z_mean.to(bn.running_mean))
    bn.running_var.copy_(z_var.to(bn.running_var))
    bn.weight.copy_(torch.sqrt(z_var + bn.eps).to(bn.weight))
    bn.bias.copy_((z_mean - offset).to(bn.bias))
    fitted = nn.functional.cosine_similarity(standardised @ w, t, dim=1).mean()
    return {"views": float(n), "ridge": float(ridge), "fit_cosine": float(fitted)}
