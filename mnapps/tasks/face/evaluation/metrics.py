"""LFW-style verification metrics computed from the distances of labelled pairs (numpy).

This module owns the figures a verification benchmark reports: :func:`verification_metrics`
computes, from L2 distances between unit embeddings, 10-fold accuracy with the folds in file
order (LFW's protocol: the threshold that maximises accuracy on the 9 other folds is applied to
the held-out fold), the ROC curve, its AUC, the equal error rate, and TAR at given FARs **only
where the number of different-person pairs can resolve that FAR** (measuring FAR = f needs at
least 1/f of them: LFW's 3000 allow 1e-3 but not 1e-4); otherwise it says so instead of
printing a number. Beside every figure stands a baseline: the accuracy of always giving the
more common answer, which a k-fold accuracy on an unbalanced pair list (deepface: 262 of 300
pairs "different") must clear to mean anything.

Convention: a pair is predicted "same" when its distance is strictly below the threshold.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "DEFAULT_FARS",
    "accuracy_at_threshold",
    "kfold_accuracy",
    "roc_curve",
    "roc_auc",
    "equal_error_rate",
    "tar_at_far",
    "verification_metrics",
]

DEFAULT_FARS = (1e-3, 1e-4)


def _check(distances: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    distances = np.asarray(distances, dtype=np.float64).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if distances.shape != issame.shape:
        raise ValueError(f"{distances.size} distances but {issame.size} labels")
    if not np.isfinite(distances).all():
        raise ValueError("distances must be finite (an image could not be embedded?)")
    return distances, issame


def accuracy_at_threshold(distances: np.ndarray, issame: np.ndarray, threshold: float) -> float:
    """Share of pairs classified right by ``same = distance < threshold``."""
    distances, issame = _check(distances, issame)
    return float(np.mean((distances < threshold) == issame))


def _best_threshold(distances: np.ndarray, issame: np.ndarray) -> float:
    """The lowest threshold maximising accuracy, among midpoints of consecutive distances."""
    values = np.unique(distances)
    candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2.0, [values[-1] + 1.0]])
    accuracies = [(np.mean((distances < t) == issame)) for t in candidates]
    return float(candidates[int(np.argmax(accuracies))])


def kfold_accuracy(distances: np.ndarray, issame: np.ndarray, n_folds: int = 10) -> dict:
    """LFW protocol: folds in file order; each fold is scored with the best threshold of the others.

    Returns:
        ``{"mean", "std", "folds": per-fold accuracy, "thresholds": per-fold threshold}``
        (``std`` is the population standard deviation over folds, as LFW results report).
    """
    distances, issame = _check(distances, issame)
    if not 2 <= n_folds <= distances.size:
        raise ValueError(f"n_folds must be in [2, {distances.size}], got {n_folds}")
    folds = np.array_split(np.arange(distances.size), n_folds)
    accuracies, thresholds = [], []
    for k, test in enumerate(folds):
        train = np.concatenate([f for j, f in enumerate(folds) if j != k])
        threshold = _best_threshold(distances[train], issame[train])
        thresholds.append(threshold)
        accuracies.append(float(np.mean((distances[test] < threshold) == issame[test])))
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
            "folds": accuracies, "thresholds": thresholds}


def roc_curve(distances: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of the rule ``same = distance <= t`` over every distinct t.

    Returns:
        ``(far, tar, thresholds)``: false accept rate (share of different-person pairs accepted)
        and true accept rate (share of same-person pairs accepted), starting at (0, 0) with
        threshold ``-inf`` and ending at (1, 1).
    """
    distances, issame = _check(distances, issame)
    n_same, n_diff = int(issame.sum()), int((~issame).sum())
    if n_same == 0 or n_diff == 0:
        raise ValueError(f"a ROC needs same and different pairs, got {n_same} same and {n_diff} different")
    thresholds = np.unique(distances)
    order = np.sort(distances[issame]), np.sort(distances[~issame])
    tar = np.searchsorted(order[0], thresholds, side="right") / n_same
    far = np.searchsorted(order[1], thresholds, side="right") / n_diff
    return (np.concatenate([[0.0], far]), np.concatenate([[0.0], tar]), np.concatenate([[-np.inf], thresholds]))


def roc_auc(far: np.ndarray, tar: np.ndarray) -> float:
    """Area under the ROC (trapezoids; ties between a same and a different pair count one half)."""
    return float(np.trapezoid(tar, far)) if hasattr(np, "trapezoid") else float(np.trapz(tar, far))


