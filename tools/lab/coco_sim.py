"""COCO at full size without COCO's pixels: a simulated COCO 2017 train annotation file.

This module owns :func:`write_coco_simulation`, which writes a COCO-format file with COCO 2017
train's statistics (118,287 images; the 80 real category ids and names; about 7.3 boxes per
image with 41% small, 34% medium and 25% large boxes by COCO's area ranges; about 1% crowd
annotations with RLE masks, 1% images without annotations; a polygon per object, so the file is
as large as the real 448 MB one) over a small pool of real JPEGs that every entry reuses. The
data-path benchmark (:mod:`lab.data_path`) and the index tests read it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mnapps.data.image_io import load_rgb
from mnapps.data.synthetic_det import ensure_shapes_detection

__all__ = ["COCO_2017_CATEGORIES", "COCO_TRAIN2017_IMAGES", "SimulatedCoco", "prepare_image_pool",
           "write_coco_simulation"]


COCO_TRAIN2017_IMAGES = 118_287
#: COCO 2017's 80 detection categories: (id, name); the ids run 1..90 with gaps.
COCO_2017_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"),
    (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)

# COCO 2017 train: 860,001 boxes on 118,287 images (7.27 per image); 1,021 images (0.86%)
# have none; about 1% of annotations are crowd regions; "person" is 30.5% of the boxes.
_BOXES_PER_IMAGE = 860_001 / 118_287
_EMPTY_FRACTION = 1_021 / 118_287
_CROWD_FRACTION = 0.0105
_PERSON_FRACTION = 0.305
_LARGEST_IMAGE_ID = 581_929  # COCO train ids are sparse up to this
# Size classes by area in pixels (COCO's small < 32^2 <= medium < 96^2 <= large): share, log-uniform range.
_SIZE_CLASSES = ((0.41, 4.0, 32.0**2), (0.34, 32.0**2, 96.0**2), (0.25, 96.0**2, None))
# Polygon vertices per size class: about 23 on average, which makes the file's bytes per
# annotation those of COCO train (448 MB / 860k = 520 bytes).
_POLYGON_VERTICES = (12, 24, 40)
_POOL_SIZE = 16
_MB = 1 << 20

# ------------------------------------------------------------------------------------------
# the simulated file


@dataclass
class SimulatedCoco:
    """A written simulation: where it is and what it holds."""

    ann_file: Path
    image_dir: Path
    num_images: int
    num_annotations: int
    num_crowd: int
    num_empty_images: int
    size_shares: tuple[float, float, float]  # small, medium, large (by bbox area)
    json_bytes: int
    write_s: float

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ann_file"], out["image_dir"] = str(self.ann_file), str(self.image_dir)
        return out


def prepare_image_pool(
    out_dir: str | Path, source: str | Path | None = None
) -> tuple[Path, list[tuple[str, int, int]]]:
    """Copy a few JPEGs into ``out_dir`` for the simulated entries to share.

    Args:
        out_dir: folder to create (the simulation's image folder).
        source: a folder searched recursively for ``*.jpg`` (e.g. ``../shared/data/coco8/images``);
            None generates eight shapes images (:mod:`mnapps.data.synthetic_det`, 512 px).

    Returns:
        ``(image_dir, [(file_name, width, height), ...])`` with the displayed size of each image.

    Raises:
        ValueError: ``source`` holds no JPEG.
    """

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if source is None:
        shapes = ensure_shapes_detection(out_dir.parent / f".{out_dir.name}-shapes", num_train=8, num_val=1,
                                         image_size=512, progress=False)
        files = sorted(shapes.train_images.glob("*.jpg"))
    else:
        files = sorted(Path(source).rglob("*.jpg"))[:_POOL_SIZE]
        if not files:
            raise ValueError(f"image pool folder {source} holds no *.jpg file; pass a folder of JPEG photos")
    pool = []
    for path in files:
        target = out_dir / path.name
        if not target.exists():
            shutil.copyfile(path, target)
        height, width = load_rgb(target).shape[:2]
        pool.append((path.name, int(width), int(height)))
    return out_dir, pool


def write_coco_simulation(
    ann_file: str | Path,
    image_dir: str | Path,
    pool: Sequence[tuple[str, int, int]],
    num_images: int = COCO_TRAIN2017_IMAGES,
    *,
    seed: int = 0,
    polygons: bool = True,
) -> SimulatedCoco:
    """Write a COCO-format annotation file with COCO 2017 train's statistics over ``pool``'s images.

    Args:
        ann_file: the JSON to write.
        image_dir: the folder holding the pool's files (recorded in the result).
        pool: ``(file_name, width, height)`` of the shared images; entry ``i`` uses one at
            random and takes its size, so boxes fit the real pixels.
        num_images: entries in ``images`` (COCO train: 118,287).
        seed: generation seed (the same arguments give the same file).
        polygons: write a polygon ``segmentation`` per object (and RLE counts for crowd
            regions) as COCO does; False leaves segmentations out (a 3x smaller file).

    Returns a :class:`SimulatedCoco` with the counts actually written; raises ValueError for
    ``num_images < 1`` or an empty pool.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    if not pool:
        raise ValueError("the image pool is empty; pass at least one (file_name, width, height)")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    ann_file = Path(ann_file)

    # Images: sparse ids (listed in random order, as COCO's file does), each showing a pool image.
    image_ids = np.sort(rng.choice(max(_LARGEST_IMAGE_ID, num_images), num_images, replace=False) + 1)
    image_order = rng.permutation(num_images)
    pool_of_image = rng.integers(0, len(pool), num_images)
    pool_w = np.array([p[1] for p in pool], dtype=np.float64)
    pool_h = np.array([p[2] for p in pool], dtype=np.float64)

    # Boxes per image: none for ~1% of the images, else 1 + negative binomial (a long tail like
    # COCO's, where a crowded street scene has dozens) with the overall mean of COCO train.
    counts = _sample_box_counts(rng, num_images)
    total = int(counts.sum())
    image_of_ann = np.repeat(np.arange(num_images), counts)
    width, height = pool_w[pool_of_image[image_of_ann]], pool_h[pool_of_image[image_of_ann]]

    size_class, (x, y, w, h) = _sample_boxes(rng, total, width, height)
    crowd = rng.random(total) < _CROWD_FRACTION
    category = _sample_categories(rng, total)
    vertices = np.array(_POLYGON_VERTICES)[size_class]
    # COCO lists annotations by category, images in no order within one: an image's boxes are
    # scattered over the file, as they are in a parsed COCO object's memory.
    ann_order = np.lexsort((rng.random(total), category))

    with ann_file.open("w", encoding="utf-8") as f:
        f.write('{"info": {"description": "mnapps simulation of COCO 2017 train statistics", '
                f'"version": "1.0", "year": 2017, "seed": {seed}}}, "licenses": [{{"url": '
                '"http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "Attribution-NonCommercial-'
                'ShareAlike License"}], "images": [')
        _write_images(f, image_ids[image_order], pool_of_image[image_order], pool)
        f.write('], "annotations": [')
        _write_annotations(f, rng, ann_order, image_ids[image_of_ann], category, crowd, (x, y, w, h), vertices,
                           (width, height), polygons)
        f.write('], "categories": [' + _categories_json() + "]}")
    box_area = w * h
    size_shares = tuple(float(v) for v in (np.mean(box_area < 32.0**2),
                                           np.mean((box_area >= 32.0**2) & (box_area < 96.0**2)),
                                           np.mean(box_area >= 96.0**2))) if total else (0.0, 0.0, 0.0)
    return SimulatedCoco(
        ann_file=ann_file,
        image_dir=Path(image_dir),
        num_images=num_images,
        num_annotations=total,
        num_crowd=int(crowd.sum()),
        num_empty_images=int((counts == 0).sum()),
        size_shares=size_shares,  # type: ignore[arg-type]
        json_bytes=ann_file.stat().st_size,
        write_s=time.perf_counter() - start,
    )


def _sample_box_counts(rng: np.random.Generator, num_images: int) -> np.ndarray:
    non_empty_mean = _BOXES_PER_IMAGE / (1.0 - _EMPTY_FRACTION)
    shape = 1.5
    counts = 1 + rng.negative_binomial(shape, shape / (shape + non_empty_mean - 1.0), num_images)
    counts = np.minimum(counts, 100)
    counts[rng.random(num_images) < _EMPTY_FRACTION] = 0
    return counts


def _sample_boxes(rng: np.random.Generator, total: int, width: np.ndarray, height: np.ndarray):
    """Boxes by COCO's size classes, aspect ratio log-normal around square, fitted to the image.

    Returns:
        ``(size_class[total], (x, y, w, h))`` in pixels, rounded to 0.01 as COCO's files are.
    """
    shares = np.array([c[0] for c in _SIZE_CLASSES])
    size_class = rng.choice(len(_SIZE_CLASSES), total, p=shares / shares.sum())
    low = np.array([c[1] for c in _SIZE_CLASSES])[size_class]
    high = np.array([c[2] or np.inf for c in _SIZE_CLASSES])[size_class]
    high = np.minimum(high, 0.9 * width * height)
    area = np.exp(rng.uniform(np.log(low), np.log(np.maximum(high, low * 1.01))))
    aspect = np.exp(rng.normal(0.0, 0.5, total))
    w = np.minimum(np.sqrt(area * aspect), width)
    h = np.minimum(area / w, height)
    x = rng.uniform(0.0, 1.0, total) * (width - w)
    y = rng.uniform(0.0, 1.0, total) * (height - h)
    x, y, w, h = (np.round(v, 2) for v in (x, y, w, h))
    return size_class, (x, y, np.maximum(w, 0.01), np.maximum(h, 0.01))


def _sample_categories(rng: np.random.Generator, total: int) -> np.ndarray:
    """COCO category ids: "person" with its share of COCO train, the other 79 evenly."""
    categories = np.array([c[0] for c in COCO_2017_CATEGORIES])
    weights = np.full(len(categories), (1.0 - _PERSON_FRACTION) / (len(categories) - 1))
    weights[0] = _PERSON_FRACTION
    return categories[rng.choice(len(categories), total, p=weights)]


def _categories_json() -> str:
    return ", ".join(json.dumps({"supercategory": "", "id": cid, "name": name}) for cid, name in COCO_2017_CATEGORIES)


def _write_images(f, ids: np.ndarray, pool_index: np.ndarray, pool: Sequence[tuple[str, int, int]]) -> None:
    parts = []
    for image_id, p in zip(ids.tolist(), pool_index.tolist()):
        name, width, height = pool[p]
        parts.append(
            f'{{"license": 1, "file_name": "{name}", "coco_url": "http://images.cocodataset.org/train2017/'
            f'{image_id:012d}.jpg", "height": {height}, "width": {width}, "date_captured": "2013-11-14 11:18:45", '
            f'"flickr_url": "http://farm4.staticflickr.com/1/{image_id}_0000000000_z.jpg", "id": {image_id}}}'
        )
    f.write(", ".join(parts))


def _write_annotations(f, rng: np.random.Generator, order: np.ndarray, image_ids: np.ndarray, category: np.ndarray,
                       crowd: np.ndarray, boxes: tuple[np.ndarray, ...], vertices: np.ndarray,
                       image_size: tuple[np.ndarray, np.ndarray], polygons: bool) -> None:
    x, y, w, h = boxes
    chunk = 20_000
    first = True
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        segments = _segmentations(rng, tuple(v[rows] for v in boxes), vertices[rows], crowd[rows],
                                  (image_size[0][rows], image_size[1][rows])) if polygons else None
        parts = []
        cols = (rows + 1, image_ids[rows], category[rows], crowd[rows].astype(int), x[rows], y[rows], w[rows], h[rows])
        for k, (ann_id, image_id, cat, iscrowd, bx, by, bw, bh) in enumerate(zip(*(c.tolist() for c in cols))):
            seg = f'"segmentation": {segments[k]}, ' if segments is not None else ""
            parts.append(f'{{{seg}"area": {bw * bh * 0.785398}, "iscrowd": {iscrowd}, "image_id": {image_id}, '
                         f'"bbox": [{bx}, {by}, {bw}, {bh}], "category_id": {cat}, "id": {ann_id}}}')
        if parts:
            f.write(("" if first else ", ") + ", ".join(parts))
            first = False


def _segmentations(rng: np.random.Generator, boxes: tuple[np.ndarray, ...], vertices: np.ndarray, crowd: np.ndarray,
                   image_size: tuple[np.ndarray, np.ndarray]) -> list[str]:
    """Polygon text (a jittered ellipse in the box) per object; RLE-style counts for crowd regions."""
    x, y, w, h = boxes
    out = [""] * len(x)
    for k in np.unique(vertices):
        rows = np.flatnonzero(vertices == k)
        angles = np.linspace(0.0, 2.0 * np.pi, int(k), endpoint=False)
        radius = rng.uniform(0.8, 1.0, (len(rows), int(k)))
        px = x[rows, None] + w[rows, None] * (0.5 + 0.5 * radius * np.cos(angles))
        py = y[rows, None] + h[rows, None] * (0.5 + 0.5 * radius * np.sin(angles))
        coords = np.round(np.stack([px, py], axis=2).reshape(len(rows), -1), 2)
        fmt = "[[" + ", ".join(["%r"] * (2 * int(k))) + "]]"
        for row, values in zip(rows.tolist(), coords.tolist()):
            out[row] = fmt % tuple(values)
    for row in np.flatnonzero(crowd).tolist():
        runs = rng.integers(1, 400, 2 * int(vertices[row])).tolist()
        out[row] = f'{{"counts": {runs}, "size": [{int(image_size[1][row])}, {int(image_size[0][row])}]}}'
    return out
