"""Robust image loading shared by every mnapps dataset: any file PIL reads -> RGB ``uint8``.

This module owns the conversion of real-world image files into the one array layout the
pipelines use, ``np.ndarray[H, W, 3]`` ``uint8`` RGB in display orientation:

* EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), as photo viewers, browsers and
  detectron2 do; :func:`load_rgb` can be told to keep the stored pixels instead, which
  :class:`mnapps.data.coco.CocoDetection` does when an annotation file was evidently made on
  the stored (un-rotated) pixels.
* grayscale, palette, CMYK and the other PIL modes are converted to RGB; images with an alpha
  channel (RGBA, LA, palette with transparency) are composited onto white, the background
  image viewers show, so that transparent regions do not come out as arbitrary stored colours;
* 16-bit grayscale (``I;16``) is scaled to 8 bits (65535 -> 255) instead of being clipped, and
  32-bit integer / float images are mapped to 8 bits by their range.

Every failure to decode (missing file, truncated or corrupt data, unknown format, a
decompression bomb) is raised as :class:`ImageReadError` naming the file, so callers that must
survive bad files (a long training run) catch exactly one exception type. It also owns which
files count as images (:data:`IMAGE_EXTENSIONS`) and :func:`list_images`, the one way every
tool turns a folder or a list of paths into image files.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_images",
    "ImageReadError",
    "ALPHA_BACKGROUND",
    "EXIF_ORIENTATION_TAG",
    "SWAPPING_ORIENTATIONS",
    "exif_orientation",
    "load_rgb",
    "pil_to_rgb_array",
]

#: Suffixes (lower case) of the files every mnapps tool reads as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

#: RGB colour that transparent pixels are composited onto (what image viewers show).
ALPHA_BACKGROUND = (255, 255, 255)
#: The EXIF tag holding the orientation (1 = as stored, 2..8 = flips and rotations).
EXIF_ORIENTATION_TAG = 0x0112
#: Orientations whose transpose swaps width and height (rotations by 90 or 270 degrees).
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# What PIL raises for files it cannot decode; DecompressionBombError is not an OSError.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageReadError(OSError):
    """An image file could not be read or decoded (the message names the file and the cause)."""


def exif_orientation(image: Image.Image) -> int:
    """EXIF orientation of an opened image: 1 (as stored) when absent or unreadable, else 2..8."""
    try:
        orientation = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - corrupt EXIF blocks raise many types; they mean "no tag"
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map a single-channel array of a high-depth PIL mode to ``uint8``."""
    if mode.startswith("I;16"):
        # Full 16-bit range -> 8 bits; rounding keeps 65535 -> 255 and 257*k -> k exactly.
        return np.round(values.astype(np.float32) / 257.0).astype(np.uint8)
    values = values.astype(np.float64)
    if mode == "F" and np.nanmax(values, initial=0.0) <= 1.0:
        values = values * 255.0  # float images normalised to [0, 1]
    elif mode == "I" and np.nanmax(values, initial=0.0) > 255:
        values = values / 257.0  # 32-bit container holding 16-bit samples (common for PNG/TIFF)
    return np.clip(np.nan_to_num(np.round(values)), 0, 255).astype(np.uint8)


def pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert an opened PIL image of any mode to RGB.

    Args:
        image: a loaded PIL image (orientation already handled by the caller).

    Returns:
        ``np.ndarray[H, W, 3]`` ``uint8`` RGB; alpha is composited onto :data:`ALPHA_BACKGROUND`.
    """
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        gray = _to_uint8(np.asarray(image), mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3:4] / 255.0
        background = np.asarray(ALPHA_BACKGROUND, dtype=np.float32)
        blended = rgba[:, :, :3] * alpha + background * (1.0 - alpha)
        return np.round(blended).astype(np.uint8)
    if mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)  # copy: the array must own writable memory


def load_rgb(
    path: str | Path,
    *,
    apply_exif: bool = True,
    expected_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read an image file as RGB ``uint8`` in display orientation.

    Args:
        path: the image file (any format PIL reads: JPEG, PNG, TIFF, BMP, WebP, ...).
        apply_exif: rotate/flip by the EXIF orientation tag (default). ``False`` returns the
            stored pixels.
        expected_size: ``(width, height)`` that annotations of this image were made on (COCO's
            ``width``/``height``). When the EXIF orientation swaps the axes and this size matches
            the *stored* pixels but not the transposed ones, the annotations were evidently made
            on the stored pixels, so those are returned (with a warning) to keep boxes on their
            objects. For orientations that do not swap axes the transposed image is returned, as
            detectron2 and COCO tools assume.

    Returns:
        ``np.ndarray[H, W, 3]`` ``uint8`` RGB (``H, W`` after the EXIF transpose, if applied).

    Raises:
        ImageReadError: the file is missing, truncated, corrupt or not an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            orientation = exif_orientation(image) if apply_exif else 1
            if orientation != 1 and not _annotated_on_stored_pixels(image, orientation, expected_size, path):
                image = _exif_transpose(image, path)
            return pil_to_rgb_array(image)
    except _DECODE_ERRORS as err:
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def _annotated_on_stored_pixels(
    image: Image.Image, orientation: int, expected_size: tuple[int, int] | None, path: Path
) -> bool:
    """True when ``expected_size`` proves the annotations refer to the un-rotated pixels."""
    if expected_size is None or orientation not in SWAPPING_ORIENTATIONS:
        return False
    stored = (image.width, image.height)
    transposed = (image.height, image.width)
    if tuple(expected_size) == stored and stored != transposed:
        warnings.warn(
            f"{path}: EXIF orientation {orientation} would rotate the image to {transposed[0]}x"
            f"{transposed[1]}, but its annotations are for the stored {stored[0]}x{stored[1]} pixels; "
            "using the stored pixels so the boxes stay on their objects",
            RuntimeWarning,
            stacklevel=4,
        )
        return True
    return False


def _exif_transpose(image: Image.Image, path: Path) -> Image.Image:
    """``ImageOps.exif_transpose``, falling back to the stored pixels when the EXIF is broken."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as err:  # noqa: BLE001 - a broken EXIF block must not lose the image
        warnings.warn(f"{path}: cannot apply EXIF orientation ({err}); using the stored pixels",
                      RuntimeWarning, stacklevel=3)
        return image


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def list_images(
    source: str | os.PathLike | Iterable[str | os.PathLike], *, recursive: bool = True
) -> list[Path]:
    """Image files named by ``source``: a file, a folder, or a list of files and folders.

    A folder contributes its image files (by :data:`IMAGE_EXTENSIONS`), sorted, searching
    sub-folders when ``recursive``; hidden files and folders (names starting with ``.``) are
    skipped. A file is taken as given, in the order given. The result may be empty.

    Raises:
        FileNotFoundError: a named file or folder does not exist.
    """
    entries = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    found: list[Path] = []
    for entry in map(Path, entries):
        if entry.is_file():
            found.append(entry)
        elif entry.is_dir():
            candidates = entry.rglob("*") if recursive else entry.iterdir()
            found.extend(sorted(
                path for path in candidates
                if _is_image(path) and not any(part.startswith(".") for part in path.relative_to(entry).parts)
            ))
        else:
            raise FileNotFoundError(f"image file or folder {entry} does not exist")
    return found
