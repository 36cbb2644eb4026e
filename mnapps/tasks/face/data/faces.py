"""Face-crop folders for distillation, embedding and evaluation, and their augmentation.

This module owns how aligned face crops on disk become tensors:

* :class:`FaceFolder` lists every image under one or more folders (recursively, in sorted
  order); identity sub-folders are optional (distillation needs no labels), and when present
  the folder path is kept as the item's identity. ``ds[i]`` is ``(image, i)``: the index lets
  a training step look up the teacher's cached embedding of that very file.
* :func:`build_face_transforms` is the augmentation for distillation (``light``: the
  variations between two photos of one person; ``strong``: far-reaching views for a teacher
  that embeds each view itself; optional random erasing) and the plain resize for
  evaluation; all give ``FloatTensor[3, S, S]`` in [0, 1]. :class:`RepeatedFaces` shows each
  crop several times per epoch.
* :func:`face_collate` stacks a batch and drops unreadable images (reported by count, as the
  detection collate does); :func:`split_holdout` makes a deterministic held-out split.

Crops are expected to be aligned already (``tools/align_faces.py``); a non-square image is
resized to the square without cropping.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mnapps.data.image_io import IMAGE_EXTENSIONS, ImageReadError, list_images, load_rgb

__all__ = [
    "FaceTransform",
    "build_face_transforms",
    "FaceFolder",
    "RepeatedFaces",
    "AUGMENT_STRENGTHS",
    "face_collate",
    "split_holdout",
    "image_to_tensor",
]


def image_to_tensor(image: np.ndarray) -> Tensor:
    """``uint8[H, W, 3]`` RGB -> ``FloatTensor[3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32) / np.float32(255.0))


class FaceTransform:
    """An albumentations pipeline for face crops: ``uint8[H, W, 3]`` -> ``FloatTensor[3, S, S]`` in [0, 1].

    Args:
        image_size: side of the square output.
        augment: the albumentations transforms applied after the resize (empty: resize only).

    Randomness: each call draws one seed from torch's default generator and drives the whole
    pipeline from it, so ``torch.manual_seed`` (and the engine's per-epoch seeding and resume)
    make augmentation reproducible, and DataLoader workers never repeat each other.
    """

    def __init__(self, image_size: int, augment: Sequence[A.BasicTransform] = ()) -> None:
        if image_size < 32:
            raise ValueError(f"face image_size must be >= 32 pixels, got {image_size}")
        self.image_size = int(image_size)
        self.compose = A.Compose(list(augment)) if augment else None

    def __call__(self, image: np.ndarray) -> Tensor:
        if image.shape[:2] != (self.image_size, self.image_size):
            interpolation = cv2.INTER_AREA if min(image.shape[:2]) > self.image_size else cv2.INTER_LINEAR
            image = cv2.resize(image, (self.image_size, self.image_size), interpolation=interpolation)
        if self.compose is not None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
            image = self.compose(image=image)["image"]
        return image_to_tensor(image)

    @property
    def random(self) -> bool:
        """True when the transform augments (two calls on one image differ)."""
        return self.compose is not None

    def __repr__(self) -> str:
        names = "" if self.compose is None else ", ".join(type(t).__name__ for t in self.compose.transforms)
        return f"FaceTransform(size={self.image_size}, augment=[{names}])"


#: Augmentation strengths of :func:`build_face_transforms`.
AUGMENT_STRENGTHS = ("light", "strong")


