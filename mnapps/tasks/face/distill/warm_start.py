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

Collecting the views (the teacher and the student's trunk on each) is nearly all the cost, so
:func:`ridge_embedding_init` shows it as a bar with a total and can keep the collected features
in a cache file (:func:`views_cache_path`), named by everything they depend on: the trunk's and
the teacher's weights, the crop files and the settings that draw the views. A second run with
the same start (another learning rate, more epochs) then solves the layer in a second.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mnapps.files import atomic_write

__all__ = ["WarmStartConfig", "ridge_embedding_init", "views_cache_path"]


@dataclass(frozen=True)
class WarmStartConfig:
    """The embedding layer's closed-form start (``warm_start`` section of a face config).

    Attributes:
        views: images to solve on: the un-augmented training crops first, then augmented views
            of them; 0 leaves the random initialisation.
        ridge: ``lam / views``; larger trusts the teacher less and the trunk's own geometry more.
        augment_strength: augmentation of those views (``light`` or ``strong``, as
            :func:`mnapps.tasks.face.data.faces.build_face_transforms`), independent of training's.
        mix_prob: mixup/cutmix share of those views (``data.mix_alpha``/``cutmix_share`` apply).
        extra_images: folders of photos *without* the training people (any photos: street
            scenes, animals); ``extra_views`` random crops of them are embedded by the teacher and
            fitted on too, after the clean crops (:class:`mnapps.tasks.face.distill.ood.RandomPhotoCrops`).
            They count towards ``views``.
        extra_views: how many such crops.
    """

    views: int = 0
    ridge: float = 1.0
    augment_strength: Literal["light", "strong"] = "light"
    mix_prob: float = 0.0
    extra_images: list[str] = field(default_factory=list)
    extra_views: int = 0


def _digest_module(digest: Any, module: nn.Module) -> None:
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())


def views_cache_path(cache_dir: str | os.PathLike, student: nn.Module, teacher: Callable[[Tensor], Tensor],
                     files: Sequence[str | os.PathLike], settings: Mapping[str, Any]) -> Path | None:
    """Where the collected views of this warm start are kept, or None when they cannot be named.

    The name hashes the student trunk's and the teacher's weights, each crop file's path, size
    and modification time, and ``settings`` (views, augmentation, seed, sizes: whatever draws the
    views). A teacher that is not an ``nn.Module`` has no weights to hash: no cache.
    """
    if not isinstance(teacher, nn.Module) or not hasattr(student, "backbone"):
        return None
    digest = hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    for file in files:
        stat = os.stat(file)
        digest.update(f"{os.fspath(file)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    _digest_module(digest, student.backbone)
    _digest_module(digest, teacher)
    return Path(cache_dir) / "warm_start" / f"views-{digest.hexdigest()[:32]}.npz"


def _read_cached(path: Path | None) -> tuple[Tensor, Tensor] | None:
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            return torch.from_numpy(stored["features"]), torch.from_numpy(stored["targets"])
    except (OSError, ValueError, KeyError):  # a damaged cache file is recomputed, never trusted
        return None


def _write_cached(path: Path, x: Tensor, t: Tensor) -> None:
    atomic_write(path, lambda handle: np.savez(handle, features=x.numpy(), targets=t.numpy()))


@torch.no_grad()
def _collect(student: nn.Module, teacher: Callable[[Tensor], Tensor], batches: Iterable[Tensor],
             max_views: int, device: torch.device | str, progress: bool = False) -> tuple[Tensor, Tensor]:
    features, targets, count = [], [], 0
    bar = tqdm(total=max_views, desc="warm start: teacher and trunk on views", unit="view", disable=not progress,
               leave=False)
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
        bar.update(images.shape[0])
        if count >= max_views:
            break
    bar.close()
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
    cache: str | os.PathLike | None = None,
    progress: bool = False,
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
        cache: a file (:func:`views_cache_path`) holding the views' trunk features and teacher
            embeddings: read instead of running the networks when it is there, written when not.
        progress: show a bar over the ``max_views`` views while collecting them.

    Returns:
        ``{"views", "ridge", "fit_cosine", "cached"}``: the mean cosine between ``x_std @ W`` and
        the teacher's embeddings over the views (how well the layer fits what it was solved on);
        ``cached`` is 1.0 when the views came from ``cache``.

    Raises:
        ValueError: ``ridge <= 0``, fewer than 2 views, or a student without the expected layers.
    """
    if ridge <= 0:
        raise ValueError(f"warm_start.ridge must be > 0, got {ridge}")
    if not all(hasattr(student, name) for name in ("backbone", "embedding", "bn")):
        raise ValueError("ridge_embedding_init needs a FaceEmbedder (backbone, embedding, bn)")
    cache = Path(cache) if cache is not None else None
    stored = _read_cached(cache)
    if stored is not None:
        x, t = stored
    else:
        was_training = student.training
        student.eval()
        try:
            x, t = _collect(student, teacher, batches, max_views, device, progress)
        finally:
            student.train(was_training)
        if cache is not None:
            _write_cached(cache, x, t)
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
    return {"views": float(n), "ridge": float(ridge), "fit_cosine": float(fitted), "cached": float(stored is not None)}
