"""Face pair lists: reading LFW ``pairs.txt`` and CSV pair lists, and finding their images.

This module owns what a verification benchmark's pair file says: :func:`read_pairs` parses
LFW's ``pairs.txt`` (optional header ``folds [pairs-per-half]``, same-person lines
``name n1 n2`` and different-person lines ``name1 n1 name2 n2``) and CSV pair lists such as
deepface's ``master.csv`` (``file_x,file_y,Decision`` with Yes/No); :func:`resolve_pairs` maps
every pair onto image files and names the offending line when a name or number has no image
(LFW's ``name/name_0004.jpg`` layout; an aligned copy whose files became ``.png`` is matched by
its stem).
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnapps.tasks.face.data.faces import IMAGE_EXTENSIONS, list_images

__all__ = ["PairSpec", "PairList", "read_pairs", "resolve_pairs"]

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
    ``x.jpg`` finds the crop ``x.jpg.png`` that :func:`mnapps.tasks.face.data.align.align_folder` writes
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
