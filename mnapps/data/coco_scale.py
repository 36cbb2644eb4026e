"""COCO at full size without COCO's pixels: a simulated annotation file and what the data path costs on it.

This module owns ``tools/bench_data.py``'s measurements. :func:`write_coco_simulation` writes a
COCO-format file with COCO 2017 train's statistics (118,287 images; the 80 real category ids
and names; about 7.3 boxes per image with 41% small, 34% medium and 25% large boxes by COCO's
area ranges; about 1% crowd annotations with RLE masks, 1% images without annotations; a
polygon per object, so the file is as large as the real 448 MB one) over a small pool of real
JPEGs that every entry reuses. :func:`run_scale_benchmark` then runs each measurement in a
fresh Python process (:func:`run_isolated`), so that no figure inherits another's heap:

* ``first_parse``: mnapps' first construction (JSON parse, validation, index, cache write)
  and pycocotools' own ``COCO()`` load, with the peak RSS of each;
* ``loader``: for mnapps' :class:`~mnapps.data.coco.CocoDetection` with
  :func:`~mnapps.data.transforms.build_det_transforms` (SSD recipe, 300 px) and for the
  torchvision reference (``torchvision.datasets.CocoDetection`` +
  ``wrap_dataset_for_transforms_v2``, its SSD augmentation and a 300x300 resize, images
  without boxes removed as its detection reference does): time to first batch (from dataset
  construction, mnapps with its cached index), then PSS and USS (``/proc/<pid>/smaps_rollup``)
  of the main process and summed over the DataLoader workers after the first and after the
  last of several passes of a fixed number of random batches through persistent workers, and
  the loader's images/s over the passes after the first;
* ``annotation epoch`` (same process, after the passes): fresh workers read every sample's
  annotations once, without decoding (each dataset's own sample path with the image replaced
  by a placeholder), and their PSS/USS are read at its start and end. A full epoch of reads
  is what turns shared pages private when per-image Python objects are touched; pixels do
  not matter for it, so it takes seconds even at 118k images.

PSS divides each shared page among the processes sharing it, so the sum over processes is
what the machine really spends; USS counts only private pages, so a worker's USS growing pass
after pass is the copy-on-read effect itself.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Sampler, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2

from mnapps.data.coco import CocoDetection, collate_fn
from mnapps.data.coco_index import index_cache_paths, load_coco_index
from mnapps.data.image_io import load_rgb
from mnapps.data.synthetic_det import ensure_shapes_detection
from mnapps.data.transforms import build_det_transforms

__all__ = [
    "COCO_2017_CATEGORIES",
    "COCO_TRAIN2017_IMAGES",
    "IMPLEMENTATIONS",
    "SimulatedCoco",
    "ScaleSettings",
    "prepare_image_pool",
    "write_coco_simulation",
    "process_memory",
    "child_pids",
    "torchvision_ssd_transforms",
    "measure_first_parse",
    "measure_loader",
    "run_isolated",
    "run_scale_benchmark",
    "machine_description",
    "extrapolate_workers",
    "summarise",
    "check_acceptance",
    "format_report",
    "plot_report",
]

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
IMPLEMENTATIONS = ("mnapps", "torchvision")

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


# ------------------------------------------------------------------------------------------
# memory of processes


def process_memory(pid: int | None = None) -> dict[str, int]:
    """``{"rss", "pss", "uss"}`` in bytes of one process, from ``/proc/<pid>/smaps_rollup``.

    Raises:
        OSError: not Linux (or a kernel before 4.14), or the process is gone.
    """
    path = Path(f"/proc/{os.getpid() if pid is None else pid}/smaps_rollup")
    try:
        text = path.read_text()
    except FileNotFoundError as err:
        raise OSError(f"{path} not found: PSS/USS need Linux 4.14+ and a live process") from err
    fields: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)}


def child_pids(pid: int | None = None) -> list[int]:
    """Process ids whose parent is ``pid`` (this process by default): DataLoader workers."""
    pid = os.getpid() if pid is None else pid
    children: set[int] = set()
    task_dir = Path(f"/proc/{pid}/task")
    try:
        for task in task_dir.iterdir():
            children.update(int(c) for c in (task / "children").read_text().split())
        return sorted(children)
    except OSError:
        pass  # kernels without CONFIG_PROC_CHILDREN: scan every process's parent
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name may hold spaces and parentheses: fields follow the last ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.add(int(stat.parent.name))
    return sorted(children)


def _memory_snapshot() -> dict[str, Any]:
    workers = [process_memory(p) for p in child_pids()]
    main = process_memory()
    return {"main_pss": main["pss"], "main_uss": main["uss"], "main_rss": main["rss"],
            "workers": len(workers),
            "workers_pss": sum(m["pss"] for m in workers), "workers_uss": sum(m["uss"] for m in workers)}


def _peak_rss() -> int:
    """Peak resident set of this process in bytes (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM line; peak memory needs Linux")


# ------------------------------------------------------------------------------------------
# the datasets under test


def _tv_collate(batch):
    return tuple(zip(*batch))


def _count(batch) -> int:
    return len(batch)


def _targets_only(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray):
    # mnapps' transform contract, without the pixel work: the annotation side of a sample only.
    return torch.empty(0), torch.from_numpy(boxes), torch.from_numpy(labels)


class _MnappsDataset(CocoDetection):
    """mnapps' dataset; with ``decode = False`` images are not read (an all-zero view of their size)."""

    decode = True

    def _load_image(self, path, expected):
        if self.decode:
            return super()._load_image(path, expected)
        width, height = expected if expected is not None else (1, 1)
        return np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (int(height), int(width), 3))


