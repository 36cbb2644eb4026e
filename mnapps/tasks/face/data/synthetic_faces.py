"""The embedded face-like dataset: generated cartoon faces, one folder per generated identity.

This module owns a small, deterministic face folder (``train/<identity>/*.png`` and
``val/<identity>/*.png``, 160x160 RGB) that the package generates on first use and caches
under ``$MNAPPS_CACHE`` (default ``~/.cache/mnapps``), so ``tools/distill_face.py`` runs with
no data argument. An *identity* fixes the things that make a face recognisable (skin and hair
colour, head shape, eye spacing and colour, brows, nose, mouth, hair style); every image of it
then varies pose (shift, scale, in-plane rotation), lighting, background, expression and
noise, as photos of one person do. The validation identities are disjoint from the training
ones, so a held-out score measures generalisation to unseen faces, not memorisation. The
same version and seed always produce the same pixels (one ``numpy`` generator per identity
and per image, seeded from split and index).
"""

from __future__ import annotations

import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from mnapps.data.cache import SECONDS_PER_IMAGE, announce_generation, default_cache_dir, staged_folder

__all__ = ["SyntheticFacePaths", "ensure_synthetic_faces", "render_face", "sample_identity"]

# Bump when the drawing code changes so stale caches are regenerated, not reused.
_VERSION = 1
# Drawing happens at this multiple of the output size, then is downsampled (anti-aliasing).
_SUPERSAMPLE = 2


@dataclass(frozen=True)
class SyntheticFacePaths:
    """Where the generated dataset lives; ``train`` and ``val`` hold identity sub-folders."""

    root: Path
    train: Path
    val: Path