def build_face_transforms(
    train: bool, image_size: int = 160, *, strength: str = "light", erasing: float = 0.0
) -> FaceTransform:
    """The face-crop pipeline.

    Args:
        train: augmentation for distillation (True) or a plain resize (False).
        image_size: side of the square output (the teacher's 160 by default).
        strength: ``"light"``: what separates two photos of one person, safe when the
            teacher's embedding of the *un-augmented* crop is the target (cache): flip,
            shift/scale/rotation of a few percent/degrees, colour jitter, rare grayscale and
            blur. ``"strong"``: for a teacher that embeds each view itself, so a view may move
            far from the crop it came from: larger affine moves and a perspective warp,
            stronger colour jitter, frequent grayscale, blur, noise, JPEG artefacts and
            low-resolution copies (the photometric and geometric variety of Beyer et al.
            2022's "function matching"; the list follows what face-recognition training
            uses to cover pose, lighting and capture quality).
        erasing: probability of random erasing (Zhong et al. 2020): one to three rectangles
            filled with noise, so the student cannot rely on any one part of the face.

    Raises:
        ValueError: an unknown ``strength`` or ``erasing`` outside [0, 1].
    """
    if strength not in AUGMENT_STRENGTHS:
        raise ValueError(f"face augmentation strength must be one of {list(AUGMENT_STRENGTHS)}, got {strength!r}")
    if not 0.0 <= erasing <= 1.0:
        raise ValueError(f"random erasing probability must be in [0, 1], got {erasing}")
    if not train:
        return FaceTransform(image_size)
    if strength == "light":
        augment = [
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.92, 1.08), translate_percent=(-0.04, 0.04), rotate=(-8, 8),
                     border_mode=cv2.BORDER_REFLECT_101, p=0.7),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03, p=0.8),
            A.ToGray(p=0.05),
            A.GaussianBlur(blur_limit=(3, 5), p=0.1),
        ]
    else:
        augment = [
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.8, 1.2), translate_percent=(-0.1, 0.1), rotate=(-20, 20), shear=(-8, 8),
                     border_mode=cv2.BORDER_REFLECT_101, p=0.9),
            A.Perspective(scale=(0.02, 0.08), p=0.3),
            A.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.6, hue=0.08, p=0.9),
            A.ToGray(p=0.2),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 7)), A.MotionBlur(blur_limit=(3, 7))], p=0.25),
            A.GaussNoise(std_range=(0.02, 0.08), p=0.2),
            A.ImageCompression(quality_range=(30, 90), p=0.3),
            A.Downscale(scale_range=(0.3, 0.7), p=0.2),
        ]
    if erasing > 0:
        augment.append(A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.1, 0.4),
                                       hole_width_range=(0.1, 0.4), fill="random_uniform", p=erasing))
    return FaceTransform(image_size, augment)


class FaceFolder(Dataset):
    """Images under one or more folders, identity sub-folders optional.

    Args:
        roots: a folder or a list of folders, searched recursively.
        image_size: output side when ``transform`` is None (plain resize).
        transform: a :class:`FaceTransform` (or any ``uint8[H,W,3] -> Tensor`` callable).
        files: use exactly these files (absolute, or relative to the first root) instead of
            searching; lets a split share one listing.

    Attributes:
        files: absolute paths, in item order.
        keys: one stable string per item: the path relative to its root (prefixed with the
            root's name when several roots are given); identifies the file in caches.
        identities: the item's folder relative to its root (``""`` for a file at the top).

    Item ``i``: ``(FloatTensor[3, S, S] in [0, 1], i)``, or ``None`` when the file cannot be read
    (a warning names it; :func:`face_collate` drops it and counts it).

    Raises:
        FileNotFoundError: a root is missing.
        ValueError: no image was found.
    """

    def __init__(
        self,
        roots: str | Path | Sequence[str | Path],
        *,
        image_size: int = 160,
        transform=None,
        files: Sequence[str | Path] | None = None,
    ) -> None:
        root_list = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
        if not root_list:
            raise ValueError("FaceFolder needs at least one folder")
        self.roots = root_list
        self.transform = transform if transform is not None else FaceTransform(image_size)
        prefix = len(root_list) > 1
        entries: list[tuple[Path, str, str]] = []
        if files is None:
            for root in root_list:
                for path in list_images(root):
                    entries.append(self._entry(root, path, prefix))
        else:
            for item in files:
                path = Path(item)
                path = path if path.is_absolute() else root_list[0] / path
                root = next((r for r in root_list if path.is_relative_to(r)), path.parent)
                entries.append(self._entry(root, path, prefix))
        if not entries:
            where = ", ".join(str(r) for r in root_list)
            raise ValueError(
                f"no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) found under {where}; "
                f"point it at a folder of face crops (tools/align_faces.py makes them)"
            )
        self.files = [e[0] for e in entries]
        self.keys = [e[1] for e in entries]
        self.identities = [e[2] for e in entries]

    @staticmethod
    def _entry(root: Path, path: Path, prefix: bool) -> tuple[Path, str, str]:
        relative = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
        key = (f"{root.name}/" if prefix else "") + relative.as_posix()
        identity = relative.parent.as_posix()
        return path, key, "" if identity == "." else identity

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        path = self.files[index]
        try:
            image = load_rgb(path)
        except ImageReadError as err:
            warnings.warn(f"skipping unreadable face image: {err}", RuntimeWarning, stacklevel=2)
            return None
        return self.transform(image), index

    def with_transform(self, transform) -> "FaceFolder":
        """The same files with another transform (e.g. the un-augmented twin of a train set)."""
        twin = FaceFolder.__new__(FaceFolder)
        twin.__dict__.update(self.__dict__)
        twin.transform = transform
        return twin

    def subset(self, indices: Sequence[int]) -> "FaceFolder":
        """A FaceFolder over the items ``indices`` (in that order), with the same transform."""
        twin = self.with_transform(self.transform)
        twin.files = [self.files[i] for i in indices]
        twin.keys = [self.keys[i] for i in indices]
        twin.identities = [self.identities[i] for i in indices]
        return twin


