"""Out-of-domain inputs for distillation with few faces: random crops of photos without faces.

This module owns the inputs that are not faces but still teach the student the teacher's
function. With a few dozen faces the embedding layer is fitted on few points of the teacher's
input space; the teacher's embeddings of *other* images (crops of street scenes, animals,
objects) say how the teacher's function varies where no face is, and constrain the fit
everywhere instead of only around the training people (Nayak et al. 2019, "Zero-shot knowledge
distillation", and Beyer et al. 2022 distil on out-of-domain images for the same reason). The
teacher labels each crop itself, so any photo will do: the project's own COCO and scikit-image
photos in the measured recipe.

:class:`RandomPhotoCrops` draws seeded square crops (15 % to 90 % of the shorter side) of every
photo under some folders, resized to the face crop size, as ``(image, index)`` items like
:class:`mnapps.tasks.face.data.faces.FaceFolder`'s.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from mnapps.tasks.face.data.faces import build_face_transforms
from mnapps.data.image_io import list_images, load_rgb

__all__ = ["RandomPhotoCrops"]


class RandomPhotoCrops(Dataset):
    """``count`` seeded random square crops of the photos under ``roots``.

    Args:
        roots: folders of photos (searched recursively).
        count: number of crops (the dataset's length).
        image_size: side of the square output.
        seed: the crops are the same for the same seed, photos and count.
        scale: smallest and largest crop side, as a share of the photo's shorter side.

    Raises:
        ValueError: no photo, or a bad count/scale.
    """

    def __init__(self, roots: Sequence[str | os.PathLike], count: int, *, image_size: int = 160, seed: int = 0,
                 scale: tuple[float, float] = (0.15, 0.9)) -> None:
        if count < 1:
            raise ValueError(f"out-of-domain crop count must be >= 1, got {count}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
        self.photos = [path for root in roots for path in list_images(Path(root))]
        if not self.photos:
            raise ValueError(f"no photos under {', '.join(str(r) for r in roots)} to crop out-of-domain inputs from")
        self.transform = build_face_transforms(False, image_size)
        rng = random.Random(seed)
        self.draws = [(rng.randrange(len(self.photos)), rng.uniform(*scale), rng.random(), rng.random())
                      for _ in range(count)]
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.draws)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        photo, share, fy, fx = self.draws[index]
        if photo not in self._cache:
            self._cache[photo] = load_rgb(self.photos[photo])
        image = self._cache[photo]
        height, width = image.shape[:2]
        side = max(8, int(min(height, width) * share))
        top, left = int(fy * (height - side)), int(fx * (width - side))
        return self.transform(np.ascontiguousarray(image[top:top + side, left:left + side])), index