class _TorchvisionDataset(torchvision.datasets.CocoDetection):
    """torchvision's dataset; with ``decode = False`` images are not read (a 1x1 placeholder)."""

    decode = True

    def _load_image(self, id: int):
        if self.decode:
            return super()._load_image(id)
        self.coco.loadImgs(id)[0]["file_name"]  # the look-up the real method makes
        return Image.new("RGB", (1, 1))


def torchvision_ssd_transforms(size: int = 300):
    """torchvision's SSD training augmentation (its detection reference's "ssd" preset) + a resize.

    Photometric distortion, zoom out onto the mean colour up to 4x, the SSD IoU crop and a
    horizontal flip, as ``references/detection/presets.py`` composes them with transforms v2;
    the reference leaves resizing to the model, here images are resized to ``size`` so that
    both loaders deliver the same 300x300 tensors.
    """
    mean = [123.0, 117.0, 104.0]
    return v2.Compose([
        v2.ToImage(),
        v2.RandomPhotometricDistort(p=0.5),
        v2.RandomZoomOut(fill={tv_tensors.Image: mean, "others": 0}, side_range=(1.0, 4.0), p=0.5),
        v2.RandomIoUCrop(),
        v2.RandomHorizontalFlip(p=0.5),
        v2.Resize((size, size)),
        v2.ToDtype(torch.float32, scale=True),
        v2.SanitizeBoundingBoxes(),
    ])


def _build_dataset(impl: str, ann_file: str, image_dir: str, size: int):
    if impl == "mnapps":
        return _MnappsDataset(ann_file, image_dir, build_det_transforms(True, size, "ssd")), collate_fn
    if impl == "torchvision":
        base = _TorchvisionDataset(image_dir, ann_file, transforms=torchvision_ssd_transforms(size))
        dataset = torchvision.datasets.wrap_dataset_for_transforms_v2(base)
        # The reference trains only on images with a box of more than 1 px in both sides
        # (RandomIoUCrop needs boxes); mnapps keeps the others as background.
        keep = [i for i, image_id in enumerate(base.ids)
                if any(a["bbox"][2] > 1 and a["bbox"][3] > 1 for a in base.coco.imgToAnns.get(image_id, []))]
        return Subset(dataset, keep), _tv_collate
    raise ValueError(f"unknown implementation {impl!r}; choose from {list(IMPLEMENTATIONS)}")


class _RandomSamples(Sampler[int]):
    """``count`` distinct random indices, a new draw per pass.

    Unlike ``RandomSampler(num_samples=count)``, no Python list of all ``n`` indices is made
    per pass: allocating 118k ints in the main process writes to heap pages it shares with
    the workers, which then count as the workers' private memory and blur what the dataset
    itself costs.
    """

    def __init__(self, n: int, count: int, generator: torch.Generator) -> None:
        self.n, self.count, self.generator = n, min(count, n), generator

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator)[: self.count].tolist())


def _annotations_only(dataset) -> None:
    """Switch a dataset from :func:`_build_dataset` to annotation reads: no decoding, no augmentation."""
    if isinstance(dataset, _MnappsDataset):
        dataset.decode, dataset.transforms = False, _targets_only
    else:  # Subset(wrapper(_TorchvisionDataset))
        wrapper = dataset.dataset
        wrapper._dataset.decode, wrapper.transforms = False, None