def sample_identity(rng: np.random.Generator) -> dict:
    """Draw the fixed traits of one generated person (all in units of the image size)."""
    skin_base = np.array([rng.uniform(95, 245), rng.uniform(65, 200), rng.uniform(45, 175)])
    skin = np.sort(skin_base)[::-1]  # R >= G >= B: skin-like hues from pale to dark
    return {
        "skin": skin,
        "hair": rng.uniform(10, 200, size=3) * rng.choice([0.3, 1.0]),
        "face_w": rng.uniform(0.25, 0.34),
        "face_h": rng.uniform(0.33, 0.42),
        "chin": rng.uniform(0.0, 0.35),  # how pointed the jaw is
        "eye_dx": rng.uniform(0.09, 0.14),
        "eye_y": rng.uniform(-0.07, 0.0),
        "eye_r": rng.uniform(0.022, 0.04),
        "iris": rng.uniform(20, 160, size=3),
        "brow_t": rng.uniform(0.008, 0.022),
        "brow_tilt": rng.uniform(-0.3, 0.3),
        "nose_len": rng.uniform(0.05, 0.11),
        "nose_w": rng.uniform(0.02, 0.05),
        "mouth_w": rng.uniform(0.06, 0.13),
        "mouth_y": rng.uniform(0.1, 0.14),
        "lip": rng.uniform(60, 200, size=3) * np.array([1.0, 0.55, 0.6]),
        "hair_style": int(rng.integers(0, 4)),  # 0 short cap, 1 long sides, 2 bald, 3 fringe
        "hair_h": rng.uniform(0.06, 0.16),
        "beard": bool(rng.random() < 0.25),
        "glasses": bool(rng.random() < 0.2),
    }


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    start, end = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, math.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    image = start + (end - start) * ramp + rng.normal(0, 6, size=(size, size, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _colour(values: np.ndarray, light: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(v * light, 0, 255)) for v in values)  # type: ignore[return-value]


def render_face(identity: dict, rng: np.random.Generator, size: int = 160) -> Image.Image:
    """Draw one photo of ``identity`` with random pose, lighting, expression and background.

    Returns:
        A ``size`` x ``size`` RGB PIL image.
    """
    canvas = size * _SUPERSAMPLE
    light = rng.uniform(0.7, 1.2)
    image = _background(rng, canvas)
    draw = ImageDraw.Draw(image)
    # Pose: the whole face moves/scales together; rotation is applied to the finished layer.
    cx = canvas * (0.5 + rng.uniform(-0.05, 0.05))
    cy = canvas * (0.5 + rng.uniform(-0.05, 0.05))
    # Traits are in units of a face-box: like an MTCNN crop, the face fills most of the image.
    s = canvas * 1.7 * rng.uniform(0.9, 1.08)
    idt = identity

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [cx + x0 * s, cy + y0 * s, cx + x1 * s, cy + y1 * s]

    face = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    fdraw = ImageDraw.Draw(face)
    hair = _colour(idt["hair"], light)
    skin = _colour(idt["skin"], light)
    fw, fh = idt["face_w"] / 2, idt["face_h"] / 2
    if idt["hair_style"] == 1:  # long hair behind the head
        fdraw.rounded_rectangle(box(-fw * 1.25, -fh * 1.1, fw * 1.25, fh * 1.2), radius=int(0.1 * s), fill=hair)
    fdraw.rectangle(box(-fw * 0.45, fh * 0.5, fw * 0.45, fh * 1.8), fill=_colour(idt["skin"] * 0.85, light))  # neck
    fdraw.ellipse(box(-fw, -fh, fw, fh), fill=skin)
    chin = idt["chin"]
    fdraw.polygon(
        [(cx - fw * s * 0.8, cy + fh * s * 0.4), (cx + fw * s * 0.8, cy + fh * s * 0.4), (cx, cy + fh * s * (1.0 + chin * 0.3))],
        fill=skin,
    )
    for side in (-1, 1):  # ears
        fdraw.ellipse(box(side * fw - 0.03, -0.03, side * fw + 0.03, 0.05), fill=skin)
    if idt["hair_style"] in (0, 1, 3):
        fdraw.chord(box(-fw * 1.05, -fh * 1.12, fw * 1.05, -fh + 2 * idt["hair_h"]), 180, 360, fill=hair)
    if idt["hair_style"] == 3:
        fdraw.rectangle(box(-fw * 0.8, -fh * 0.95, fw * 0.6, -fh * 0.6), fill=hair)
    # Eyes, irises, brows; expression: random eye openness, brow lift, smile curvature.
    openness = rng.uniform(0.5, 1.0)
    brow_lift = rng.uniform(-0.01, 0.015)
    gaze = rng.uniform(-0.3, 0.3)
    for side in (-1, 1):
        ex, ey, er = side * idt["eye_dx"], idt["eye_y"], idt["eye_r"]
        fdraw.ellipse(box(ex - er * 1.6, ey - er * openness, ex + er * 1.6, ey + er * openness), fill=(245, 245, 240))
        ir = er * 0.8 * min(openness + 0.2, 1.0)
        fdraw.ellipse(box(ex + gaze * er - ir, ey - ir, ex + gaze * er + ir, ey + ir), fill=_colour(idt["iris"], light))
        fdraw.ellipse(box(ex + gaze * er - ir * 0.4, ey - ir * 0.4, ex + gaze * er + ir * 0.4, ey + ir * 0.4), fill=(15, 15, 15))
        by = ey - er * 2.0 - brow_lift
        tilt = idt["brow_tilt"] * side * er
        fdraw.line(
            [(cx + (ex - er * 1.8) * s, cy + (by + tilt) * s), (cx + (ex + er * 1.8) * s, cy + (by - tilt) * s)],
            fill=hair,
            width=max(1, int(idt["brow_t"] * s)),
        )
        if idt["glasses"]:
            fdraw.ellipse(box(ex - er * 2.3, ey - er * 1.9, ex + er * 2.3, ey + er * 1.9), outline=(30, 30, 30), width=max(1, int(0.008 * s)))
    shade = _colour(idt["skin"] * 0.75, light)
    nl, nw = idt["nose_len"], idt["nose_w"]
    fdraw.polygon([(cx, cy + (idt["eye_y"] + 0.02) * s), (cx - nw * s, cy + (idt["eye_y"] + nl) * s), (cx + nw * s, cy + (idt["eye_y"] + nl) * s)], fill=shade)
    if idt["beard"]:
        fdraw.chord(box(-fw * 0.9, fh * 0.1, fw * 0.9, fh * 1.15), 0, 180, fill=hair)
    mw, my = idt["mouth_w"], idt["mouth_y"]
    smile = rng.uniform(-0.3, 1.0)
    mouth_box = box(-mw, my - 0.03 * max(smile, 0.1), mw, my + 0.03 * max(smile, 0.3))
    fdraw.arc(mouth_box, 10 if smile > 0 else 190, 170 if smile > 0 else 350, fill=_colour(idt["lip"], light), width=max(2, int(0.014 * s)))
    face = face.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR, center=(cx, cy))
    image.paste(face, (0, 0), face)
    # Directional lighting: a soft left/right brightness ramp over the whole photo.
    pixels = np.asarray(image, dtype=np.float32)
    ramp = np.linspace(1 - rng.uniform(0, 0.25), 1 + rng.uniform(0, 0.25), canvas, dtype=np.float32)
    if rng.random() < 0.5:
        ramp = ramp[::-1]
    pixels = pixels * ramp[None, :, None] + rng.normal(0, rng.uniform(1, 7), size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5) * _SUPERSAMPLE))
    return image.resize((size, size), Image.BILINEAR, reducing_gap=2.0)


