"""Embedding face crops, and the collapse guard on what comes out.

This module owns :func:`embed_faces`, the one embedding loop of the face code (distillation's
held-out scoring, evaluation, ``embed_faces``), optionally with horizontal-flip test-time
augmentation (the normalised sum of the embeddings of the image and its mirror, as insightface
does); :func:`embedding_spread`, :func:`is_collapsed` and :func:`collapse_warning`, the collapse
guard (mean pairwise cosine and effective rank of a set of embeddings); and
:func:`pair_distances`, the L2 distance of each pair that the metrics read.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mnapps.tasks.face.data.faces import FaceFolder, face_collate

__all__ = [
    "embed_faces",
    "embedding_spread",
    "is_collapsed",
    "collapse_warning",
    "COLLAPSE_COSINE",
    "COLLAPSE_RANK",
    "pair_distances",
]


def _as_face_folder(images: FaceFolder | Sequence[str | os.PathLike], image_size: int) -> FaceFolder:
    if isinstance(images, FaceFolder):
        return images
    if not images:
        raise ValueError("no image files to embed")
    paths = [Path(f).absolute() for f in images]
    return FaceFolder([paths[0].parent], image_size=image_size, files=paths)


@torch.no_grad()
def embed_faces(
    model: nn.Module,
    images: FaceFolder | Sequence[str | os.PathLike],
    *,
    image_size: int = 160,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    flip_tta: bool = False,
    unreadable: Literal["raise", "nan"] = "raise",
    num_workers: int = 0,
    desc: str | None = None,
) -> Tensor:
    """Embed face crops with ``model``: the one embedding loop of distillation, evaluation and tools.

    Args:
        model: a face embedder, :class:`mnapps.tasks.face.distill.teacher.FacenetTeacher`, or any module
            mapping ``[N, 3, S, S]`` images in [0, 1] to ``[N, D]``; its train/eval mode is
            restored afterwards.
        images: a :class:`~mnapps.tasks.face.data.faces.FaceFolder` (its own transform applies) or image
            paths (each resized to ``image_size`` square).
        flip_tta: embed each image and its horizontal mirror and use the normalised sum (as
            insightface does).
        unreadable: ``"raise"`` a ValueError naming the unreadable files, or leave their rows NaN.
        desc: progress-bar label (None hides the bar).

    Returns:
        ``FloatTensor[len(images), D]`` on the CPU, rows L2-normalised (NaN rows for unreadable
        images with ``unreadable="nan"``).

    Raises:
        ValueError: no images, an unreadable image (with ``"raise"``), or no readable image at all.
    """
    dataset = _as_face_folder(images, image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=face_collate)
    was_training = model.training
    model.eval()
    out: Tensor | None = None
    seen: list[Tensor] = []
    try:
        with warnings.catch_warnings():
            if unreadable == "raise":  # FaceFolder warns per file; the error below names them all
                warnings.simplefilter("ignore", RuntimeWarning)
            for images_batch, indices, _ in tqdm(loader, desc=desc, unit="batch", leave=False, disable=desc is None):
                if images_batch.shape[0] == 0:
                    continue
                images_batch = images_batch.to(device)
                embeddings = model(images_batch).float()
                if flip_tta:
                    embeddings = embeddings + model(torch.flip(images_batch, dims=[3])).float()
                embeddings = F.normalize(embeddings, dim=1).cpu()
                if out is None:
                    out = torch.full((len(dataset), embeddings.shape[1]), float("nan"))
                out[indices] = embeddings
                seen.append(indices)
    finally:
        model.train(was_training)
    done = set(torch.cat(seen).tolist()) if seen else set()
    bad = [str(dataset.files[i]) for i in range(len(dataset)) if i not in done]
    if out is None:
        raise ValueError(f"none of the {len(dataset)} face images could be read (first: {bad[0]})")
    if bad and unreadable == "raise":
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"cannot read {len(bad)} face image(s): {', '.join(bad[:3])}{more}")
    return out


#: A mean pairwise cosine above this, or an effective rank below :data:`COLLAPSE_RANK`, is collapse.
COLLAPSE_COSINE = 0.95
COLLAPSE_RANK = 2.0


def embedding_spread(embeddings: Tensor) -> dict[str, float | bool]:
    """How spread out a set of embeddings is: the collapse guard of distillation and evaluation.

    A student that maps every face to (nearly) one point scores AUC 0.5 with every pair at
    distance ~0, and a loss or a mean student-teacher cosine can hide it. Two figures show it:

    * ``mean_pairwise_cosine``: mean cosine between distinct rows (1.0 when all coincide);
    * ``effective_rank``: ``exp`` of the entropy of the normalised singular values of the
      (uncentred) matrix (Roy & Vetterli, 2007): 1.0 for one direction, up to ``min(N, D)``.

    Args:
        embeddings: ``[N, D]``; rows with NaN (unreadable images) are left out.

    Returns:
        ``{"count", "mean_pairwise_cosine", "effective_rank", "collapsed"}``; ``collapsed`` is
        True when the cosine exceeds :data:`COLLAPSE_COSINE` or the rank is below
        :data:`COLLAPSE_RANK`. With fewer than two rows the figures are NaN and nothing is collapsed.
    """
    rows = embeddings.detach().float().cpu()
    rows = rows[~torch.isnan(rows).any(1)]
    n = rows.shape[0]
    if n < 2:
        return {"count": n, "mean_pairwise_cosine": math.nan, "effective_rank": math.nan, "collapsed": False}
    unit = F.normalize(rows, dim=1)
    cosines = unit @ unit.T
    mean_cosine = float((cosines.sum() - cosines.diagonal().sum()) / (n * (n - 1)))
    singular = torch.linalg.svdvals(unit.double())
    p = singular / singular.sum()
    p = p[p > 0]
    rank = float(torch.exp(-(p * p.log()).sum()))
    return {"count": n, "mean_pairwise_cosine": mean_cosine, "effective_rank": rank,
            "collapsed": is_collapsed(mean_cosine, rank)}


def is_collapsed(mean_pairwise_cosine: float, effective_rank: float) -> bool:
    """The collapse rule of :func:`embedding_spread` (NaN figures are not collapse)."""
    return bool(mean_pairwise_cosine > COLLAPSE_COSINE or effective_rank < COLLAPSE_RANK)


def collapse_warning(label: str, spread: dict[str, float | bool]) -> str | None:
    """A loud multi-line warning when :func:`embedding_spread` says ``collapsed``, else None."""
    if not spread["collapsed"]:
        return None
    bar = "!" * 78
    return (
        f"{bar}\nWARNING: the {label}'s embeddings have COLLAPSED: over {spread['count']} images the mean "
        f"pairwise cosine is {spread['mean_pairwise_cosine']:.4f} (> {COLLAPSE_COSINE} means nearly one point) and "
        f"the effective rank {spread['effective_rank']:.2f} (< {COLLAPSE_RANK:g} means one direction).\n"
        f"Its verification figures measure nothing. Typical cause: training images unlike the evaluation "
        f"images (e.g. generated faces), so the student learnt one answer for everything.\n{bar}"
    )


def pair_distances(embeddings: Tensor, index_pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """L2 distance between the embeddings of each ``(i, j)`` pair."""
    first = embeddings[[i for i, _ in index_pairs]]
    second = embeddings[[j for _, j in index_pairs]]
    return (first - second).norm(dim=1).numpy().astype(np.float64)
