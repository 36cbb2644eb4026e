"""The identity-disjoint protocol with a teacher: clean training pools and seen/unseen pair scoring.

This module owns the two places where the face code must know *who* is in a crop and only the
teacher can say it (the pure pieces are :mod:`mnapps.tasks.face.data.persons` and
:mod:`mnapps.tasks.face.data.face_check`):

* :func:`prepare_pool` turns the crops distillation was given into a clean, person-labelled
  pool: crops that are not faces are dropped (:class:`mnapps.tasks.face.data.face_check.FaceCheck`), so
  are crops of anyone in ``exclude`` (e.g. the evaluation's photos: a crop whose teacher
  embedding lies within the same-person distance of any of them), and every remaining crop gets
  a person label (folder names, joined by teacher distance) so the held-out split is by person.
* :func:`seen_pairs` says, for a pair list and a training set, which pairs involve a person seen
  in training: by name where both files say it (LFW's ``name/name_0004``, identity folders),
  else by the teacher's distance to the nearest training crop (below the same-person threshold),
  and through the list's own "same" pairs (a person seen in one photo is seen in all).
  :func:`score_subsets` scores the unseen and the seen pairs separately, so a student that only
  remembers its training people cannot pass for one that generalises.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mnapps.tasks.face.data.face_check import FaceCheck, face_scores
from mnapps.tasks.face.data.faces import FaceFolder
from mnapps.choices import SAME_PERSON_DISTANCE
from mnapps.tasks.face.data.persons import name_from_identity, person_labels
from mnapps.tasks.face.evaluation import PairList, embed_faces, verification_metrics

__all__ = ["PoolReport", "prepare_pool", "pair_image_name", "SeenPairs", "seen_pairs", "score_subsets",
           "read_training_set", "person_groups_by_name", "write_training_set", "mark_seen"]


@dataclass
class PoolReport:
    """What :func:`prepare_pool` kept and dropped (counts, and the dropped files' keys)."""

    given: int = 0
    not_faces: list[str] = field(default_factory=list)
    excluded_people: list[str] = field(default_factory=list)
    persons: int = 0

    def __str__(self) -> str:
        kept = self.given - len(self.not_faces) - len(self.excluded_people)
        return (f"{self.given} crops: {len(self.not_faces)} dropped as not faces, {len(self.excluded_people)} dropped "
                f"as people of the excluded set, {kept} kept, {self.persons} persons")


def prepare_pool(
    folder: FaceFolder,
    teacher: nn.Module,
    *,
    min_face_score: float = 0.0,
    exclude: Sequence[str | os.PathLike] = (),
    threshold: float = SAME_PERSON_DISTANCE,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[FaceFolder, list[str], PoolReport]:
    """Drop non-faces and excluded people from ``folder``; label the rest by person.

    Args:
        folder: every crop distillation was given.
        teacher: the teacher (unit embeddings).
        min_face_score: drop crops :class:`FaceCheck` scores below this (0: keep every crop).
        exclude: folders of crops whose people must not be trained on: a crop closer than
            ``threshold`` to any of them is dropped.
        threshold: the teacher's same-person L2 distance.

    Returns:
        ``(kept crops, their person labels, report)``.

    Raises:
        ValueError: nothing is left.
    """
    report = PoolReport(given=len(folder))
    keep = list(range(len(folder)))
    if min_face_score > 0:
        scores = face_scores(folder.files, FaceCheck(min_face_score, device=device))
        report.not_faces = [folder.keys[i] for i, s in enumerate(scores) if not s >= min_face_score]
        keep = [i for i, s in enumerate(scores) if s >= min_face_score]
    pool = folder.subset(keep)
    embeddings = embed_faces(teacher, pool, batch_size=batch_size, device=device, unreadable="nan")
    if exclude:
        others = embed_faces(teacher, FaceFolder(list(exclude), transform=folder.transform), batch_size=batch_size,
                             device=device, unreadable="nan")
        nearest = torch.cdist(embeddings, others[~torch.isnan(others).any(1)]).min(1).values
        kept_rows = [i for i in range(len(pool)) if not nearest[i] < threshold]
        report.excluded_people = [pool.keys[i] for i in range(len(pool)) if nearest[i] < threshold]
        pool, embeddings = pool.subset(kept_rows), embeddings[kept_rows]
    if len(pool) == 0:
        raise ValueError(f"no training crop is left: {report}")
    labels = person_labels([name_from_identity(i) for i in pool.identities], embeddings, keys=pool.keys,
                           threshold=threshold)
    report.persons = len(set(labels))
    return pool, labels, report


def pair_image_name(ref: str, fmt: str) -> str | None:
    """The person a pair list names for one image: LFW's ``name/name_0004`` -> ``name``; a CSV path's
    identity folder (``person/x.jpg`` -> ``person``); None when the reference names nobody."""
    parts = PurePosixPath(ref).parts
    if fmt == "lfw":
        return parts[0].lower() if parts else None
    return name_from_identity(PurePosixPath(ref).parent.as_posix()) if len(parts) > 1 else None


@dataclass
class SeenPairs:
    """Which pairs of a list involve a person seen in training (:func:`seen_pairs`)."""

    seen: np.ndarray  # bool per pair
    image_seen: list[bool]
    by_name: int  # images seen by name
    by_distance: int  # images seen by teacher distance (and not by name)
    by_same_pair: int  # images seen only through a labelled same pair with a seen image
    threshold: float
    train_crops: int

    def summary(self) -> dict[str, Any]:
        return {"pairs": int(self.seen.size), "seen_pairs": int(self.seen.sum()),
                "unseen_pairs": int((~self.seen).sum()), "images": len(self.image_seen),
                "images_seen": int(sum(self.image_seen)), "images_seen_by_name": self.by_name,
                "images_seen_by_teacher_distance": self.by_distance, "images_seen_by_same_pair": self.by_same_pair,
                "threshold": self.threshold, "train_crops": self.train_crops}

    def __str__(self) -> str:
        return (f"people seen in training ({self.train_crops} training crops): {int(sum(self.image_seen))} of "
                f"{len(self.image_seen)} images show one ({self.by_name} by name, {self.by_distance} by teacher "
                f"distance < {self.threshold:g}, {self.by_same_pair} through a same-person pair); "
                f"{int(self.seen.sum())} pairs involve one, {int((~self.seen).sum())} pairs do not (unseen)")


def seen_pairs(
    index_pairs: Sequence[tuple[int, int]],
    issame: np.ndarray,
    *,
    image_names: Sequence[str | None],
    train_names: set[str],
    image_embeddings: Tensor | None,
    train_embeddings: Tensor | None,
    threshold: float = SAME_PERSON_DISTANCE,
) -> SeenPairs:
    """Mark the pairs that involve a person seen in training.

    An image is seen when its name is a training name, or (embeddings given) its teacher
    embedding lies closer than ``threshold`` to some training crop's; then every image joined to
    a seen one by the list's own same-person pairs is seen too. A pair is seen when either image is.
    """
    count = len(image_names)
    by_name = [bool(name) and name in train_names for name in image_names]
    by_distance = [False] * count
    if image_embeddings is not None and train_embeddings is not None and len(train_embeddings):
        train = train_embeddings[~torch.isnan(train_embeddings).any(1)]
        nearest = torch.cdist(image_embeddings.float(), train.float()).min(1).values
        by_distance = [bool(d < threshold) for d in nearest.tolist()]
    direct = [a or b for a, b in zip(by_name, by_distance)]
    same = [pair for pair, label in zip(index_pairs, issame) if label]
    groups = person_labels([None] * count, None, same_pairs=same)
    seen_groups = {g for g, d in zip(groups, direct) if d}
    image_seen = [g in seen_groups for g in groups]
    seen = np.array([image_seen[i] or image_seen[j] for i, j in index_pairs], dtype=bool)
    train_crops = 0 if train_embeddings is None else int(train_embeddings.shape[0])
    return SeenPairs(seen, image_seen, sum(by_name), sum(d and not n for n, d in zip(by_name, by_distance)),
                     sum(s and not d for s, d in zip(image_seen, direct)), threshold, train_crops)


def score_subsets(distances: dict[str, np.ndarray], issame: np.ndarray, seen: SeenPairs, *, n_folds: int = 10,
                  fars: Sequence[float] = (), threshold: float | None = None) -> dict[str, dict[str, dict]]:
    """``{"unseen": {label: metrics}, "seen": {...}}`` of :func:`verification_metrics` on each part.

    A part without both same and different pairs is left out (no ROC to draw); the folds are
    capped at the part's size.
    """
    out: dict[str, dict[str, dict]] = {}
    for part, mask in (("unseen", ~seen.seen), ("seen", seen.seen)):
        labels = issame[mask]
        if labels.all() or not labels.any():
            continue
        folds = max(2, min(n_folds, int(mask.sum())))
        out[part] = {label: verification_metrics(d[mask], labels, n_folds=folds, fars=fars, threshold=threshold)
                     for label, d in distances.items()}
    return out


def read_training_set(sources: Sequence[str | os.PathLike]) -> FaceFolder:
    """The training crops of a student: folders of crops, and/or ``train_crops.txt`` files that
    ``tools/distill_face.py`` writes (one crop path per line, ``# identity`` after a tab)."""
    folders, files, identities = [], [], {}
    for source in sources:
        path = Path(source)
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    file, _, identity = line.partition("\t")
                    files.append(Path(file))
                    identities[Path(file)] = identity
        elif path.is_dir():
            folders.append(path)
        else:
            raise FileNotFoundError(f"training set {path} is neither a folder of crops nor a train_crops.txt")
    if files and folders:
        raise ValueError("give either folders of training crops or train_crops.txt files, not both")
    if folders:
        return FaceFolder(folders)
    if not files:
        raise ValueError("no training crops listed")
    folder = FaceFolder([files[0].parent], files=files)
    folder.identities = [identities[f] for f in files]
    return folder



def person_groups_by_name(folder: FaceFolder) -> list[str]:
    """Person labels from names alone (no teacher): a crop no folder names is its own group."""
    return [name_from_identity(identity) or f"?{key}" for identity, key in zip(folder.identities, folder.keys)]


def write_training_set(path: str | os.PathLike, folder: FaceFolder) -> None:
    """``train_crops.txt``: one training crop per line (absolute path, a tab, its identity folder),
    what ``tools/eval_face.py --train-data`` reads to tell seen people from unseen ones."""
    lines = [f"{Path(f).absolute()}\t{identity}" for f, identity in zip(folder.files, folder.identities)]
    Path(path).write_text("# training crops of this run: path<TAB>identity folder\n" + "\n".join(lines) + "\n")


def mark_seen(
    pairs: PairList,
    files: Sequence[Path],
    index_pairs: Sequence[tuple[int, int]],
    train_sources: Sequence[str | os.PathLike],
    teacher: nn.Module,
    *,
    image_embeddings: Tensor | None = None,
    threshold: float = SAME_PERSON_DISTANCE,
    image_size: int = 160,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> SeenPairs:
    """:func:`seen_pairs` for a resolved pair list and a student's training set.

    Args:
        pairs, files, index_pairs: the pair list, the image files it resolved to and each pair as
            indices into ``files`` (as :func:`mnapps.tasks.face.evaluate_face_verification` keeps them).
        train_sources: folders of training crops or ``train_crops.txt`` files (:func:`read_training_set`).
        teacher: embeds both sides; ``image_embeddings`` (the teacher's, of ``files``) saves a pass.
    """
    names: list[str | None] = [None] * len(files)
    for spec, (i, j) in zip(pairs.pairs, index_pairs):
        names[i] = names[i] or pair_image_name(spec.first, pairs.format)
        names[j] = names[j] or pair_image_name(spec.second, pairs.format)
    training = read_training_set(train_sources)
    train_names = {n for n in (name_from_identity(i) for i in training.identities) if n}
    if image_embeddings is None:
        image_embeddings = embed_faces(teacher, list(files), image_size=image_size, batch_size=batch_size,
                                       device=device, desc="embedding (teacher, pair images)")
    train_embeddings = embed_faces(teacher, training, batch_size=batch_size, device=device, unreadable="nan",
                                   desc="embedding (teacher, training crops)")
    return seen_pairs(index_pairs, pairs.issame, image_names=names, train_names=train_names,
                      image_embeddings=image_embeddings, train_embeddings=train_embeddings, threshold=threshold)