def _write_identity(split_dir: Path, split_seed: int, k: int, per_identity: int, size: int, seed: int) -> int:
    # Every pixel depends only on (seed, split, identity, image), so identities can be drawn
    # in any order, on any thread, and still give the same files.
    identity = sample_identity(np.random.default_rng([seed, split_seed, k]))
    folder = split_dir / f"person_{k:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(per_identity):
        rng = np.random.default_rng([seed, split_seed, k, j + 1])
        render_face(identity, rng, size).save(folder / f"{j:02d}.png")
    return per_identity


def _write_split(split_dir: Path, split_seed: int, identities: int, per_identity: int, size: int, seed: int,
                 workers: int) -> None:
    draw = partial(_write_identity, split_dir, split_seed, per_identity=per_identity, size=size, seed=seed)
    with tqdm(total=identities * per_identity, desc=f"generating faces ({split_dir.name})", unit="img",
              leave=False) as bar, ThreadPoolExecutor(max_workers=max(1, min(workers, identities))) as pool:
        for done in pool.map(draw, range(identities)):
            bar.update(done)


def ensure_synthetic_faces(
    root: str | Path | None = None,
    *,
    train_identities: int = 40,
    val_identities: int = 10,
    images_per_identity: int = 8,
    image_size: int = 160,
    seed: int = 0,
    workers: int | None = None,
) -> SyntheticFacePaths:
    """Generate the embedded face dataset once and return its paths (cached afterwards).

    Args:
        root: folder that holds the cached dataset; default ``$MNAPPS_CACHE`` or
            ``~/.cache/mnapps``. The dataset goes into a sub-folder named after its settings.
        train_identities, val_identities: numbers of (disjoint) generated people per split.
        images_per_identity: photos drawn of each person.
        image_size: side of the square RGB images.
        seed: generator seed; the same settings always give the same pixels.
        workers: threads drawing in parallel (default: one per CPU core, at most 8; Pillow
            releases the GIL while it draws and encodes); the files do not depend on it.

    Returns:
        :class:`SyntheticFacePaths` with ``train/<person>/*.png`` and ``val/<person>/*.png``.
    """
    for name, value in (("train_identities", train_identities), ("val_identities", val_identities),
                        ("images_per_identity", images_per_identity)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    base = Path(root) if root is not None else default_cache_dir()
    name = f"synthetic_faces_v{_VERSION}_s{seed}_{train_identities}x{val_identities}x{images_per_identity}_{image_size}"
    final = base / name
    paths = SyntheticFacePaths(final, final / "train", final / "val")
    if (final / ".complete").is_file():
        return paths
    if final.exists():  # not complete, so no generation of ours made it: an earlier, foreign attempt
        shutil.rmtree(final)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    images = (train_identities + val_identities) * images_per_identity
    announce_generation("the generated face dataset", images, SECONDS_PER_IMAGE["faces"], final, workers)
    # The shared staging folder: an interrupted run never leaves half a dataset, and when two
    # torchrun ranks generate at once the first complete copy is kept for whoever reads it.
    with staged_folder(final, lambda folder: (folder / ".complete").is_file()) as staging:
        _write_split(staging / "train", 1, train_identities, images_per_identity, image_size, seed, workers)
        _write_split(staging / "val", 2, val_identities, images_per_identity, image_size, seed, workers)
        (staging / ".complete").write_text("ok\n")
    return paths