def _wait_for_workers_to_exit(timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while child_pids():
        if time.monotonic() > deadline:
            raise RuntimeError(f"DataLoader workers {child_pids()} still alive {timeout_s:g} s after their loader "
                               "was deleted; the next memory reading would count them")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------
# measurements (each meant to run in its own process: see run_isolated)


def measure_first_parse(ann_file: str | Path, what: str) -> dict[str, Any]:
    """Seconds and peak RSS of one cold load of ``ann_file``.

    Args:
        what: ``"mnapps"`` (first :class:`~mnapps.data.coco.CocoDetection` construction: any
            cached index is deleted first, and written anew) or ``"pycocotools"`` (``COCO()``).
    """
    ann_file = Path(ann_file)
    if what == "mnapps":
        for path in index_cache_paths(ann_file):
            path.unlink(missing_ok=True)
        start = time.perf_counter()
        index = load_coco_index(ann_file)
        seconds = time.perf_counter() - start
        cache = next((p for p in index_cache_paths(ann_file) if p.is_file()), None)
        return {"what": what, "seconds": seconds, "peak_rss": _peak_rss(), "index_bytes": index.nbytes(),
                "cache_bytes": cache.stat().st_size if cache else 0}
    if what == "pycocotools":
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            COCO(str(ann_file))
        return {"what": what, "seconds": time.perf_counter() - start, "peak_rss": _peak_rss()}
    raise ValueError(f"unknown first-parse measurement {what!r}; choose 'mnapps' or 'pycocotools'")


def measure_loader(
    impl: str,
    ann_file: str | Path,
    image_dir: str | Path,
    *,
    workers: int,
    batch_size: int = 16,
    batches_per_pass: int = 8,
    passes: int = 3,
    size: int = 300,
    seed: int = 0,
    annotation_epoch: bool = True,
) -> dict[str, Any]:
    """Time to first batch, memory after the first and last pass, and images/s of one loader set-up.

    Builds the dataset (``impl``: ``"mnapps"`` or ``"torchvision"``), then a DataLoader with
    ``workers`` persistent workers over ``batches_per_pass`` random batches per pass (a new
    draw each pass, so later passes reach images not seen before, as an epoch does).

    With workers and ``annotation_epoch``, the loader is then shut down and one epoch of
    annotation reads over every sample runs with fresh workers (:func:`_annotation_epoch`).

    Returns:
        ``{"first_batch_s", "construct_s", "images_per_s", "after_first": {...},
        "after_last": {...}, "annotation_epoch": {...}, ...}``; the memory dicts hold
        ``main_pss``, ``main_uss``, ``workers_pss``, ``workers_uss`` (bytes, summed over workers).
    """
    if passes < 2:
        raise ValueError(f"passes must be >= 2 (memory after the first and after the last), got {passes}")
    if workers == 0:
        torch.set_num_threads(1)  # the main process then does a worker's job: give it a worker's threads
    start = time.perf_counter()
    dataset, collate = _build_dataset(impl, str(ann_file), str(image_dir), size)
    construct_s = time.perf_counter() - start
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = _RandomSamples(len(dataset), batch_size * batches_per_pass, generator)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=collate, drop_last=True, persistent_workers=workers > 0)
    iterator = iter(loader)
    batch = next(iterator)
    first_batch_s = time.perf_counter() - start
    for batch in iterator:
        pass
    # A batch still referenced here would count its shared-memory tensors in the main process.
    del batch
    after_first = _memory_snapshot()
    images = 0
    timed_start = time.perf_counter()
    for _ in range(passes - 1):
        for batch in loader:
            images += len(batch[0])
        del batch
    seconds = time.perf_counter() - timed_start
    after_last = _memory_snapshot()
    result = {
        "impl": impl, "workers": workers, "batch_size": batch_size, "batches_per_pass": batches_per_pass,
        "passes": passes, "samples": len(dataset), "construct_s": construct_s, "first_batch_s": first_batch_s,
        "images_per_s": images / seconds, "after_first": after_first, "after_last": after_last,
    }
    if workers > 0 and annotation_epoch:
        del loader, iterator  # the iterator owns the persistent workers
        gc.collect()
        _wait_for_workers_to_exit()
        result["annotation_epoch"] = _annotation_epoch(dataset, workers)
    return result


