"""COCO-format detection datasets: any annotation JSON + image folder -> tensors and targets.

This module owns reading detection data in the COCO format (COCO 2017 itself, users' exports
from labelling tools, and the embedded synthetic dataset of :mod:`mnapps.data.synthetic_det`)
with pycocotools, and making real-world files safe to train on:

* category ids need not be contiguous (COCO's run 1..90 with gaps): they are mapped, in
  ascending id order, to contiguous labels ``1..K`` (0 is the background, as torchvision
  detectors expect) and back (``label_to_cat_id``), so results files carry the original ids;
* images without annotations are kept as pure background; ``iscrowd`` boxes are never
  positives (dropped, as torchvision's and detectron2's COCO readers do); boxes are clipped to
  the image and dropped when thinner than ``min_box_size`` pixels (or non-finite). All of that
  happens once at construction and is counted in :attr:`CocoDetection.box_stats`;
* images load through :func:`mnapps.data.image_io.load_rgb` (grayscale, RGBA, 16-bit, EXIF
  orientation); an unreadable image is warned about once, counted, and its sample is ``None``,
  which :func:`collate_fn` drops, so one bad file never stops a long run;
* a missing annotation file or image folder, malformed JSON, and annotations referencing
  unknown images or categories are clear errors at construction naming the file and the fix.

Sample contract: ``dataset[i]`` is ``(image, target)`` with ``image: FloatTensor[3, H, W]`` in
[0, 1] and ``target = {"boxes": FloatTensor[N, 4] (x1, y1, x2, y2) in pixels of that image,
"labels": Int64Tensor[N] in 1..K, "image_id": int}``, or ``None`` for an unreadable image.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from mnapps.data.image_io import ImageReadError, load_rgb
from mnapps.data.transforms import sample_to_tensors

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


def load_coco_json(ann_file: str | Path) -> dict[str, Any]:
    """Read and structurally validate a COCO-format annotation file.

    Args:
        ann_file: path to the JSON file (``images``, ``categories`` and optionally
            ``annotations`` lists, as COCO's ``instances_*.json``).

    Returns:
        The parsed dict, with ``annotations`` set to ``[]`` when the file has none
        (COCO's ``image_info_test*.json``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not JSON, or a required field is missing / malformed / refers to an unknown
            image or category; the message names the file, the entry and the fix.
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(
            f"COCO annotation file {ann_file} not found; pass the path of a COCO-format JSON "
            "(e.g. annotations/instances_val2017.json) or leave the data options out to use the "
            "embedded synthetic dataset"
        )
    try:
        with ann_file.open("rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{ann_file} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
            "the file is probably truncated or not an annotation file: re-download or re-export it"
        ) from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{ann_file} is not a UTF-8 JSON file ({err}); pass the COCO annotation JSON") from err
    _validate_coco_dict(data, ann_file)
    return data


def _fail(ann_file: Path, where: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"{ann_file}: {where} {problem}; {fix}")


def _validate_coco_dict(data: Any, ann_file: Path) -> None:
    """Check the fields mnapps and pycocotools rely on; raise ValueError naming the first problem."""
    if not isinstance(data, dict):
        raise _fail(ann_file, "the top level", f"is a {type(data).__name__}, not an object",
                    "a COCO file is an object with 'images', 'annotations' and 'categories' lists")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise _fail(ann_file, f"field {key!r}", "is missing or not a list",
                        "a COCO detection file needs 'images' and 'categories' lists")
    annotations = data.setdefault("annotations", [])
    if not isinstance(annotations, list):
        raise _fail(ann_file, "field 'annotations'", "is not a list", "export the annotations as a list")
    if not data["categories"]:
        raise _fail(ann_file, "field 'categories'", "is empty", "list at least one category {id, name}")

    image_ids: set[int] = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_int(img.get("id")) or not isinstance(img.get("file_name"), str):
            raise _fail(ann_file, f"images[{i}]", "lacks an integer 'id' or a string 'file_name'",
                        "every image entry needs both")
        if img["id"] in image_ids:
            raise _fail(ann_file, f"images[{i}]", f"repeats image id {img['id']}", "image ids must be unique")
        for key in ("width", "height"):
            if key in img and not (_is_number(img[key]) and img[key] > 0):
                raise _fail(ann_file, f"images[{i}] (id {img['id']})", f"has {key}={img[key]!r}",
                            "width/height must be positive pixel counts (or be left out)")
        image_ids.add(img["id"])

    cat_ids: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise _fail(ann_file, f"categories[{i}]", "lacks an integer 'id' or a string 'name'",
                        "every category entry needs both")
        if cat["id"] in cat_ids:
            raise _fail(ann_file, f"categories[{i}]", f"repeats category id {cat['id']}", "category ids must be unique")
        cat_ids.add(cat["id"])

    ann_ids: set[int] = set()
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise _fail(ann_file, f"annotations[{i}]", "lacks an integer 'id'",
                        "pycocotools indexes annotations by id; give each a unique integer id")
        where = f"annotations[{i}] (id {ann['id']})"
        if ann["id"] in ann_ids:
            raise _fail(ann_file, where, "repeats its id", "annotation ids must be unique")
        ann_ids.add(ann["id"])
        if ann.get("image_id") not in image_ids:
            raise _fail(ann_file, where, f"refers to image_id {ann.get('image_id')!r}, which is not in 'images'",
                        "fix the export or remove the annotation")
        if ann.get("category_id") not in cat_ids:
            raise _fail(ann_file, where, f"refers to category_id {ann.get('category_id')!r}, which is not in "
                        f"'categories' (ids {sorted(cat_ids)})", "fix the export or add the category")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise _fail(ann_file, where, f"has bbox={bbox!r}",
                        "a COCO bbox is [x, y, width, height] in pixels (4 numbers)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class CocoDetection(Dataset):
    """A COCO-format detection dataset for torchvision-style detectors.

    Args:
        ann_file: COCO-format annotation JSON.
        image_dir: folder the images' ``file_name`` entries are relative to.
        transforms: ``(image uint8[H,W,3], boxes float32[N,4] xyxy pixels, labels int64[N]) ->
            (FloatTensor[3,H',W'] in [0,1], FloatTensor[N',4], Int64Tensor[N'])``, e.g.
            :func:`mnapps.data.transforms.build_det_transforms`. ``None`` only converts to tensors.
        image_ids: optional subset (and order) of image ids; default all images, sorted by id.
        min_box_size: boxes narrower or shorter than this many pixels (after clipping to the
            image) are dropped as degenerate.

    Attributes:
        coco: the pycocotools ``COCO`` index of the whole file (ground truth for COCOeval).
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

        data = load_coco_json(self.ann_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"image folder {self.image_dir} (for {self.ann_file}) not found; pass the folder that "
                "holds the files named in the annotation file's 'file_name' entries (e.g. coco/val2017)"
            )
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
            self.coco.createIndex()

        self.cat_ids: list[int] = sorted(self.coco.cats)
        self.cat_id_to_label: dict[int, int] = {cat_id: i + 1 for i, cat_id in enumerate(self.cat_ids)}
        self.label_to_cat_id: dict[int, int] = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        self.class_names: list[str] = ["__background__"] + [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.num_classes: int = len(self.class_names)

        if image_ids is None:
            self.ids: list[int] = sorted(self.coco.imgs)
        else:
            self.ids = [int(i) for i in image_ids]
            unknown = [i for i in self.ids if i not in self.coco.imgs]
            if unknown:
                raise ValueError(f"image_ids {unknown[:10]}{' ...' if len(unknown) > 10 else ''} "
                                 f"({len(unknown)} in all) are not in {self.ann_file}; pass ids of its 'images'")
        self._check_image_dir()

        self.box_stats = BoxStats()
        self._targets: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for image_id in self.ids:
            self._targets[image_id] = self._sanitise_annotations(image_id)
        self.unreadable_ids: set[int] = set()
        self._size_warned: set[int] = set()

    # ----------------------------------------------------------------------------- construction
    def _check_image_dir(self) -> None:
        probe = self.ids[:_IMAGE_DIR_PROBE]
        if probe and not any(self.image_path(image_id).exists() for image_id in probe):
            first = self.coco.imgs[probe[0]]["file_name"]
            raise FileNotFoundError(
                f"image folder {self.image_dir} holds none of the first {len(probe)} images listed in "
                f"{self.ann_file} (e.g. {first!r}); pass the folder those file names are relative to"
            )

    def _sanitise_annotations(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (xyxy, clipped) and labels of one image, dropping crowd and degenerate boxes."""
        info = self.coco.imgs[image_id]
        width, height = info.get("width"), info.get("height")
        stats = self.box_stats
        stats.images += 1
        boxes: list[list[float]] = []
        labels: list[int] = []
        for ann in self.coco.imgToAnns.get(image_id, []):
            stats.annotations += 1
            if ann.get("iscrowd", 0):
                stats.crowd += 1  # crowd regions are "ignore" areas, never positives
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            box = [x, y, x + w, y + h]
            if not all(math.isfinite(v) for v in box):
                stats.degenerate += 1
                continue
            clipped = _clip_box(box, width, height)
            if clipped[2] - clipped[0] < self.min_box_size or clipped[3] - clipped[1] < self.min_box_size:
                stats.degenerate += 1  # also boxes entirely outside the image
                continue
            if clipped != box:
                stats.clipped += 1
            boxes.append(clipped)
            labels.append(self.cat_id_to_label[ann["category_id"]])
        stats.kept += len(boxes)
        if not boxes:
            stats.images_without_boxes += 1
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)

    # ----------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: int) -> Path:
        """Path of an image's file (``image_dir / file_name``)."""
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sanitised ``(boxes float32[N,4] xyxy, labels int64[N])`` of sample ``index`` (no image I/O)."""
        boxes, labels = self._targets[self.ids[index]]
        return boxes.copy(), labels.copy()

    def __getitem__(self, index: int) -> Sample | None:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_path(image_id)
        expected = (info["width"], info["height"]) if "width" in info and "height" in info else None
        try:
            image = load_rgb(path, expected_size=expected)
        except ImageReadError as err:
            if image_id not in self.unreadable_ids:
                self.unreadable_ids.add(image_id)
                warnings.warn(f"skipping unreadable image (id {image_id}): {err}", RuntimeWarning, stacklevel=2)
            return None
        boxes, labels = self._targets[image_id]
        height, width = image.shape[:2]
        if expected != (width, height):  # sizes unknown in the file, or wrong
            boxes, labels = self._fit_to_real_size(image_id, path, expected, boxes, labels, width, height)
        if self.transforms is None:
            image_t, boxes_t, labels_t = sample_to_tensors(image, boxes, labels)
        else:
            image_t, boxes_t, labels_t = self.transforms(image, boxes.copy(), labels.copy())
        return image_t, {"boxes": boxes_t, "labels": labels_t, "image_id": int(image_id)}

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


def _clip_box(box: Sequence[float], width: float | None, height: float | None) -> list[float]:
    """Clip xyxy to ``[0, width] x [0, height]`` (only at 0 when the size is unknown)."""
    x1, y1, x2, y2 = box
    x_max = math.inf if width is None else float(width)
    y_max = math.inf if height is None else float(height)
    return [min(max(x1, 0.0), x_max), min(max(y1, 0.0), y_max), min(max(x2, 0.0), x_max), min(max(y2, 0.0), y_max)]


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

