"""COCO-format detection datasets: any annotation JSON + image folder -> tensors and targets.

This module owns reading detection data in the COCO format (COCO 2017 itself, users' exports
from labelling tools, and the embedded synthetic dataset of :mod:`mnapps.data.synthetic_det`)
and making real-world files safe to train on:

* the annotations live in the compact, cached :class:`mnapps.data.coco_index.CocoIndex`
  (numpy arrays, no Python object per image), so the first run parses the JSON and later runs
  start in well under a second even on COCO train, and forked DataLoader workers never copy
  the parent's pages by touching per-image objects: their memory stays flat across epochs;
* category ids need not be contiguous (COCO's run 1..90 with gaps): they are mapped, in
  ascending id order, to contiguous labels ``1..K`` (0 is the background, as torchvision
  detectors expect) and back (``label_to_cat_id``), so results files carry the original ids;
* images without annotations are kept as pure background; ``iscrowd`` boxes are never
  positives (dropped, as torchvision's and detectron2's COCO readers do); boxes are clipped to
  the image and dropped when thinner than ``min_box_size`` pixels (or non-finite). All of that
  happens once at construction (vectorised over all boxes) and is counted in
  :attr:`CocoDetection.box_stats`;
* images load through :func:`mnapps.data.image_io.load_rgb` (grayscale, RGBA, 16-bit, EXIF
  orientation); an unreadable image is warned about once, counted, and its sample is ``None``,
  which :func:`collate_fn` drops, so one bad file never stops a long run;
* a missing annotation file or image folder, malformed JSON, and annotations referencing
  unknown images or categories are clear errors at construction naming the file and the fix;
* a ``file_name`` that is absolute or climbs out of the image folder with ``..`` is an error
  naming the entry (it could read any file, or a validation image into training), unless the
  user sets ``MNAPPS_ALLOW_OUTSIDE_PATHS=1`` (:func:`mnapps.files.inside_folder`).

Sample contract: ``dataset[i]`` is ``(image, target)`` with ``image: FloatTensor[3, H, W]`` in
[0, 1] and ``target = {"boxes": FloatTensor[N, 4] (x1, y1, x2, y2) in pixels of that image,
"labels": Int64Tensor[N] in 1..K, "image_id": int}``, or ``None`` for an unreadable image.
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from mnapps.data.coco_index import CocoIndex, blob_string, load_coco_index, load_coco_json
from mnapps.data.image_io import ImageReadError, load_rgb
from mnapps.data.transforms import sample_to_tensors
from mnapps.files import inside_folder

__all__ = ["CocoDetection", "BoxStats", "collate_fn", "load_coco_json"]

Sample = tuple[Tensor, dict[str, Any]]
#: ``(image uint8[H,W,3], boxes float32[N,4] xyxy, labels int64[N]) -> (image, boxes, labels)``.
DetTransformFn = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[Tensor, Tensor, Tensor]]

# How many leading images are checked for existence at start-up: if none of them is in the image
# folder the folder is wrong (a common slip: passing coco/ instead of coco/train2017/).
_IMAGE_DIR_PROBE = 8


@dataclass
class BoxStats:
    """What construction did to the annotations of the selected images (counts)."""

    images: int = 0
    images_without_boxes: int = 0
    annotations: int = 0
    kept: int = 0
    crowd: int = 0
    degenerate: int = 0
    clipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class CocoDetection(Dataset):
    """A COCO-format detection dataset for torchvision-style detectors.

    Args:
        ann_file: COCO-format annotation JSON. Its index is cached beside it (or in the user
            cache) on first use; see :mod:`mnapps.data.coco_index`.
        image_dir: folder the images' ``file_name`` entries are relative to.
        transforms: ``(image uint8[H,W,3], boxes float32[N,4] xyxy pixels, labels int64[N]) ->
            (FloatTensor[3,H',W'] in [0,1], FloatTensor[N',4], Int64Tensor[N'])``, e.g.
            :func:`mnapps.data.transforms.build_det_transforms`. ``None`` only converts to tensors.
        image_ids: optional subset (and order) of image ids; default all images, sorted by id.
        min_box_size: boxes narrower or shorter than this many pixels (after clipping to the
            image) are dropped as degenerate.

    Attributes:
        coco: the pycocotools ``COCO`` index of the whole file (ground truth for COCOeval),
            built from the JSON on first access and then kept; training never touches it.
        ids: image ids of the samples, in sample order (images without annotations included).
        cat_ids: category ids in ascending order; ``cat_ids[label - 1]`` is the label's id.
        cat_id_to_label / label_to_cat_id: the contiguous-label mapping (labels ``1..K``).
        class_names: ``class_names[label]``; ``class_names[0] == "__background__"``.
        num_classes: ``K + 1`` (background included), what torchvision detectors take.
        box_stats: :class:`BoxStats` of what construction kept, dropped and clipped.
        unreadable_ids: ids of images that failed to load in this process.

    Raises:
        FileNotFoundError: missing annotation file or image folder, or an image folder that
            holds none of the first images the file lists.
        ValueError: malformed annotation file (see :func:`load_coco_json`), unknown ``image_ids``,
            or a bad ``min_box_size``.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        transforms: DetTransformFn | None = None,
        *,
        image_ids: Iterable[int] | None = None,
        min_box_size: float = 1.0,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        if not (math.isfinite(min_box_size) and min_box_size >= 0):
            raise ValueError(f"min_box_size must be a finite number of pixels >= 0, got {min_box_size}")
        self.min_box_size = float(min_box_size)

        index = load_coco_index(self.ann_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"image folder {self.image_dir} (for {self.ann_file}) not found; pass the folder that "
                "holds the files named in the annotation file's 'file_name' entries (e.g. coco/val2017)"
            )
        self._coco: COCO | None = None

        names = index.category_names()
        self.cat_ids: list[int] = sorted(names)
        self.cat_id_to_label: dict[int, int] = {cat_id: i + 1 for i, cat_id in enumerate(self.cat_ids)}
        self.label_to_cat_id: dict[int, int] = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        self.class_names: list[str] = ["__background__"] + [names[c] for c in self.cat_ids]
        self.num_classes: int = len(self.class_names)

        # Image id -> position in the index through a sorted copy (no per-image dict to share).
        self._sorted_order = np.argsort(index.image_ids, kind="stable")
        self._sorted_ids = index.image_ids[self._sorted_order]
        if image_ids is None:
            self.ids: list[int] = self._sorted_ids.tolist()
        else:
            self.ids = [int(i) for i in image_ids]
            unknown = [i for i in self.ids if not self._known(i)]
            if unknown:
                raise ValueError(f"image_ids {unknown[:10]}{' ...' if len(unknown) > 10 else ''} "
                                 f"({len(unknown)} in all) are not in {self.ann_file}; pass ids of its 'images'")
        # Per sample: image id and index position; the image's name and size stay in the index's arrays.
        self._sample_ids = np.asarray(self.ids, dtype=np.int64).reshape(-1)
        self._positions = self._sorted_order[np.searchsorted(self._sorted_ids, self._sample_ids)]
        self._file_names, self._file_name_offsets = index.file_names, index.file_name_offsets
        self._widths, self._heights = index.widths, index.heights
        self._check_file_names(index.image_ids)
        self._check_image_dir()

        self.box_stats = BoxStats()
        self._boxes, self._labels, self._box_offsets = self._sanitise_annotations(index)
        self.unreadable_ids: set[int] = set()
        self._size_warned: set[int] = set()

    # ----------------------------------------------------------------------------- construction
    def _known(self, image_id: int) -> bool:
        i = int(np.searchsorted(self._sorted_ids, image_id))
        return i < len(self._sorted_ids) and int(self._sorted_ids[i]) == image_id

    def _position(self, image_id: int) -> int:
        if not self._known(int(image_id)):
            raise KeyError(f"image id {image_id} is not in {self.ann_file}")
        return int(self._sorted_order[np.searchsorted(self._sorted_ids, int(image_id))])

    def _file_name(self, position: int) -> str:
        return blob_string(self._file_names, self._file_name_offsets, position)

    def _check_file_names(self, image_ids: np.ndarray) -> None:
        """Every selected image's ``file_name`` stays inside ``image_dir`` (see :func:`inside_folder`)."""
        for position in np.unique(self._positions).tolist():
            problem = inside_folder(self._file_name(position), source=str(self.ann_file),
                                    field=f"images[{position}] (id {int(image_ids[position])}) file_name")
            if problem:
                raise ValueError(problem)

    def _check_image_dir(self) -> None:
        probe = self._positions[:_IMAGE_DIR_PROBE]
        if len(probe) and not any((self.image_dir / self._file_name(int(p))).exists() for p in probe):
            first = self._file_name(int(probe[0]))
            raise FileNotFoundError(
                f"image folder {self.image_dir} holds none of the first {len(probe)} images listed in "
                f"{self.ann_file} (e.g. {first!r}); pass the folder those file names are relative to"
            )

    def _sanitise_annotations(self, index: CocoIndex) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (xyxy, clipped) and labels of every sample, dropping crowd and degenerate boxes.

        Vectorised over all annotations of the selected images, with the arithmetic of a
        per-box reading: float64 ``x + w``, clipping that keeps a coordinate unless it is past
        the bound, comparisons on the clipped doubles, then float32.

        Returns:
            ``(boxes float32[K, 4], labels int64[K], offsets int64[len(self) + 1])``; sample ``i``
            owns rows ``offsets[i]:offsets[i + 1]``.
        """
        starts, ends = index.ann_offsets[self._positions], index.ann_offsets[self._positions + 1]
        counts = ends - starts
        sample_of_row = np.repeat(np.arange(len(self._positions)), counts)
        # Row r of the selection is annotation starts[sample] + (r - first row of that sample).
        first_row = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=first_row[1:])
        rows = starts[sample_of_row] + (np.arange(int(first_row[-1])) - first_row[:-1][sample_of_row])

        crowd = index.iscrowd[rows]
        x, y, w, h = index.bboxes[rows].T
        box = np.stack([x, y, x + w, y + h], axis=1)
        finite = np.isfinite(box).all(axis=1)
        # An unknown width/height clips only at 0 (the bound is +inf).
        bound_x = np.nan_to_num(self._widths[self._positions][sample_of_row], nan=np.inf)
        bound_y = np.nan_to_num(self._heights[self._positions][sample_of_row], nan=np.inf)
        bounds = np.stack([bound_x, bound_y, bound_x, bound_y], axis=1)
        with np.errstate(invalid="ignore"):
            clipped = np.where(box < 0.0, 0.0, box)
            clipped = np.where(bounds < clipped, bounds, clipped)
            small = ((clipped[:, 2] - clipped[:, 0]) < self.min_box_size) | (
                (clipped[:, 3] - clipped[:, 1]) < self.min_box_size)
            changed = (clipped != box).any(axis=1)
        usable = ~crowd & finite
        kept = usable & ~small

        kept_per_sample = np.bincount(sample_of_row[kept], minlength=len(self._positions))
        stats = self.box_stats
        stats.images += len(self._positions)
        stats.annotations += len(rows)
        stats.crowd += int(crowd.sum())  # crowd regions are "ignore" areas, never positives
        stats.degenerate += int((~crowd & ~kept).sum())  # also boxes entirely outside the image
        stats.clipped += int((kept & changed).sum())
        stats.kept += int(kept.sum())
        stats.images_without_boxes += int((kept_per_sample == 0).sum())

        # Label = 1 + rank of the category id among the ascending ids (validation saw every id).
        labels = np.searchsorted(np.sort(index.cat_ids), index.category_ids[rows[kept]]) + 1
        offsets = np.zeros(len(self._positions) + 1, dtype=np.int64)
        np.cumsum(kept_per_sample, out=offsets[1:])
        return clipped[kept].astype(np.float32), labels.astype(np.int64), offsets

    # ----------------------------------------------------------------------------- access
    @property
    def coco(self) -> COCO:
        """The pycocotools ``COCO`` of the whole file, parsed from the JSON on first access."""
        if self._coco is None:
            coco = COCO()
            coco.dataset = load_coco_json(self.ann_file)
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
                coco.createIndex()
            self._coco = coco
        return self._coco

    def __getstate__(self) -> dict[str, Any]:
        # Workers started by spawn get the arrays, not a COCO object they would never use.
        state = self.__dict__.copy()
        state["_coco"] = None
        return state

    def __len__(self) -> int:
        return len(self._sample_ids)

    def _sample(self, index: int) -> int:
        index = operator.index(index)
        size = len(self._sample_ids)
        if not -size <= index < size:
            raise IndexError(f"sample index {index} out of range for {size} samples")
        return index % size

    def image_path(self, image_id: int) -> Path:
        """Path of an image's file (``image_dir / file_name``)."""
        return self.image_dir / self._file_name(self._position(image_id))

    def _expected_size(self, position: int) -> tuple[int | float, int | float] | None:
        width, height = float(self._widths[position]), float(self._heights[position])
        if math.isnan(width) or math.isnan(height):
            return None
        return (int(width) if width.is_integer() else width, int(height) if height.is_integer() else height)

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sanitised ``(boxes float32[N,4] xyxy, labels int64[N])`` of sample ``index`` (no image I/O)."""
        i = self._sample(index)
        start, end = self._box_offsets[i], self._box_offsets[i + 1]
        return self._boxes[start:end].copy(), self._labels[start:end].copy()

    def __getitem__(self, index: int) -> Sample | None:
        i = self._sample(index)
        image_id = int(self._sample_ids[i])
        position = int(self._positions[i])
        path = self.image_dir / self._file_name(position)
        expected = self._expected_size(position)
        try:
            image = self._load_image(path, expected)
        except ImageReadError as err:
            if image_id not in self.unreadable_ids:
                self.unreadable_ids.add(image_id)
                warnings.warn(f"skipping unreadable image (id {image_id}): {err}", RuntimeWarning, stacklevel=2)
            return None
        boxes, labels = self.annotations(i)
        height, width = image.shape[:2]
        if expected != (width, height):  # sizes unknown in the file, or wrong
            boxes, labels = self._fit_to_real_size(image_id, path, expected, boxes, labels, width, height)
        if self.transforms is None:
            image_t, boxes_t, labels_t = sample_to_tensors(image, boxes, labels)
        else:
            image_t, boxes_t, labels_t = self.transforms(image, boxes, labels)
        return image_t, {"boxes": boxes_t, "labels": labels_t, "image_id": image_id}

    def _load_image(self, path: Path, expected: tuple[int | float, int | float] | None) -> np.ndarray:
        """Decode one image (the one step a subclass may replace, e.g. to measure without pixels)."""
        return load_rgb(path, expected_size=expected)

    def _fit_to_real_size(
        self, image_id: int, path: Path, expected: tuple[int, int] | None, boxes: np.ndarray, labels: np.ndarray,
        width: int, height: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Clip boxes to the real image when the file gives no size (silently) or a wrong one (warned)."""
        if expected is not None and image_id not in self._size_warned:
            self._size_warned.add(image_id)
            warnings.warn(
                f"{path} is {width}x{height} but {self.ann_file.name} says {expected[0]}x{expected[1]}; "
                "boxes are clipped to the real image (re-export the annotations if the images were resized)",
                RuntimeWarning, stacklevel=3,
            )
        clipped = np.stack([boxes[:, 0].clip(0, width), boxes[:, 1].clip(0, height),
                            boxes[:, 2].clip(0, width), boxes[:, 3].clip(0, height)], axis=1).reshape(-1, 4)
        keep = ((clipped[:, 2] - clipped[:, 0]) >= self.min_box_size) & (
            (clipped[:, 3] - clipped[:, 1]) >= self.min_box_size)
        return clipped[keep].astype(np.float32), labels[keep]

    # ----------------------------------------------------------------------------- reporting
    @property
    def num_unreadable(self) -> int:
        """Images that failed to load *in this process* (DataLoader workers keep their own count)."""
        return len(self.unreadable_ids)

    def summary(self, skipped_samples: int | None = None) -> str:
        """One line for the end of a run: images, boxes kept/dropped/clipped, unreadable images.

        Args:
            skipped_samples: samples the training loop skipped (sum of :func:`collate_fn`'s
                ``num_skipped``), which also covers DataLoader worker processes; when ``None``
                the unreadable images seen in this process are reported.
        """
        s = self.box_stats
        skipped = self.num_unreadable if skipped_samples is None else skipped_samples
        what = "unreadable images skipped" if skipped_samples is None else "unreadable samples skipped"
        return (f"{self.ann_file.name}: {s.images} images ({s.images_without_boxes} without boxes), "
                f"{s.kept}/{s.annotations} boxes kept; dropped {s.crowd} crowd and {s.degenerate} degenerate "
                f"(< {self.min_box_size:g} px or outside the image), clipped {s.clipped} to the image; "
                f"{skipped} {what}")

    def __repr__(self) -> str:
        return (f"CocoDetection(ann_file={str(self.ann_file)!r}, image_dir={str(self.image_dir)!r}, "
                f"images={len(self)}, classes={self.num_classes - 1})")


def collate_fn(batch: Sequence[Sample | None]) -> tuple[list[Tensor], list[dict[str, Any]], int]:
    """Batch detection samples as lists (images differ in size), dropping unreadable ones.

    Args:
        batch: samples from :class:`CocoDetection`; ``None`` marks an unreadable image.

    Returns:
        ``(images, targets, num_skipped)``: ``images[i]: FloatTensor[3, H_i, W_i]``, ``targets[i]``
        its target dict, and how many ``None`` samples were dropped (may leave empty lists).
    """
    images: list[Tensor] = []
    targets: list[dict[str, Any]] = []
    for sample in batch:
        if sample is not None:
            images.append(sample[0])
            targets.append(sample[1])
    return images, targets, len(batch) - len(images)

