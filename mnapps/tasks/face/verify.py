"""Scoring face embedders on a verification pair list: :func:`evaluate_face_verification`.

This module owns the pair evaluation behind ``tools/eval_face.py``: alignment of only the
photos a pair list uses (:func:`align_pair_images`), one embedding pass per model, and every
figure of :mod:`mnapps.tasks.face.evaluation` (metrics, spread, ROC curves) per model, in one
:class:`VerificationResult`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mnapps.tasks.face.data.align import FaceAligner, align_folder
from mnapps.tasks.face.evaluation import (
    DEFAULT_FARS,
    PairList,
    embed_faces,
    embedding_spread,
    pair_distances,
    resolve_pairs,
    roc_curve,
    verification_metrics,
)

__all__ = ["VerificationResult", "align_pair_images", "evaluate_face_verification"]


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
        pairs: the pair list (:func:`mnapps.tasks.face.evaluation.read_pairs`).
        image_dir: the (aligned) crops the pairs name.
        models: label -> embedder, e.g. ``{"student": ..., "teacher": ..., "imagenet trunk": ...}``.
            With labels ``student`` and ``teacher`` both present, their mean cosine over the
            images is reported too.
        image_size, batch_size, device, flip_tta: as :func:`mnapps.tasks.face.evaluation.embed_faces`.
        fars, threshold: as :func:`mnapps.tasks.face.evaluation.verification_metrics`.

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
