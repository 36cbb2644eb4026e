"""Face verification evaluation: pair lists, embeddings of pair images, and the LFW-style metrics.

This module owns how a face embedder is scored on a verification benchmark:

* :func:`read_pairs` parses LFW's ``pairs.txt`` (optional header ``folds [pairs-per-half]``,
  same-person lines ``name n1 n2`` and different-person lines ``name1 n1 name2 n2``) and CSV
  pair lists such as deepface's ``master.csv`` (``file_x,file_y,Decision`` with Yes/No);
  :func:`resolve_pairs` maps every pair onto image files and names the offending line when a
  name or number has no image (LFW's ``name/name_0004.jpg`` layout; an aligned copy whose
  files became ``.png`` is matched by its stem).
* :func:`verification_metrics` computes, from L2 distances between unit embeddings: 10-fold
  accuracy with the folds in file order (LFW's protocol: the threshold that maximises accuracy
  on the 9 other folds is applied to the held-out fold), the ROC curve, its AUC, the equal error
  rate, and TAR at given FARs **only where the number of different-person pairs can resolve that
  FAR** (measuring FAR = f needs at least 1/f of them: LFW's 3000 allow 1e-3 but not 1e-4);
  otherwise it says so instead of printing a number.
* :func:`embed_faces` is the one embedding loop of the face code (distillation's held-out
  scoring, evaluation, ``embed_faces``), optionally with horizontal-flip test-time
  augmentation (the normalised sum of the embeddings of the image and its mirror, as
  insightface does); :func:`embedding_spread` and :func:`collapse_warning` are the collapse
  guard (mean pairwise cosine and effective rank of a set of embeddings);
  :func:`plot_roc` writes the ROC curves as a PNG (matplotlib Agg).
* Baselines beside every figure: the result of :func:`verification_metrics` carries the
  accuracy of always giving the more common answer, which a k-fold accuracy on an
  unbalanced pair list (deepface: 262 of 300 pairs "different") must clear to mean anything.

Convention: a pair is predicted "same" when its distance is strictly below the threshold.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mnapps.data.faces import IMAGE_EXTENSIONS, FaceFolder, face_collate, list_images

__all__ = [
    "PairSpec",
    "PairList",
    "read_pairs",
    "resolve_pairs",
    "kfold_accuracy",
    "accuracy_at_threshold",
    "roc_curve",
    "roc_auc",
    "equal_error_rate",
    "tar_at_far",
    "verification_metrics",
    "embed_faces",
    "embedding_spread",
    "collapse_warning",
    "is_collapsed",
    "COLLAPSE_COSINE",
    "COLLAPSE_RANK",
    "pair_distances",
    "plot_roc",
    "format_verification_table",
    "DEFAULT_FARS",
]

DEFAULT_FARS = (1e-3, 1e-4)
_YES = {"yes", "y", "1", "true", "same", "match", "positive"}
_NO = {"no", "n", "0", "false", "different", "diff", "mismatch", "negative"}


@dataclass(frozen=True)
class PairSpec:
    """One labelled pair as written in the pair file.

    Attributes:
        line: 1-based line number in the pair file.
        text: the line as written (for error messages).
        first, second: image references: ``"name/name_0004"`` (LFW: folder and number, no
            extension) or a path relative to the image folder (CSV lists).
        same: True for a same-person pair.
    """

    line: int
    text: str
    first: str
    second: str
    same: bool


@dataclass
class PairList:
    """The pairs of one file, in file order, and how many folds the file declares."""

    path: Path
    pairs: list[PairSpec]
    n_folds: int = 10
    format: str = "lfw"  # "lfw" | "csv"

    @property
    def issame(self) -> np.ndarray:
        return np.array([p.same for p in self.pairs], dtype=bool)

    def __len__(self) -> int:
        return len(self.pairs)


def _lfw_ref(name: str, number: str, path: Path, line_no: int, text: str) -> str:
    if not number.isdigit():
        raise ValueError(f"{path} line {line_no}: {text.strip()!r}: image number {number!r} is not an integer")
    return f"{name}/{name}_{int(number):04d}"


def _read_lfw(path: Path, lines: list[str], n_folds: int | None) -> PairList:
    pairs: list[PairSpec] = []
    declared_folds = None
    for line_no, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split()
        if not pairs and declared_folds is None and len(fields) <= 2 and all(f.isdigit() for f in fields):
            # Header: "10 300" = 10 folds of 300 same + 300 different pairs; "500" = one set.
            declared_folds = int(fields[0]) if len(fields) == 2 else 1
            continue
        if len(fields) == 3:
            name, n1, n2 = fields
            pairs.append(PairSpec(line_no, text, _lfw_ref(name, n1, path, line_no, text),
                                  _lfw_ref(name, n2, path, line_no, text), True))
        elif len(fields) == 4:
            name1, n1, name2, n2 = fields
            pairs.append(PairSpec(line_no, text, _lfw_ref(name1, n1, path, line_no, text),
                                  _lfw_ref(name2, n2, path, line_no, text), False))
        else:
            raise ValueError(
                f"{path} line {line_no}: {text!r} has {len(fields)} fields; LFW pair lines are "
                f"'name n1 n2' (same person) or 'name1 n1 name2 n2' (different people)"
            )
    folds = n_folds or (declared_folds if declared_folds and declared_folds > 1 else 10)
    return PairList(path, pairs, folds, "lfw")


def _read_csv(path: Path, text: str, n_folds: int | None) -> PairList:
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise ValueError(f"{path} is empty")
    header = [h.strip().lower() for h in rows[0]]
    try:
        col_a = next(i for i, h in enumerate(header) if h in ("file_x", "img1", "image1", "file1", "a"))
        col_b = next(i for i, h in enumerate(header) if h in ("file_y", "img2", "image2", "file2", "b"))
        col_label = next(i for i, h in enumerate(header) if h in ("decision", "label", "issame", "same", "match"))
    except StopIteration:
        raise ValueError(
            f"{path} line 1: header {rows[0]} lacks the columns of a pair list; expected "
            f"file_x,file_y,Decision (deepface master.csv) or img1,img2,label"
        ) from None
    pairs = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) <= max(col_a, col_b, col_label):
            raise ValueError(f"{path} line {line_no}: {','.join(row)!r} has too few columns for {rows[0]}")
        label = row[col_label].strip().lower()
        if label not in _YES | _NO:
            raise ValueError(f"{path} line {line_no}: label {row[col_label]!r} is neither Yes nor No")
        pairs.append(PairSpec(line_no, ",".join(row), row[col_a].strip(), row[col_b].strip(), label in _YES))
    return PairList(path, pairs, n_folds or 10, "csv")


def read_pairs(path: str | os.PathLike, *, n_folds: int | None = None) -> PairList:
    """Parse a pair list: LFW ``pairs.txt`` or a CSV such as deepface's ``master.csv``.

    Args:
        path: the file. CSV is recognised by a ``.csv`` suffix or a comma in the first line.
        n_folds: override the number of folds (LFW files declare theirs in the header;
            default 10).

    Returns:
        A :class:`PairList` in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed line (its number and text are in the message), or no pairs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pair list {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    first = next((line for line in text.splitlines() if line.strip()), "")
    if path.suffix.lower() == ".csv" or "," in first:
        pairs = _read_csv(path, text, n_folds)
    else:
        pairs = _read_lfw(path, text.splitlines(), n_folds)
    if not pairs.pairs:
        raise ValueError(f"{path} holds no pairs")
    if pairs.n_folds < 2 or pairs.n_folds > len(pairs.pairs):
        raise ValueError(f"{path}: cannot make {pairs.n_folds} folds from {len(pairs.pairs)} pairs")
    return pairs


def _index_images(image_dir: Path) -> dict[str, Path]:
    """relative path and relative path without extension -> file (exact names win)."""
    index: dict[str, Path] = {}
    files = list_images(image_dir)
    for path in files:
        relative = path.relative_to(image_dir).as_posix()
        index.setdefault(relative, path)
    for path in files:
        stem = path.relative_to(image_dir).with_suffix("").as_posix()
        index.setdefault(stem, path)
    return index


def _strip_image_suffix(ref: str) -> str:
    return Path(ref).with_suffix("").as_posix() if Path(ref).suffix.lower() in IMAGE_EXTENSIONS else ref


def _outside_reference(ref: str, image_dir: Path) -> Path | None:
    """The file an absolute or ``..``-climbing reference names (with or without its extension), or None."""
    candidate = Path(os.path.normpath(ref if Path(ref).is_absolute() else image_dir / ref))
    if candidate.is_file():
        return candidate
    if candidate.parent.is_dir():  # an aligned copy of a photo: same stem, another extension
        stem = _strip_image_suffix(candidate.name)
        for extension in IMAGE_EXTENSIONS:
            if (candidate.parent / (stem + extension)).is_file():
                return candidate.parent / (stem + extension)
    return None


def resolve_pairs(pairs: PairList, image_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Map every pair onto two image files under ``image_dir``.

    A reference matches a file by its relative path, or by its relative path without the
    extension (so ``img20.jpg`` and LFW's ``name/name_0004`` find aligned ``.png`` crops, and
    ``x.jpg`` finds the crop ``x.jpg.png`` that :func:`mnapps.data.align.align_folder` writes
    when ``x.jpg`` and ``x.png`` share a folder). A reference that is absolute or climbs out of
    ``image_dir`` with ``..`` is still read (some tools write absolute paths), and one
    :class:`UserWarning` says how many there were.

    Raises:
        FileNotFoundError: ``image_dir`` is not a folder.
        ValueError: a reference has no image; names the pair file, line and text, and says
            whether the alignment step reported the image as having no face.
    """
    image_dir = Path(image_dir)
    index = _index_images(image_dir)
    no_face = set()
    report = image_dir / "no_face.txt"
    if report.is_file():
        no_face = {_strip_image_suffix(line.split("\t")[0]) for line in report.read_text().splitlines() if line}
    resolved, outside = [], []
    for pair in pairs.pairs:
        found = []
        for ref in (pair.first, pair.second):
            escapes = Path(ref).is_absolute() or ".." in Path(ref).parts
            path = _outside_reference(ref, image_dir) if escapes else index.get(ref) or index.get(_strip_image_suffix(ref))
            if path is None:
                hint = (f"; the alignment step found no face in it (listed in {report})"
                        if _strip_image_suffix(ref) in no_face
                        else f" (looked for {ref!r} with any of {', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
                raise ValueError(f"{pairs.path} line {pair.line}: {pair.text!r}: no image for {ref!r} in {image_dir}{hint}")
            if escapes:
                outside.append(ref)
            found.append(path)
        resolved.append((found[0], found[1]))
    if outside:
        warnings.warn(
            f"{pairs.path}: {len(outside)} image reference(s) are absolute or climb out of {image_dir} with '..' "
            f"(first: {outside[0]!r}); they were read from where they point",
            UserWarning, stacklevel=2,
        )
    return resolved


# ------------------------------------------------------------------------------------------
# metrics on distances (numpy; a pair is "same" when distance < threshold)


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


# ------------------------------------------------------------------------------------------
# embeddings


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
        model: a face embedder, :class:`mnapps.distill.teacher.FacenetTeacher`, or any module
            mapping ``[N, 3, S, S]`` images in [0, 1] to ``[N, D]``; its train/eval mode is
            restored afterwards.
        images: a :class:`~mnapps.data.faces.FaceFolder` (its own transform applies) or image
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


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, *, title: str = "ROC") -> Path:
    """Write ROC curves (TAR against FAR, one per model) to a PNG with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    for label, (far, tar) in curves.items():
        axis.step(far, tar, where="post", label=f"{label} (AUC {roc_auc(far, tar):.4f})")
    axis.plot([0, 1], [0, 1], color="0.8", linestyle="--", linewidth=0.8)
    axis.set_xlabel("false accept rate (different-person pairs accepted)")
    axis.set_ylabel("true accept rate (same-person pairs accepted)")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.01)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def format_verification_table(
    results: dict[str, dict], *, agreement: float | None = None, spreads: dict[str, dict] | None = None
) -> str:
    """A side-by-side text table of :func:`verification_metrics` results (one column per model).

    ``spreads`` (label -> :func:`embedding_spread`) adds the collapse guard's two rows;
    ``agreement`` the mean student-teacher cosine under the first column."""
    labels = list(results)
    first = results[labels[0]]
    rows: list[tuple[str, list[str]]] = [
        (f"{first['pairs']} pairs ({first['same_pairs']} same / {first['different_pairs']} different)", [""] * len(labels)),
        (f"accuracy, {len(first['fold_accuracies'])}-fold (mean ± std)",
         [f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}" for r in results.values()]),
    ]
    rows.append((f"accuracy of always answering {first['majority_answer']!r}",
                 [f"{r['majority_accuracy']:.4f}" for r in results.values()]))
    if "accuracy_at_threshold" in first:
        rows.append((f"accuracy at distance < {first['threshold']:g}",
                     [f"{r['accuracy_at_threshold']:.4f}" for r in results.values()]))
    rows += [
        ("ROC AUC", [f"{r['auc']:.4f}" for r in results.values()]),
        ("EER (threshold)", [f"{r['eer']:.4f} ({r['eer_threshold']:.3f})" for r in results.values()]),
    ]
    notes = []
    for key in first["tar_at_far"]:
        values = [r["tar_at_far"][key] for r in results.values()]
        if all(v is None for v in values):
            rows.append((f"TAR @ FAR={key}", ["n/a"] * len(labels)))
            notes.append(f"TAR @ FAR={key}: {first['tar_at_far_notes'][key]}")
        else:
            rows.append((f"TAR @ FAR={key}", ["n/a" if v is None else f"{v:.4f}" for v in values]))
    if spreads:
        rows.append(("spread: mean pairwise cosine",
                     [f"{spreads[k]['mean_pairwise_cosine']:.4f}" if k in spreads else "" for k in labels]))
        rows.append(("spread: effective rank",
                     [f"{spreads[k]['effective_rank']:.2f}" if k in spreads else "" for k in labels]))
    if agreement is not None:
        rows.append(("mean student-teacher cosine", [f"{agreement:.4f}"] + [""] * (len(labels) - 1)))
    width = max(len(name) for name, _ in rows) + 2
    columns = [max(len(label), *(len(v[i]) for _, v in rows)) + 2 for i, label in enumerate(labels)]
    lines = ["".ljust(width) + "".join(label.rjust(c) for label, c in zip(labels, columns))]
    lines += [name.ljust(width) + "".join(v.rjust(c) for v, c in zip(values, columns)) for name, values in rows]
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines)
