"""Who is in a face crop, and splits that keep every person on one side.

This module owns the identity-disjoint protocol of the face code. A student distilled on a few
dozen faces and scored on pairs of the *same* people measures memory, not generalisation, so
every split the face tools make (training / held-out / test pairs) is by person:

* :func:`name_from_identity`: a person's name where the files say it: the crop's own folder
  (``knn_examples/train/obama/obama2.png`` -> ``obama``; LFW's ``name/name_0004``; VGGFace2's
  ``n000002/``), unless that folder is a generic one such as ``test_images/`` or ``train/``
  (:data:`GENERIC_FOLDERS`), or the crop lies at the top of its root (deepface's flat
  ``img12.png``): then the files do not say who it is.
* :func:`person_labels`: one label per crop, joining crops that share a name, groups of crops
  whose teacher embeddings lie closer than the same-person threshold on average
  (:data:`mnapps.choices.SAME_PERSON_DISTANCE`; average linkage, because single linkage chains: on the shared
  photos, links below 1.1 alone joined Obama, Biden, Kit Harington and Matt Damon into one
  "person"), and pairs a pair list labels "same". Joining is transitive (union find), so a
  person split over several folders or names ends up in one group. Wrongly merging two people
  only makes a split coarser; wrongly separating one person would leak them across it.
* :func:`split_by_person` holds out whole persons (:func:`mnapps.tasks.face.data.faces.split_holdout` with
  the labels as groups) and :func:`check_person_disjoint` raises if any person is on both sides.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from mnapps.choices import SAME_PERSON_DISTANCE

from .faces import split_holdout

__all__ = [
    "GENERIC_FOLDERS",
    "name_from_identity",
    "person_labels",
    "split_by_person",
    "check_person_disjoint",
]

#: Folder names that hold photos of several people and so name nobody.
GENERIC_FOLDERS = frozenset({
    "", ".", "train", "test", "val", "valid", "validation", "dev", "test_images", "train_images", "images", "imgs",
    "photos", "pictures", "data", "dataset", "faces", "aligned", "crops", "knn_examples", "unknown", "misc",
})


#: Teacher-distance grouping keeps an N x N distance matrix; beyond this, identity folders are needed.
MAX_LINKED_CROPS = 20000


def name_from_identity(identity: str) -> str | None:
    """The person a crop's folder names (its last part, lower-cased), or None when it names nobody.

    ``identity`` is the crop's folder relative to its root
    (:attr:`mnapps.tasks.face.data.faces.FaceFolder.identities`): ``""`` for a crop at the top.
    """
    last = PurePosixPath(identity).name.strip().lower() if identity else ""
    return None if last in GENERIC_FOLDERS else last


class _UnionFind:
    def __init__(self, count: int) -> None:
        self.parent = list(range(count))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def _average_linkage_merges(embeddings: Tensor, threshold: float) -> list[tuple[int, int]]:
    """The merges of average-linkage clustering (UPGMA) that happen below ``threshold``."""
    rows = embeddings.detach().double().cpu()
    distances = torch.cdist(rows, rows).numpy()
    distances[np.isnan(distances)] = np.inf  # an unreadable crop joins nothing
    np.fill_diagonal(distances, np.inf)
    sizes = np.ones(len(distances))
    merges = []
    while True:
        i, j = np.unravel_index(int(np.argmin(distances)), distances.shape)
        if not distances[i, j] < threshold:
            return merges
        merges.append((int(i), int(j)))
        merged = (distances[i] * sizes[i] + distances[j] * sizes[j]) / (sizes[i] + sizes[j])
        distances[i], distances[:, i] = merged, merged
        distances[i, i] = np.inf
        distances[j], distances[:, j] = np.inf, np.inf
        sizes[i] += sizes[j]


def person_labels(
    names: Sequence[str | None],
    embeddings: Tensor | None = None,
    *,
    keys: Sequence[str] | None = None,
    threshold: float = SAME_PERSON_DISTANCE,
    same_pairs: Iterable[tuple[int, int]] = (),
) -> list[str]:
    """One person label per crop: shared names, teacher distances and labelled pairs, joined.

    Args:
        names: the name the files give each crop (:func:`name_from_identity`), or None.
        embeddings: ``[N, D]`` unit teacher embeddings of the same crops (rows with NaN join
            nothing), or None to use names only.
        keys: one string per crop, used to label a group without a name (default: its index).
        threshold: groups of crops closer than this (L2) on average are one person; applies to
            named and unnamed crops alike, so a person filed under two names or none is one group.
        same_pairs: index pairs known to show one person (a pair list's "same" lines).

    Returns:
        Labels in crop order: the group's name (several names in one group are joined with
        ``+`` in alphabetical order, e.g. ``john+kit_harington``), or ``?<key of its first
        crop>`` for a group no file names.

    Raises:
        ValueError: lengths that do not match, or a pair index out of range.
    """
    count = len(names)
    if embeddings is not None and embeddings.shape[0] != count:
        raise ValueError(f"{embeddings.shape[0]} embeddings for {count} crops")
    if keys is not None and len(keys) != count:
        raise ValueError(f"{len(keys)} keys for {count} crops")
    groups = _UnionFind(count)
    first_of_name: dict[str, int] = {}
    for i, name in enumerate(names):
        if name:
            groups.union(first_of_name.setdefault(name, i), i)
    for i, j in same_pairs:
        if not (0 <= i < count and 0 <= j < count):
            raise ValueError(f"same-person pair ({i}, {j}) is out of range for {count} crops")
        groups.union(i, j)
    if embeddings is not None and count > MAX_LINKED_CROPS:
        raise ValueError(f"joining {count} crops by teacher distance needs a {count} x {count} matrix; above "
                         f"{MAX_LINKED_CROPS} crops, file them in identity folders (names need no teacher)")
    if embeddings is not None and count > 1:
        for i, j in _average_linkage_merges(embeddings, threshold):
            groups.union(i, j)
    members: dict[int, list[int]] = {}
    for i in range(count):
        members.setdefault(groups.find(i), []).append(i)
    labels = [""] * count
    for root, items in members.items():
        found = sorted({names[i] for i in items if names[i]})
        if found:
            label = "+".join(found)
        else:
            label = "?" + (keys[root] if keys is not None else str(root))
        for i in items:
            labels[i] = label
    return labels


def split_by_person(labels: Sequence[str], val_fraction: float, *, seed: int = 0) -> tuple[list[int], list[int]]:
    """Hold out about ``val_fraction`` of the *persons* (whole groups of :func:`person_labels`).

    Returns:
        ``(train_indices, val_indices)``, sorted, with no label on both sides.

    Raises:
        ValueError: fewer than two persons, or a fraction outside (0, 1).
    """
    train, val = split_holdout(len(labels), val_fraction, seed=seed, groups=list(labels))
    check_person_disjoint([labels[i] for i in train], [labels[i] for i in val])
    return train, val


def check_person_disjoint(first: Iterable[str], second: Iterable[str], *, what: str = "training and held-out") -> None:
    """Raise ValueError naming the persons found on both sides of a split."""
    shared = sorted(set(first) & set(second))
    if shared:
        more = f" and {len(shared) - 5} more" if len(shared) > 5 else ""
        raise ValueError(f"{what} crops share {len(shared)} person(s): {', '.join(shared[:5])}{more}")
