"""Embedding-distillation losses: the paper's squared L2, and optional cosine and relational terms.

This module owns the objectives that make a student's embeddings match a teacher's:

* :func:`squared_l2_loss`: the MobileNet paper's face objective (Sec. 4.7: "minimize the
  squared differences of the output of FaceNet and MobileNet"), ``||s - t||^2`` averaged
  over the batch. For unit vectors it equals ``2 - 2 cos(s, t)``.
* :func:`cosine_loss`: ``1 - cos(s, t)`` averaged; the same optimum, half the gradient scale
  on unit vectors, and insensitive to the norms if the embeddings are not normalised.
* :func:`relational_loss`: matches the batch's pairwise cosine-similarity matrix of the
  student to the teacher's (similarity-preserving distillation, Tung & Mori 2019), so the
  student learns how faces relate to each other, which is what verification uses.

:class:`DistillationLoss` combines them with weights and returns the named dict the shared
engine sums and logs (``loss_l2``, ``loss_cos``, ``loss_rel``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DistillLossConfig", "squared_l2_loss", "cosine_loss", "relational_loss", "DistillationLoss"]


def _check_pair(student: Tensor, teacher: Tensor) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher embeddings must both be [N, D] with the same shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)} (is model.embedding_dim the teacher's?)"
        )


def squared_l2_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over the batch of ``||student_i - teacher_i||_2^2`` (paper Sec. 4.7).

    Args:
        student, teacher: ``Tensor[N, D]``.

    Returns:
        A scalar tensor.
    """
    _check_pair(student, teacher)
    return (student - teacher.to(student.dtype)).pow(2).sum(dim=1).mean()


def cosine_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over the batch of ``1 - cos(student_i, teacher_i)`` (0 when aligned, up to 2)."""
    _check_pair(student, teacher)
    return (1.0 - F.cosine_similarity(student, teacher.to(student.dtype), dim=1)).mean()


def relational_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared difference of the off-diagonal pairwise cosine similarities.

    ``S_ij = cos(s_i, s_j)`` and ``T_ij = cos(t_i, t_j)`` for ``i != j``; the loss is the mean of
    ``(S_ij - T_ij)^2``. A batch of one has no pairs and gives 0.
    """
    _check_pair(student, teacher)
    n = student.shape[0]
    if n < 2:
        return student.sum() * 0.0
    s = F.normalize(student, dim=1)
    t = F.normalize(teacher.to(student.dtype), dim=1)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=student.device)
    return (s @ s.T - t @ t.T)[off_diagonal].pow(2).mean()


@dataclass(frozen=True)
class DistillLossConfig:
    """Weights of the loss terms; a zero weight leaves the term out entirely."""

    l2_weight: float = 1.0
    cosine_weight: float = 0.0
    relational_weight: float = 0.0


class DistillationLoss(nn.Module):
    """Weighted sum of the distillation terms, returned as a named dict.

    Args:
        cfg: the weights (at least one must be > 0; none may be negative).

    Call: ``(student Tensor[N, D], teacher Tensor[N, D]) -> {"loss_l2", "loss_cos", "loss_rel"}``
    (only the terms with a non-zero weight, each already multiplied by its weight).
    """

    def __init__(self, cfg: DistillLossConfig = DistillLossConfig()) -> None:
        super().__init__()
        weights = {"l2_weight": cfg.l2_weight, "cosine_weight": cfg.cosine_weight, "relational_weight": cfg.relational_weight}
        negative = {k: v for k, v in weights.items() if v < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}")
        if not any(v > 0 for v in weights.values()):
            raise ValueError(f"at least one loss weight must be > 0 (loss.l2_weight is the paper's), got {weights}")
        self.cfg = cfg

    def forward(self, student: Tensor, teacher: Tensor) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if self.cfg.l2_weight > 0:
            losses["loss_l2"] = self.cfg.l2_weight * squared_l2_loss(student, teacher)
        if self.cfg.cosine_weight > 0:
            losses["loss_cos"] = self.cfg.cosine_weight * cosine_loss(student, teacher)
        if self.cfg.relational_weight > 0:
            losses["loss_rel"] = self.cfg.relational_weight * relational_loss(student, teacher)
        return losses
