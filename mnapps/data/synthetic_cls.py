"""The embedded classification dataset: coloured shapes on textured backgrounds.

This module owns a small, deterministic ImageFolder (``train/<class>/*.png`` and
``val/<class>/*.png``) that the package generates on first use and caches under
``$MNAPPS_CACHE`` (default ``~/.cache/mnapps``), so ``tools/train_cls.py`` runs with no data
argument and a new user sees MobileNetV1 learn in minutes on a CPU. The class is the
*shape*; its colour, size, position, rotation and the background texture are random, so a
model cannot score by colour or position alone. The same version and seed always produce
the same pixels (one ``numpy`` generator per image, seeded from split, class and index).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from mnapps.data.cache import SECONDS_PER_IMAGE, announce_generation, default_cache_dir, staged_folder

__all__ = ["SHAPE_CLASSES", "ShapesClsPaths", "ensure_shapes_classification", "default_cache_dir", "render_shape_image"]

SHAPE_CLASSES = ("circle", "cross", "ring", "square", "star", "triangle")
# Bump when the drawing code changes so stale caches are regenerated, not reused.
_VERSION = 3


@dataclass(frozen=True)
class ShapesClsPaths:
    """Where the generated dataset lives."""

    root: Path
    train: Path
    val: Path


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random background: a colour gradient, sinusoidal stripes and pixel noise, uint8 HxWx3.

    The texture is clutter, not camouflage: the gradient spans at most ~80 levels per channel
    so a shape coloured away from the background stays visible wherever it lands.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    start = rng.uniform(0, 255, size=3).astype(np.float32)
    end = np.clip(start + rng.uniform(-80, 80, size=3), 0, 255).astype(np.float32)
    angle = rng.uniform(0, math.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    image = start + (end - start) * ramp
    frequency = rng.uniform(2, 10)
    stripe_angle = rng.uniform(0, math.pi)
    stripes = np.sin(2 * math.pi * frequency * (np.cos(stripe_angle) * xx + np.sin(stripe_angle) * yy))
    image += rng.uniform(4, 16) * stripes[..., None]
    image += rng.normal(0, rng.uniform(2, 8), size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _polygon(cx: float, cy: float, radius: float, angle: float, corners: int, inner: float = 1.0) -> list[tuple[float, float]]:
    """Vertices of a regular polygon (``inner < 1`` alternates radii: a star)."""
    count = corners * (2 if inner < 1.0 else 1)
    points = []
    for k in range(count):
        r = radius if inner >= 1.0 or k % 2 == 0 else radius * inner
        theta = angle + 2 * math.pi * k / count
        points.append((cx + r * math.cos(theta), cy + r * math.sin(theta)))
    return points


def _cross(cx: float, cy: float, radius: float, angle: float, arm: float) -> list[tuple[float, float]]:
    """A plus sign as a 12-vertex polygon, rotated by ``angle``."""
    a, r = arm, radius
    outline = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a), (-a, -a)]
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in outline]


def render_shape_image(shape: str, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """Draw one ``shape`` (a name from :data:`SHAPE_CLASSES`) on a random texture."""
    if shape not in SHAPE_CLASSES:
        raise ValueError(f"unknown shape {shape!r}; choose from {list(SHAPE_CLASSES)}")
    background = _texture(rng, size)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.22, 0.4) * size
    margin = radius + 2
    cx, cy = rng.uniform(margin, size - margin, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    # A colour far from the background under the shape keeps it visible on every texture.
    top, left = int(cy - radius), int(cx - radius)
    local = background[max(top, 0) : int(cy + radius) + 1, max(left, 0) : int(cx + radius) + 1]
    mean = local.reshape(-1, 3).mean(0)
    while True:
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - mean).sum() > 200:
            break
    fill = tuple(int(c) for c in colour)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "ring":
        width = max(2, int(radius * rng.uniform(0.25, 0.4)))
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=fill, width=width)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, radius, angle, 4), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, radius, angle, 3), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, radius, angle, 5, inner=0.45), fill=fill)
    else:  # cross
        draw.polygon(_cross(cx, cy, radius, angle, radius * rng.uniform(0.22, 0.34)), fill=fill)
    return image


def _image_seed(seed: int, split: str, class_index: int, index: int) -> list[int]:
    return [_VERSION, seed, 0 if split == "train" else 1, class_index, index]


def ensure_shapes_classification(
    root: str | os.PathLike | None = None,
    *,
    train_per_class: int = 300,
    val_per_class: int = 50,
    image_size: int = 96,
    seed: int = 0,
) -> ShapesClsPaths:
    """Generate the shapes ImageFolder once (cached) and return its paths.

    Args:
        root: parent folder; default :func:`default_cache_dir`. The dataset goes into a
            sub-folder named by its settings, so different settings never mix.
        train_per_class, val_per_class: images per class in each split.
        image_size: side of the square PNGs in pixels.
        seed: base seed; the same settings always give the same images.
    """
    for name, value in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 (MobileNetV1's total stride), got {image_size}")
    base = Path(root) if root is not None else default_cache_dir()
    folder = base / f"shapes_cls_v{_VERSION}_s{image_size}_n{train_per_class}-{val_per_class}_seed{seed}"
    paths = ShapesClsPaths(folder, folder / "train", folder / "val")
    if (folder / "COMPLETE").is_file():
        return paths

    images = (train_per_class + val_per_class) * len(SHAPE_CLASSES)
    announce_generation("the shapes classification dataset", images, SECONDS_PER_IMAGE["shapes_cls"], folder)
    # The shared staging folder: an interrupted run never leaves half a dataset.
    with staged_folder(folder, lambda f: (f / "COMPLETE").is_file()) as staging:
        jobs = [
            (split, class_index, index)
            for split, count in (("train", train_per_class), ("val", val_per_class))
            for class_index in range(len(SHAPE_CLASSES))
            for index in range(count)
        ]
        for split in ("train", "val"):
            for shape in SHAPE_CLASSES:
                (staging / split / shape).mkdir(parents=True)
        for split, class_index, index in tqdm(jobs, desc="generating shapes dataset", unit="img", disable=None):
            rng = np.random.default_rng(_image_seed(seed, split, class_index, index))
            shape = SHAPE_CLASSES[class_index]
            render_shape_image(shape, rng, image_size).save(staging / split / shape / f"{index:05d}.png")
        (staging / "COMPLETE").write_text(f"shapes classification v{_VERSION}\n")
    return paths
