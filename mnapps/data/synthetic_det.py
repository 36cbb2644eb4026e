"""The embedded default detection dataset: coloured shapes on textured backgrounds, COCO format.

This module owns the small deterministic dataset that ``tools/train_det.py`` trains on when no
data is given, and that tests use as a real COCO-format dataset. Each image (about
``image_size`` pixels a side, sides varying by +-12%) shows 1-5 filled shapes of four classes,
circle, square, triangle and cross, with random colours (so the class is the *shape*), sizes and
rotations, on a smooth colour-noise background with faint strokes and pixel noise. Shapes may
overlap partially (each keeps at least 60% of its area visible). Sizes are spread so that all of
COCO's area ranges are populated: about 15% of the shapes are small (< 32^2 px visible), most
are medium and large.

The annotation files are real COCO: category ids 2, 5, 9, 11 (deliberately not contiguous, as
COCO's are not), ``bbox`` and ``area`` of the *visible* part of each shape, its RLE
``segmentation``, ``iscrowd`` 0, and ``width``/``height`` per image.

Determinism and caching: every image is drawn from its own generator seeded by
``(seed, split, index)``, so the same arguments give the same bytes. The dataset is generated
once into a temporary folder next to ``root`` and renamed into place, so a killed generation
never leaves a half dataset, and concurrent processes (DDP ranks) agree on one copy
(:mod:`mnapps.data.cache`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm import tqdm

from mnapps.data.cache import (
    SECONDS_PER_IMAGE,
    announce_generation,
    default_cache_dir,
    remove_abandoned_staging,
    staged_folder,
)

__all__ = [
    "ShapesPaths",
    "ensure_shapes_detection",
    "default_cache_dir",
    "SHAPE_CATEGORIES",
    "DATASET_NAME",
    "DEFAULT_NUM_TRAIN",
    "DEFAULT_NUM_VAL",
    "DEFAULT_IMAGE_SIZE",
]

DATASET_NAME = "shapes_det_v1"
#: COCO categories of the dataset; ids are deliberately non-contiguous.
SHAPE_CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 2, "name": "circle", "supercategory": "shape"},
    {"id": 5, "name": "square", "supercategory": "shape"},
    {"id": 9, "name": "triangle", "supercategory": "shape"},
    {"id": 11, "name": "cross", "supercategory": "shape"},
)
DEFAULT_NUM_TRAIN = 500
DEFAULT_NUM_VAL = 100
DEFAULT_IMAGE_SIZE = 288

_SPLITS = ("train", "val")
_MAX_OBJECTS = 5
# Shape side ranges in pixels (before the per-shape aspect jitter) and how often each is drawn.
_SIZE_BUCKETS = (("small", 0.12, (16, 30)), ("medium", 0.48, (40, 95)), ("large", 0.40, (105, None)))
_MIN_VISIBLE_FRACTION = 0.6  # an occluded shape keeps at least this share of its pixels
_MIN_COLOUR_DISTANCE = 90.0  # RGB distance between a shape and the background under it
_JPEG_QUALITY = 92
_MANIFEST = "manifest.json"


class ShapesPaths(NamedTuple):
    """Where the generated dataset lives: annotation files and image folders of both splits."""

    train_ann: Path
    train_images: Path
    val_ann: Path
    val_images: Path


def _paths(root: Path) -> ShapesPaths:
    return ShapesPaths(
        train_ann=root / "annotations" / "instances_train.json",
        train_images=root / "train",
        val_ann=root / "annotations" / "instances_val.json",
        val_images=root / "val",
    )


def ensure_shapes_detection(
    root: str | Path | None = None,
    *,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    progress: bool = True,
) -> ShapesPaths:
    """Return the shapes dataset, generating it on first use.

    Args:
        root: folder of the dataset. Default: ``default_cache_dir() / "shapes_det_v1"`` for the
            default arguments, a name encoding the arguments otherwise.
        num_train: training images (>= 1).
        num_val: validation images (>= 1).
        image_size: nominal image side in pixels (>= 96); each image's sides vary by +-12%.
        seed: generation seed; the same arguments always give byte-identical files.
        progress: show a tqdm bar while generating.

    Returns:
        :class:`ShapesPaths` (annotation JSON files and image folders of both splits).

    Raises:
        ValueError: bad arguments, or ``root`` exists but holds something else (a different
            dataset, or files without this dataset's manifest).
    """
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("image_size", image_size, 96)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    manifest = {"dataset": DATASET_NAME, "num_train": num_train, "num_val": num_val,
                "image_size": image_size, "seed": seed}
    if root is None:
        defaults = (num_train, num_val, image_size, seed) == (DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, DEFAULT_IMAGE_SIZE, 0)
        name = DATASET_NAME if defaults else f"{DATASET_NAME}_n{num_train}-{num_val}_s{image_size}_seed{seed}"
        root = default_cache_dir() / name
    root = Path(root).expanduser()

    if _is_complete(root, manifest):
        return _paths(root)
    if root.exists() and not (root.is_dir() and not any(root.iterdir())):
        raise ValueError(
            f"{root} exists but does not hold the {DATASET_NAME} dataset generated with {manifest} "
            f"(see its {_MANIFEST}); pass another root/--out or delete that folder"
        )
    remove_abandoned_staging(root)
    announce_generation("the shapes detection dataset", num_train + num_val, SECONDS_PER_IMAGE["shapes_det"], root)
    with staged_folder(root, lambda folder: _is_complete(folder, manifest)) as staging:
        _generate(staging, manifest, progress=progress)
    return _paths(root)


def _is_complete(root: Path, manifest: dict[str, Any]) -> bool:
    try:
        return json.loads((root / _MANIFEST).read_text()) == manifest
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------- generation
def _generate(out: Path, manifest: dict[str, Any], *, progress: bool) -> None:
    paths = _paths(out)
    paths.train_ann.parent.mkdir(parents=True)
    counts = {"train": manifest["num_train"], "val": manifest["num_val"]}
    bar = tqdm(total=sum(counts.values()), desc=f"generating {DATASET_NAME}", unit="img", disable=not progress,
               leave=False)
    with bar:
        for split_index, split in enumerate(_SPLITS):
            image_dir = paths.train_images if split == "train" else paths.val_images
            ann_file = paths.train_ann if split == "train" else paths.val_ann
            image_dir.mkdir()
            # Disjoint image id ranges keep ids unique if the splits are ever merged.
            first_id = 1 + split_index * 1_000_000
            images, annotations = [], []
            for index in range(counts[split]):
                rng = np.random.default_rng([manifest["seed"], split_index, index])
                pixels, objects = _render_image(rng, manifest["image_size"])
                image_id = first_id + index
                file_name = f"{split}_{index:06d}.jpg"
                Image.fromarray(pixels).save(image_dir / file_name, quality=_JPEG_QUALITY)
                images.append({"id": image_id, "file_name": file_name,
                               "width": int(pixels.shape[1]), "height": int(pixels.shape[0])})
                for obj in objects:
                    annotations.append({"id": first_id + len(annotations), "image_id": image_id, **obj})
                bar.update(1)
            coco = {
                "info": {"description": f"mnapps {DATASET_NAME}: synthetic shapes ({split})", "version": "1",
                         "year": 2024, "contributor": "mnapps", "seed": manifest["seed"]},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": [dict(c) for c in SHAPE_CATEGORIES],
            }
            ann_file.write_text(json.dumps(coco))
    # Written last: its presence marks a complete dataset.
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=1))


def _render_image(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image ``uint8[H, W, 3]`` and its COCO annotations (without ids)."""
    width = int(rng.integers(round(image_size * 0.88), round(image_size * 1.12) + 1))
    height = int(rng.integers(round(image_size * 0.88), round(image_size * 1.12) + 1))
    canvas = _background(rng, width, height)

    full_masks: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    category_ids: list[int] = []
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        category = SHAPE_CATEGORIES[int(rng.integers(len(SHAPE_CATEGORIES)))]
        for _attempt in range(20):
            mask = _shape_mask(rng, category["name"], width, height)
            if mask is None:
                continue
            # Partial overlap is fine, hiding most of an earlier shape is not.
            if all((vis & ~mask).sum() >= _MIN_VISIBLE_FRACTION * full.sum() for vis, full in zip(visible, full_masks)):
                break
        else:
            continue
        colour = _contrasting_colour(rng, canvas[mask].mean(axis=0))
        _paint(rng, canvas, mask, colour)
        visible = [vis & ~mask for vis in visible]
        visible.append(mask.copy())
        full_masks.append(mask)
        category_ids.append(category["id"])

    # Sensor-like noise over everything, so shapes are not perfectly flat either.
    noisy = canvas.astype(np.float32) + rng.normal(0.0, 5.0, canvas.shape).astype(np.float32)
    pixels = np.clip(np.round(noisy), 0, 255).astype(np.uint8)

    objects = []
    for vis, category_id in zip(visible, category_ids):
        rows, cols = np.flatnonzero(vis.any(axis=1)), np.flatnonzero(vis.any(axis=0))
        x, y = int(cols[0]), int(rows[0])
        w, h = int(cols[-1]) + 1 - x, int(rows[-1]) + 1 - y
        rle = mask_utils.encode(np.asfortranarray(vis.astype(np.uint8)))
        objects.append({
            "category_id": category_id,
            "bbox": [float(x), float(y), float(w), float(h)],
            "area": float(vis.sum()),
            "iscrowd": 0,
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
        })
    return pixels, objects


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour noise around a muted base colour, with a few faint strokes."""
    base = _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.05, 0.45), rng.uniform(0.3, 0.8))
    grid = rng.normal(0.0, 28.0, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3)).astype(np.float32)
    smooth = np.stack([np.asarray(Image.fromarray(grid[:, :, c]).resize((width, height), Image.BICUBIC))
                       for c in range(3)], axis=2)
    texture = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(texture)
    for _ in range(int(rng.integers(2, 7))):
        x0, x1 = rng.uniform(0, width, 2)
        y0, y1 = rng.uniform(0, height, 2)
        draw.line([(x0, y0), (x1, y1)], fill=int(rng.integers(10, 30)), width=int(rng.integers(1, 4)))
    strokes = np.asarray(texture, dtype=np.float32)[:, :, None] * rng.choice([-1.0, 1.0])
    return np.clip(np.asarray(base, dtype=np.float32) + smooth + strokes, 0, 255)


def _shape_mask(rng: np.random.Generator, shape: str, width: int, height: int) -> np.ndarray | None:
    """Boolean ``[H, W]`` mask of one shape placed fully inside the image, or None if it cannot fit."""
    bucket = rng.choice(len(_SIZE_BUCKETS), p=[b[1] for b in _SIZE_BUCKETS])
    low, high = _SIZE_BUCKETS[bucket][2]
    high = int(0.7 * min(width, height)) if high is None else high
    if high < low:
        return None
    side = float(rng.uniform(low, high))
    aspect = float(rng.uniform(0.8, 1.25))
    half_w, half_h = side * math.sqrt(aspect) / 2, side / math.sqrt(aspect) / 2
    if shape == "circle":
        angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        outline = [(half_w * math.cos(t), half_h * math.sin(t)) for t in angles]
        angle = 0.0
    elif shape == "square":
        outline = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
        angle = float(rng.uniform(-30, 30))
    elif shape == "triangle":
        outline = [(0.0, -half_h), (half_w, half_h), (-half_w, half_h)]
        angle = float(rng.uniform(0, 360))
    elif shape == "cross":
        arm_w, arm_h = half_w / 3, half_h / 3
        outline = [(-arm_w, -half_h), (arm_w, -half_h), (arm_w, -arm_h), (half_w, -arm_h), (half_w, arm_h),
                   (arm_w, arm_h), (arm_w, half_h), (-arm_w, half_h), (-arm_w, arm_h), (-half_w, arm_h),
                   (-half_w, -arm_h), (-arm_w, -arm_h)]
        angle = float(rng.uniform(-20, 20))
    else:  # pragma: no cover - guarded by SHAPE_CATEGORIES
        raise ValueError(f"unknown shape {shape!r}")
    cos_a, sin_a = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    points = np.array([(x * cos_a - y * sin_a, x * sin_a + y * cos_a) for x, y in outline])
    span = points.max(axis=0) - points.min(axis=0)
    if span[0] >= width - 2 or span[1] >= height - 2:
        return None
    centre_x = rng.uniform(-points[:, 0].min() + 1, width - 1 - points[:, 0].max())
    centre_y = rng.uniform(-points[:, 1].min() + 1, height - 1 - points[:, 1].max())
    image = Image.new("L", (width, height), 0)
    ImageDraw.Draw(image).polygon([(x + centre_x, y + centre_y) for x, y in points], fill=1)
    mask = np.asarray(image, dtype=bool)
    return mask if mask.sum() >= 64 else None


def _contrasting_colour(rng: np.random.Generator, background_rgb: np.ndarray) -> np.ndarray:
    """A saturated random colour far enough from the background under the shape."""
    colour = background_rgb
    for _ in range(30):
        colour = np.asarray(_hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0)))
        if np.linalg.norm(colour - background_rgb) >= _MIN_COLOUR_DISTANCE:
            break
    return colour


def _paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    """Fill the mask with ``colour`` under a gentle linear shading (real objects are not flat)."""
    rows, cols = np.nonzero(mask)
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) + 1e-9
    extent = max(int(np.ptp(rows)), int(np.ptp(cols)), 1)
    shade = ((rows - rows.mean()) * direction[0] + (cols - cols.mean()) * direction[1]) / extent * 40.0
    canvas[rows, cols] = np.clip(colour[None, :] + shade[:, None], 0, 255)


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return (255.0 * r, 255.0 * g, 255.0 * b)


# --------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnapps.data.synthetic_det",
        description=f"Generate (or find) the embedded {DATASET_NAME} COCO-format detection dataset: "
                    "coloured circles, squares, triangles and crosses on textured backgrounds.",
    )
    parser.add_argument("--out", type=Path, default=None,
                        help=f"dataset folder (default: CACHE/{DATASET_NAME}, CACHE = $MNAPPS_CACHE or ~/.cache/mnapps)")
    parser.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN,
                        help="training images (default %(default)s)")
    parser.add_argument("--num-val", type=int, default=DEFAULT_NUM_VAL, help="validation images (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                        help="nominal image side in pixels; sides vary by +-12%% (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        paths = ensure_shapes_detection(args.out, num_train=args.num_train, num_val=args.num_val,
                                        image_size=args.image_size, seed=args.seed)
    except ValueError as err:
        parser.error(str(err))
    for field, path in zip(ShapesPaths._fields, paths):
        print(f"{field}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