class RepeatedFaces(Dataset):
    """Every item of a :class:`FaceFolder` ``repeats`` times per pass, each a fresh augmented view.

    With a few dozen crops an epoch is one or two steps; repeating makes an epoch long enough
    for per-epoch evaluation and checkpoints to cost little. Item ``k`` is the folder's item
    ``k % len(folder)``, whose own index (not ``k``) comes back, so cached targets still match.
    """

    def __init__(self, folder: "FaceFolder", repeats: int) -> None:
        if repeats < 1:
            raise ValueError(f"data.repeats must be >= 1, got {repeats}")
        self.folder = folder
        self.repeats = int(repeats)

    def __len__(self) -> int:
        return len(self.folder) * self.repeats

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        return self.folder[index % len(self.folder)]


def face_collate(batch: Sequence[tuple[Tensor, int] | None]) -> tuple[Tensor, Tensor, int]:
    """Stack a batch of :class:`FaceFolder` items.

    Returns:
        ``(images FloatTensor[N, 3, S, S], indices Int64Tensor[N], num_skipped)`` where
        ``num_skipped`` counts unreadable images left out (N may then be smaller than the batch).
    """
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0, 3, 0, 0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([item[0] for item in kept])
    indices = torch.tensor([int(item[1]) for item in kept], dtype=torch.long)
    return images, indices, skipped


def split_holdout(
    count: int, val_fraction: float, *, seed: int = 0, groups: Sequence[str] | None = None
) -> tuple[list[int], list[int]]:
    """Deterministic train/held-out split of ``range(count)``.

    Args:
        count: number of items.
        val_fraction: share of items (or of groups) held out, in (0, 1).
        seed: shuffling seed.
        groups: optional group label per item (e.g. identities): whole groups are held out, so
            no person is on both sides.

    Returns:
        ``(train_indices, val_indices)``, each sorted; both non-empty.

    Raises:
        ValueError: a fraction outside (0, 1), or too few items/groups to hold any out.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    if groups is not None:
        if len(groups) != count:
            raise ValueError(f"got {len(groups)} group labels for {count} items")
        names = sorted(set(groups))
        if len(names) < 2:
            raise ValueError(f"cannot hold out whole groups: only {len(names)} group(s); split by item instead")
        order = rng.permutation(len(names))
        n_val = min(len(names) - 1, max(1, round(len(names) * val_fraction)))
        held = {names[i] for i in order[:n_val]}
        val = [i for i, g in enumerate(groups) if g in held]
    else:
        if count < 2:
            raise ValueError(f"cannot hold out items from a set of {count}")
        n_val = min(count - 1, max(1, round(count * val_fraction)))
        val = sorted(int(i) for i in rng.permutation(count)[:n_val])
    held_set = set(val)
    train = [i for i in range(count) if i not in held_set]
    return train, sorted(val)
