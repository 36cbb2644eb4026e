"""ImageFolder-style classification data: ``root/<class>/<image>`` with clear errors.

This module owns reading a class-per-folder dataset (the layout of ImageNet's ``train/`` and
``val/`` as usually unpacked, and of the embedded shapes set), the classification transforms
(light augmentation for training, TF-slim-style resize for evaluation, output scaled to the
[-1, 1] range every mnapps model expects) and the collate function. Bad layouts fail at
construction with the folder named; a single unreadable image inside a dataset is skipped
with a warning and counted so a long training run goes on. Grayscale, palette, RGBA and
EXIF-rotated photos all come out as upright RGB.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from .image_io import IMAGE_EXTENSIONS, ImageReadError, list_images, load_rgb

__all__ = [
    "ImageFolderDataset",
    "build_cls_transforms",
    "collate_cls",
    "to_model_range",
]


def to_model_range(image: Tensor) -> Tensor:
    """uint8 or [0, 1] float ``Tensor[3, H, W]`` -> float in [-1, 1] (x / 127.5 - 1)."""
    if image.dtype == torch.uint8:
        return image.float() / 127.5 - 1.0
    return image * 2.0 - 1.0


class ImageFolderDataset(Dataset):
    """Images in ``root/<class name>/``; labels are class folders in sorted order.

    Args:
        root: the split's folder (e.g. ``.../train``).
        transform: maps a PIL RGB image to the model's input (e.g. :func:`build_cls_transforms`);
            None returns the PIL image.
        class_names: fix the class list (e.g. the training split's, for ``val/``); the
            folders must then match exactly.

    ``ds[i]`` is ``(image, label)`` or ``None`` when the file cannot be read (a warning names
    it, :func:`collate_cls` drops and counts it). Attributes: ``class_names``, ``samples``
    (``[(path, label)]``), ``num_classes``.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no class folders, a class folder without images (named), no images.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        *,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        if not self.root.exists():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} is a file; expected a folder of class folders")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            loose = list_images(self.root, recursive=False)
            hint = f" (found {len(loose)} loose images: put them in one folder per class)" if loose else ""
            raise ValueError(f"image folder {self.root} has no class folders{hint}; expected {self.root}/<class>/<image>")
        if class_names is not None and list(class_names) != found:
            raise ValueError(
                f"class folders of {self.root} {found} differ from the expected classes {list(class_names)} "
                "(train and val must have the same class folders)"
            )
        self.class_names = found
        self.samples: list[tuple[Path, int]] = []
        empty = []
        for label, name in enumerate(found):
            files = list_images(self.root / name)
            if not files:
                empty.append(name)
            self.samples.extend((path, label) for path in files)
        if not self.samples:
            raise ValueError(
                f"image folder {self.root} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)}) "
                f"in its class folders {found}"
            )
        if empty:
            raise ValueError(
                f"class folder(s) {', '.join(str(self.root / n) for n in empty)} contain no images; "
                "add images or remove the folder"
            )
        self.num_unreadable = 0  # in this process; with workers, count what collate_cls returns

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = Image.fromarray(load_rgb(path))
        except ImageReadError as exc:
            self.num_unreadable += 1
            warnings.warn(f"skipping unreadable image: {exc}", RuntimeWarning, stacklevel=2)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def build_cls_transforms(
    train: bool,
    resolution: int,
    *,
    min_crop_area: float = 0.25,
    hflip: bool = True,
    color_jitter: float = 0.0,
    eval_crop_fraction: float = 0.875,
) -> Callable[[Image.Image], Tensor]:
    """PIL RGB image -> ``Tensor[3, resolution, resolution]`` in [-1, 1].

    Training: random resized crop (area fraction ``min_crop_area``..1, aspect 3/4..4/3),
    optional horizontal flip and colour jitter. The paper (Sec. 3.2) trains small models with
    *less* augmentation than Inception, hence the mild defaults. Evaluation: the TF-slim
    recipe, a central crop of ``eval_crop_fraction`` of the image then a bilinear resize to
    ``resolution`` (1.0 resizes the whole image, as the reference TF inputs were made).
    """
    if resolution < 32:
        raise ValueError(f"resolution must be >= 32 (MobileNetV1's total stride), got {resolution}")
    if not 0.0 < min_crop_area <= 1.0:
        raise ValueError(f"min_crop_area must be in (0, 1], got {min_crop_area}")
    if not 0.0 < eval_crop_fraction <= 1.0:
        raise ValueError(f"eval_crop_fraction must be in (0, 1], got {eval_crop_fraction}")
    steps: list[Callable] = [T.PILToTensor()]
    if train:
        steps.append(T.RandomResizedCrop(resolution, scale=(min_crop_area, 1.0), antialias=True))
        if hflip:
            steps.append(T.RandomHorizontalFlip())
        if color_jitter > 0:
            steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    else:
        if eval_crop_fraction < 1.0:
            steps.append(_CentralFraction(eval_crop_fraction))
        steps.append(T.Resize((resolution, resolution), antialias=True))
    steps.append(T.Lambda(to_model_range))
    return T.Compose(steps)


class _CentralFraction:
    """Keep the central ``fraction`` of each side (TF's ``central_crop``)."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def __call__(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        return T.functional.center_crop(image, [max(1, round(height * self.fraction)), max(1, round(width * self.fraction))])


def collate_cls(batch: list) -> tuple[Tensor, Tensor, int]:
    """Stack ``(image, label)`` samples, dropping unreadable ones (``None``).

    Returns:
        ``(images Tensor[N, 3, H, W], labels Int64[N], num_skipped)``; ``N`` may be 0 when
        every sample of the batch was unreadable.
    """
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), skipped
    images = torch.stack([image for image, _ in kept])
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
    return images, labels, skipped