def equal_error_rate(far: np.ndarray, tar: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    """The rate where false accepts equal false rejects (FAR = 1 - TAR), interpolated on the ROC.

    Returns:
        ``(eer, threshold)``; the threshold is interpolated between the two ROC points around
        the crossing (the first point's threshold when the crossing is at a point).
    """
    frr = 1.0 - tar
    gap = far - frr  # rises from -1 at (0, 0) to +1 at (1, 1)
    k = int(np.argmax(gap >= 0))
    if gap[k] == 0 or k == 0:
        return float(far[k]), float(thresholds[k])
    # Linear interpolation between point k-1 (gap < 0) and point k (gap > 0).
    w = -gap[k - 1] / (gap[k] - gap[k - 1])
    eer = far[k - 1] + w * (far[k] - far[k - 1])
    low = thresholds[k - 1] if np.isfinite(thresholds[k - 1]) else thresholds[k]
    return float(eer), float(low + w * (thresholds[k] - low))


def tar_at_far(distances: np.ndarray, issame: np.ndarray, far: float) -> tuple[float | None, str]:
    """True accept rate at a false accept rate of at most ``far``.

    With ``n`` different-person pairs, at most ``k = floor(far * n)`` of them may be accepted:
    the threshold is the (k+1)-th smallest different-pair distance (strictly below it is
    "same"), and TAR is the share of same pairs below it.

    Returns:
        ``(tar, note)``; ``tar`` is None when ``far * n < 1`` (the set cannot resolve that FAR:
        a single false accept already exceeds it), with the reason in ``note``.
    """
    distances, issame = _check(distances, issame)
    different = np.sort(distances[~issame])
    same = distances[issame]
    n = different.size
    if n == 0 or same.size == 0:
        return None, "needs both same and different pairs"
    if far * n < 1.0:
        return None, (f"not measurable: FAR {far:g} needs at least {math.ceil(1 / far - 1e-9)} different-person "
                      f"pairs, this set has {n}")
    allowed = int(math.floor(far * n + 1e-9))
    threshold = different[allowed] if allowed < n else np.inf
    return float(np.mean(same < threshold)), f"{allowed} of {n} different pairs may be accepted (threshold {threshold:.4f})"


def verification_metrics(
    distances: np.ndarray, issame: np.ndarray, *, n_folds: int = 10, fars: Sequence[float] = DEFAULT_FARS,
    threshold: float | None = None,
) -> dict:
    """Every verification figure for one model on one pair list.

    Args:
        distances: L2 distance per pair (unit embeddings: 0..2).
        issame: label per pair.
        n_folds: folds for the k-fold accuracy (in file order).
        fars: FAR targets for TAR@FAR.
        threshold: also report accuracy at this fixed distance threshold.

    Returns:
        A JSON-ready dict: ``pairs``, ``same_pairs``, ``different_pairs``, ``accuracy``,
        ``accuracy_std``, ``fold_accuracies``, ``fold_thresholds``, ``majority_answer`` and
        ``majority_accuracy`` (the accuracy of always giving the more common answer: the floor a
        k-fold accuracy must clear on an unbalanced set), ``auc``, ``eer``,
        ``eer_threshold``, ``tar_at_far`` (``{"1e-03": value or None}``), ``tar_at_far_notes``,
        and ``accuracy_at_threshold`` when ``threshold`` is given.
    """
    distances, issame = _check(distances, issame)
    folds = kfold_accuracy(distances, issame, n_folds)
    far, tar, thresholds = roc_curve(distances, issame)
    eer, eer_threshold = equal_error_rate(far, tar, thresholds)
    result = {
        "pairs": int(distances.size),
        "same_pairs": int(issame.sum()),
        "different_pairs": int((~issame).sum()),
        "accuracy": folds["mean"],
        "accuracy_std": folds["std"],
        "fold_accuracies": folds["folds"],
        "fold_thresholds": folds["thresholds"],
        "majority_answer": "same" if issame.sum() * 2 > issame.size else "different",
        "majority_accuracy": float(max(issame.sum(), (~issame).sum()) / issame.size),
        "auc": roc_auc(far, tar),
        "eer": eer,
        "eer_threshold": eer_threshold,
        "tar_at_far": {},
        "tar_at_far_notes": {},
    }
    for target in fars:
        value, note = tar_at_far(distances, issame, target)
        result["tar_at_far"][f"{target:.0e}"] = value
        result["tar_at_far_notes"][f"{target:.0e}"] = note
    if threshold is not None:
        result["threshold"] = float(threshold)
        result["accuracy_at_threshold"] = accuracy_at_threshold(distances, issame, threshold)
    return result