def _annotation_epoch(dataset, workers: int, batch_size: int = 256) -> dict[str, Any]:
    """One epoch over every sample's annotations (no pixels) with fresh workers: memory before and after.

    Every image is visited, as in a real epoch, which is what turns the parent's shared pages
    into private copies when per-image Python objects are read (their reference counts change).
    """
    _annotations_only(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_count,
                        persistent_workers=True)
    start = time.perf_counter()
    iterator = iter(loader)
    seen = next(iterator)
    at_start = _memory_snapshot()
    for count in iterator:
        seen += count
    at_end = _memory_snapshot()
    return {"samples": seen, "seconds": time.perf_counter() - start, "at_start": at_start, "at_end": at_end}


def _child_main() -> None:
    """Entry point of :func:`run_isolated`'s process: read a task as JSON on stdin, print the result."""
    task = json.loads(sys.stdin.read())
    kind = task.pop("kind")
    if kind == "first_parse":
        result = measure_first_parse(**task)
    elif kind == "loader":
        result = measure_loader(**task)
    else:
        raise ValueError(f"unknown measurement kind {kind!r}")
    sys.stdout.write("\n" + json.dumps(result) + "\n")


def run_isolated(kind: str, timeout_s: float = 1800.0, **task: Any) -> dict[str, Any]:
    """Run one measurement (``"first_parse"`` or ``"loader"``) in a fresh Python process.

    A fresh interpreter keeps every figure free of the heap a previous measurement left
    behind (freed Python objects rarely give their pages back).

    Raises:
        RuntimeError: the measurement failed (the message ends with its stderr).
    """
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    payload = json.dumps({"kind": kind, **{k: str(v) if isinstance(v, Path) else v for k, v in task.items()}})
    proc = subprocess.run([sys.executable, "-c", "from mnapps.data.coco_scale import _child_main; _child_main()"],
                          input=payload, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {kind} {task} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
# the whole run


@dataclass(frozen=True)
class ScaleSettings:
    """What :func:`run_scale_benchmark` measures, and how long.

    Attributes:
        sizes: simulated file sizes (images); COCO 2017 train is 118,287.
        workers: DataLoader worker counts to measure memory and speed at.
        impls: ``"mnapps"`` and/or ``"torchvision"``.
        batch_size, batches_per_pass, passes: each loader run draws ``passes`` times
            ``batches_per_pass`` random batches; memory is read after the first and the last.
        input_size: side of the SSD training crops.
        polygons: write COCO-like polygon segmentations (the real file's size and parse cost).
        annotation_epoch: after the passes, read every sample's annotations once (no pixels)
            with fresh workers and record their memory before and after (copy-on-read).
        seed: simulation and sampling seed.
        timeout_s: limit for each isolated measurement.
    """

    sizes: tuple[int, ...] = (10_000, 50_000, COCO_TRAIN2017_IMAGES)
    workers: tuple[int, ...] = (0, 2, 4)
    impls: tuple[str, ...] = IMPLEMENTATIONS
    batch_size: int = 16
    batches_per_pass: int = 8
    passes: int = 3
    input_size: int = 300
    polygons: bool = True
    annotation_epoch: bool = True
    seed: int = 0
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if not self.sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.sizes):
            raise ValueError(f"sizes must be image counts >= 1, got {list(self.sizes)}")
        if not self.workers or any(w < 0 for w in self.workers):
            raise ValueError(f"workers must be counts >= 0, got {list(self.workers)}")
        unknown = sorted(set(self.impls) - set(IMPLEMENTATIONS))
        if not self.impls or unknown:
            raise ValueError(f"unknown implementation(s) {unknown or '(none given)'}; "
                             f"choose from {list(IMPLEMENTATIONS)}")
        for name in ("batch_size", "batches_per_pass", "input_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.passes < 2:
            raise ValueError(f"passes must be >= 2 (memory after the first and after the last), got {self.passes}")
        if min(self.sizes) < self.batch_size * self.batches_per_pass:
            raise ValueError(f"the smallest size ({min(self.sizes)} images) is below one pass of "
                             f"{self.batch_size} x {self.batches_per_pass} images; raise sizes or lower the batches")


def run_scale_benchmark(
    settings: ScaleSettings,
    workdir: str | Path,
    pool_source: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the simulations into ``workdir`` and run every measurement, each in its own process.

    Args:
        settings: what to measure.
        workdir: folder for the image pool and the simulated files (they stay there).
        pool_source: folder of JPEGs for the pool (None: generated shapes images).
        log: receives one line per step.

    Returns:
        ``{"settings", "pool", "sizes": [{"simulation", "first_parse", "loaders"}], "machine"}``.
    """
    workdir = Path(workdir)
    image_dir, pool = prepare_image_pool(workdir / "images", pool_source)
    log(f"image pool: {len(pool)} JPEGs from {pool_source or 'generated shapes'} in {image_dir}")
    result: dict[str, Any] = {"settings": asdict(settings), "sizes": [], "machine": machine_description(),
                              "pool": {"source": str(pool_source) if pool_source else "generated shapes",
                                       "images": [list(p) for p in pool]}}
    for num_images in settings.sizes:
        sim = write_coco_simulation(workdir / f"instances_sim{num_images}.json", image_dir, pool, num_images,
                                    seed=settings.seed, polygons=settings.polygons)
        log(f"{num_images} images: wrote {sim.ann_file.name} ({sim.json_bytes / _MB:.0f} MiB, "
            f"{sim.num_annotations} boxes) in {sim.write_s:.1f} s")
        entry: dict[str, Any] = {"simulation": sim.as_json(), "first_parse": {}, "loaders": []}
        # mnapps first: its first parse writes the index cache that its loader runs then use.
        for what in (["mnapps"] if "mnapps" in settings.impls else []) + ["pycocotools"]:
            parse = run_isolated("first_parse", settings.timeout_s, ann_file=sim.ann_file, what=what)
            entry["first_parse"][what] = parse
            log(f"  first parse {what}: {parse['seconds']:.1f} s, peak RSS {parse['peak_rss'] / _MB:.0f} MiB")
        for impl in settings.impls:
            for workers in settings.workers:
                run = run_isolated("loader", settings.timeout_s, impl=impl, ann_file=sim.ann_file,
                                   image_dir=image_dir, workers=workers, batch_size=settings.batch_size,
                                   batches_per_pass=settings.batches_per_pass, passes=settings.passes,
                                   size=settings.input_size, seed=settings.seed,
                                   annotation_epoch=settings.annotation_epoch)
                entry["loaders"].append(run)
                epoch = run.get("annotation_epoch")
                log(f"  {impl} {workers} workers: first batch {run['first_batch_s']:.2f} s, "
                    f"{run['images_per_s']:.1f} img/s, workers PSS {run['after_first']['workers_pss'] / _MB:.0f} -> "
                    f"{run['after_last']['workers_pss'] / _MB:.0f} MiB"
                    + (f"; annotation epoch: workers USS {epoch['at_start']['workers_uss'] / _MB:.0f} -> "
                       f"{epoch['at_end']['workers_uss'] / _MB:.0f} MiB" if epoch else ""))
        result["sizes"].append(entry)
    # Speeds mean little on a busy machine: record how busy it was.
    result["machine"]["load_average_end"] = list(os.getloadavg())
    return result


def machine_description() -> dict[str, Any]:
    """CPU model, core count and flags (from ``lscpu`` when present) and the memory total."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "load_average_start": list(os.getloadavg())}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Flags"):
                info[key.strip().lower().replace(" ", "_")] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_bytes"] = int(meminfo[meminfo.index("MemTotal:") + 1]) * 1024
    except (OSError, ValueError):
        pass
    return info


# ------------------------------------------------------------------------------------------
# analysis


def extrapolate_workers(points: dict[int, float], target: int = 8) -> tuple[float, float]:
    """Least-squares line through ``{workers: bytes}``; returns ``(bytes per worker, bytes at target)``.

    Raises:
        ValueError: fewer than two worker counts.
    """
    if len(points) < 2:
        raise ValueError(f"need memory at two or more worker counts to extrapolate, got {sorted(points)}")
    xs = np.array(sorted(points), dtype=np.float64)
    ys = np.array([points[int(k)] for k in xs], dtype=np.float64)
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(slope), float(intercept + slope * target)


def _total_pss(run: dict[str, Any], when: str = "after_last") -> int:
    return run[when]["main_pss"] + run[when]["workers_pss"]


def _runs(entry: dict[str, Any], impl: str) -> dict[int, dict[str, Any]]:
    return {run["workers"]: run for run in entry["loaders"] if run["impl"] == impl}


def _growth(run: dict[str, Any], key: str = "workers_pss") -> float | None:
    first, last = run["after_first"][key], run["after_last"][key]
    return None if first == 0 else last / first - 1.0


def summarise(result: dict[str, Any], target_workers: int = 8) -> list[dict[str, Any]]:
    """Per (size, implementation): the figures the tables and checks use."""
    rows = []
    for entry in result["sizes"]:
        sim = entry["simulation"]
        for impl in result["settings"]["impls"]:
            runs = _runs(entry, impl)
            if not runs:
                continue
            first_batch_workers = 2 if 2 in runs else max(runs)
            most = max(runs)
            row = {
                "images": sim["num_images"], "impl": impl, "json_bytes": sim["json_bytes"],
                # torchvision's dataset parses with pycocotools' COCO(), so that is its first parse.
                "first_parse_s": entry["first_parse"].get("mnapps" if impl == "mnapps" else "pycocotools",
                                                          {}).get("seconds"),
                "first_batch_workers": first_batch_workers,
                "first_batch_s": runs[first_batch_workers]["first_batch_s"],
                "max_workers": most,
                "workers_pss_first": runs[most]["after_first"]["workers_pss"],
                "workers_pss_last": runs[most]["after_last"]["workers_pss"],
                "workers_pss_growth": _growth(runs[most]),
                "workers_uss_growth": _growth(runs[most], "workers_uss"),
                "total_pss": {w: _total_pss(r) for w, r in sorted(runs.items())},
                "images_per_s": {w: r["images_per_s"] for w, r in sorted(runs.items())},
            }
            if len(runs) >= 2:
                row["pss_per_worker"], row[f"total_pss_{target_workers}_workers"] = extrapolate_workers(
                    row["total_pss"], target_workers)
            epochs = {w: r["annotation_epoch"] for w, r in sorted(runs.items()) if r.get("annotation_epoch")}
            if epochs:
                row["epoch_uss_growth"] = {w: e["at_end"]["workers_uss"] - e["at_start"]["workers_uss"]
                                           for w, e in epochs.items()}
                row["epoch_total_pss"] = {w: e["at_end"]["main_pss"] + e["at_end"]["workers_pss"]
                                          for w, e in epochs.items()}
                if 0 in runs:  # without workers nothing is shared, so reading cannot copy pages
                    row["epoch_total_pss"] = {0: _total_pss(runs[0]), **row["epoch_total_pss"]}
                if len(row["epoch_total_pss"]) >= 2:
                    row["epoch_pss_per_worker"], row[f"epoch_total_pss_{target_workers}_workers"] = \
                        extrapolate_workers(row["epoch_total_pss"], target_workers)
            rows.append(row)
    return rows


def check_acceptance(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The acceptance targets at the largest size measured, for mnapps (torchvision shown beside).

    Returns:
        ``[{"name", "mnapps", "torchvision", "target", "ok"}]``; ``ok`` is None when the figure
        is missing (e.g. no 2-worker run, no training step measured).
    """
    rows = summarise(result)
    largest = max(r["images"] for r in rows)
    at = {r["impl"]: r for r in rows if r["images"] == largest}
    mn, tv = at.get("mnapps"), at.get("torchvision")
    checks = []

    def add(name: str, key: Callable[[dict[str, Any]], float | None], target: str, ok: Callable[[float], bool]):
        mine = key(mn) if mn else None
        checks.append({"name": name, "mnapps": mine, "torchvision": key(tv) if tv else None, "target": target,
                       "ok": None if mine is None else bool(ok(mine))})

    add(f"time to first batch at {largest} images, s", lambda r: r["first_batch_s"], "<= 5 s", lambda v: v <= 5.0)
    add(f"summed worker PSS, last pass vs first, {mn['max_workers'] if mn else '?'} workers",
        lambda r: r["workers_pss_growth"], "within +-10%", lambda v: abs(v) <= 0.10)
    step = result.get("step", {}).get("images_per_s")
    add("loader images/s at 2 workers / SSD300 training step images/s",
        lambda r: None if step is None or 2 not in r["images_per_s"] else r["images_per_s"][2] / step,
        ">= 1", lambda v: v >= 1.0)
    return checks


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / _MB:,.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def format_report(result: dict[str, Any]) -> str:
    """The measured tables as text (MiB = 2^20 bytes; PSS after the last pass unless stated)."""
    lines = []
    s = result["settings"]
    machine = result.get("machine", {})
    if machine:
        start, end = (machine.get(k) or ["?"] for k in ("load_average_start", "load_average_end"))
        lines.append(f"machine: {machine.get('model_name', '?')}, {machine.get('cpus')} CPUs; load average "
                     f"(1 min) {start[0]} at the start, {end[0]} at the end")
    lines.append(f"passes: {s['passes']} x {s['batches_per_pass']} random batches of {s['batch_size']} "
                 f"(SSD training transforms, {s['input_size']} px); persistent workers; each row its own process")
    lines.append("")
    lines.append("first parse of the JSON (cold, own process)")
    lines.append(f"{'images':>8} {'boxes':>8} {'JSON MiB':>9} {'mnapps s':>9} {'peak MiB':>9} "
                 f"{'COCO() s':>9} {'peak MiB':>9} {'index MiB':>10}")
    for entry in result["sizes"]:
        sim, fp = entry["simulation"], entry["first_parse"]
        mn, pc = fp.get("mnapps"), fp["pycocotools"]
        mn_s = f"{mn['seconds']:.1f}" if mn else "-"
        lines.append(f"{sim['num_images']:>8} {sim['num_annotations']:>8} {sim['json_bytes'] / _MB:>9.0f} "
                     f"{mn_s:>9} {_mib(mn and mn['peak_rss']):>9} "
                     f"{pc['seconds']:>9.1f} {_mib(pc['peak_rss']):>9} {_mib(mn and mn['index_bytes']):>10}")
    lines.append("")
    lines.append("loader start-up and memory (MiB; 'p1' after the first pass, 'pN' after the last)")
    lines.append(f"{'images':>8} {'impl':<12} {'workers':>7} {'1st batch s':>11} {'main PSS p1/pN':>15} "
                 f"{'workers PSS p1/pN':>18} {'growth':>7} {'workers USS p1/pN':>18} {'img/s':>6} {'img/s/worker':>12}")
    for entry in result["sizes"]:
        for run in entry["loaders"]:
            a, b = run["after_first"], run["after_last"]
            per_worker = run["images_per_s"] / max(1, run["workers"])
            lines.append(
                f"{entry['simulation']['num_images']:>8} {run['impl']:<12} {run['workers']:>7} "
                f"{run['first_batch_s']:>11.2f} {_mib(a['main_pss']) + ' / ' + _mib(b['main_pss']):>15} "
                f"{_mib(a['workers_pss']) + ' / ' + _mib(b['workers_pss']):>18} {_pct(_growth(run)):>7} "
                f"{_mib(a['workers_uss']) + ' / ' + _mib(b['workers_uss']):>18} {run['images_per_s']:>6.1f} "
                f"{per_worker:>12.1f}")
    _report_epochs(result, lines)
    rows = summarise(result)
    _report_growth(rows, lines)
    _report_step_and_acceptance(result, rows, lines)
    return "\n".join(lines)


def _report_epochs(result: dict[str, Any], lines: list[str]) -> None:
    epochs = [(entry, run) for entry in result["sizes"] for run in entry["loaders"] if run.get("annotation_epoch")]
    if epochs:
        lines.append("")
        lines.append("one epoch of annotation reads (every image, no pixels, fresh workers): memory at its start "
                     "and end (MiB)")
        lines.append(f"{'images':>8} {'impl':<12} {'workers':>7} {'seconds':>7} {'workers PSS start/end':>22} "
                     f"{'workers USS start/end':>22} {'USS growth per worker':>22}")
        for entry, run in epochs:
            e = run["annotation_epoch"]
            a, b = e["at_start"], e["at_end"]
            lines.append(f"{entry['simulation']['num_images']:>8} {run['impl']:<12} {run['workers']:>7} "
                         f"{e['seconds']:>7.1f} {_mib(a['workers_pss']) + ' / ' + _mib(b['workers_pss']):>22} "
                         f"{_mib(a['workers_uss']) + ' / ' + _mib(b['workers_uss']):>22} "
                         f"{_mib((b['workers_uss'] - a['workers_uss']) / run['workers']):>22}")


def _report_growth(rows: list[dict[str, Any]], lines: list[str]) -> None:
    lines.append("")
    for title, key, slope, at8 in (
        ("after the last pass", "total_pss", "pss_per_worker", "total_pss_8_workers"),
        ("after one epoch of annotation reads (0 workers: after the last pass)", "epoch_total_pss",
         "epoch_pss_per_worker", "epoch_total_pss_8_workers"),
    ):
        table = [r for r in rows if key in r]
        if not table:
            continue
        workers = sorted({w for r in table for w in r[key]})
        lines.append(f"how memory grows: main + workers PSS {title} (MiB), extrapolated to 8 workers")
        lines.append(f"{'images':>8} {'impl':<12} " + " ".join(f"{f'{w} workers':>10}" for w in workers)
                     + f" {'per worker':>10} {'8 workers':>10}")
        for r in table:
            lines.append(f"{r['images']:>8} {r['impl']:<12} "
                         + " ".join(f"{_mib(r[key].get(w)):>10}" for w in workers)
                         + f" {_mib(r.get(slope)):>10} {_mib(r.get(at8)):>10}")
        lines.append("")
    lines.pop()


def _report_step_and_acceptance(result: dict[str, Any], rows: list[dict[str, Any]], lines: list[str]) -> None:
    step = result.get("step")
    if step:
        lines.append("")
        lines.append(f"SSD300 training step (MobileNetV1 1.0, {step['num_classes']} classes, batch {step['batch']}, "
                     f"{step['device']}, {step['threads']} threads): {step['images_per_s']:.1f} images/s")
        largest = max(r["images"] for r in rows)
        for r in rows:
            if r["images"] == largest and 2 in r["images_per_s"]:
                lines.append(f"  {r['impl']} loader at 2 workers: {r['images_per_s'][2]:.1f} images/s, "
                             f"loader/step ratio {r['images_per_s'][2] / step['images_per_s']:.2f}")
    lines.append("")
    lines.append("acceptance (largest size)")
    for c in check_acceptance(result):
        fmt = (lambda v: "-" if v is None else (_pct(v) if "PSS" in c["name"] else f"{v:.2f}"))
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[c["ok"]]
        lines.append(f"  {verdict:<4} {c['name']}: mnapps {fmt(c['mnapps'])} (target {c['target']}), "
                     f"torchvision {fmt(c['torchvision'])}")
    largest = [r for r in rows if r["images"] == max(x["images"] for x in rows) and r.get("epoch_uss_growth")]
    if largest:
        lines.append("  also: workers' USS growth over one epoch of annotation reads, per worker: " + ", ".join(
            f"{r['impl']} {_mib(r['epoch_uss_growth'][w] / w)} MiB ({w} workers)"
            for r in largest for w in sorted(r["epoch_uss_growth"])))


def plot_report(result: dict[str, Any], path: str | Path) -> Path:
    """Write a PNG: total PSS (measured and extrapolated to 8 workers) and start-up time against images."""
    # matplotlib is needed only for --plot; importing it costs every measurement process a second.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(result)
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, colour in zip(IMPLEMENTATIONS, ("tab:blue", "tab:orange")):
        mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["images"])
        if not mine:
            continue
        images = [r["images"] for r in mine]
        most = mine[0]["max_workers"]
        # After an epoch of reads when measured: that is where copy-on-read has done its work.
        key = "epoch_total_pss" if all("epoch_total_pss" in r for r in mine) else "total_pss"
        ax_mem.plot(images, [r[key][most] / _MB for r in mine], "o-", color=colour,
                    label=f"{impl}, {most} workers (measured)")
        if all(f"{key}_8_workers" in r for r in mine):
            ax_mem.plot(images, [r[f"{key}_8_workers"] / _MB for r in mine], "s--", color=colour,
                        label=f"{impl}, 8 workers (extrapolated)")
        ax_time.plot(images, [r["first_batch_s"] for r in mine], "o-", color=colour,
                     label=f"{impl}: first batch ({mine[0]['first_batch_workers']} workers)")
    for what, style, colour in (("pycocotools", "^:", "gray"), ("mnapps", "v:", "tab:blue")):
        parse = sorted((e["simulation"]["num_images"], e["first_parse"][what]["seconds"])
                       for e in result["sizes"] if what in e["first_parse"])
        label = "pycocotools COCO() load" if what == "pycocotools" else "mnapps first parse (builds the cache)"
        if parse:
            ax_time.plot([p[0] for p in parse], [p[1] for p in parse], style, color=colour, label=label)
    ax_mem.set(xlabel="images in the annotation file", ylabel="main + workers PSS (MiB)",
               title="memory after one epoch of annotation reads")
    ax_time.set(xlabel="images in the annotation file", ylabel="seconds", title="start-up")
    for ax in (ax_mem, ax_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
