"""Out-of-domain crops for the warm start: seeded, sized, read from any photo folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mnapps.tasks.face.distill.ood import RandomPhotoCrops


def _photos(tmp_path):
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate([(120, 200), (300, 90)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"p{k}.png")
    return tmp_path


def test_random_photo_crops_are_seeded_sized_and_inside_the_photos(tmp_path):
    root = _photos(tmp_path)
    crops = RandomPhotoCrops([root], 7, image_size=48, seed=3)
    again = RandomPhotoCrops([root], 7, image_size=48, seed=3)
    other = RandomPhotoCrops([root], 7, image_size=48, seed=4)
    assert len(crops) == 7
    first = [crops[i][0] for i in range(7)]
    assert all(x.shape == (3, 48, 48) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 for x in first)
    assert all(torch.equal(a, again[i][0]) for i, a in enumerate(first))
    assert not all(torch.equal(a, other[i][0]) for i, a in enumerate(first))
    # crop side is 15-90 % of the shorter side, and the crop lies inside the photo
    for photo, share, fy, fx in crops.draws:
        assert 0.15 <= share <= 0.9 and 0.0 <= fy <= 1.0 and 0.0 <= fx <= 1.0


def test_random_photo_crops_errors(tmp_path):
    with pytest.raises(ValueError, match="no photos"):
        RandomPhotoCrops([tmp_path], 3)
    with pytest.raises(ValueError, match="count"):
        RandomPhotoCrops([_photos(tmp_path)], 0)
