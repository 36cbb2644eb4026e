"""The embedded generated faces: same settings, same pixels, however many threads draw them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mnapps.tasks.face.data.synthetic_faces import ensure_synthetic_faces, render_face, sample_identity


def _pixels(root):
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    return files, [np.asarray(Image.open(root / f)) for f in files]


def test_parallel_generation_gives_the_same_files(tmp_path):
    serial = ensure_synthetic_faces(tmp_path / "serial", train_identities=3, val_identities=2,
                                    images_per_identity=2, image_size=64, workers=1)
    parallel = ensure_synthetic_faces(tmp_path / "parallel", train_identities=3, val_identities=2,
                                      images_per_identity=2, image_size=64, workers=2)
    files, serial_pixels = _pixels(serial.root)
    assert len(files) == (3 + 2) * 2 and files == _pixels(parallel.root)[0]
    for a, b in zip(serial_pixels, _pixels(parallel.root)[1]):
        np.testing.assert_array_equal(a, b)
    # the files are the renderer's output for the documented seeds: identity k of split 1
    # (train) uses rng [seed, 1, k], its image j uses rng [seed, 1, k, j + 1]
    identity = sample_identity(np.random.default_rng([0, 1, 2]))
    expected = np.asarray(render_face(identity, np.random.default_rng([0, 1, 2, 2]), 64))
    np.testing.assert_array_equal(np.asarray(Image.open(serial.train / "person_002" / "01.png")), expected)
    # train and val people differ
    assert not np.array_equal(serial_pixels[0], np.asarray(Image.open(serial.val / "person_000" / "00.png")))


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="train_identities must be >= 1"):
        ensure_synthetic_faces(tmp_path, train_identities=0)
    with pytest.raises(ValueError, match="image_size must be >= 32"):
        ensure_synthetic_faces(tmp_path, image_size=16)


def test_a_twin_that_finishes_first_keeps_its_copy(tmp_path, monkeypatch):
    """Two torchrun ranks may generate at once; the later one must not delete the earlier copy."""
    import mnapps.tasks.face.data.synthetic_faces as module

    settings = dict(train_identities=1, val_identities=1, images_per_identity=1, image_size=64, workers=1)
    twin = ensure_synthetic_faces(tmp_path / "twin", **settings)
    real_write_split = module._write_split

    def write_split_while_the_twin_finishes(split_dir, *args):
        real_write_split(split_dir, *args)
        if split_dir.name == "val":  # the twin renames its finished copy into place now
            twin.root.rename(final_root)
            (final_root / "twin_marker").write_text("the other rank's copy\n")

    final_root = tmp_path / "cache" / twin.root.name
    final_root.parent.mkdir()
    monkeypatch.setattr(module, "_write_split", write_split_while_the_twin_finishes)
    paths = ensure_synthetic_faces(tmp_path / "cache", **settings)
    assert paths.root == final_root
    assert (final_root / "twin_marker").is_file()  # the first copy survived
    assert sorted(p.name for p in final_root.parent.iterdir()) == [final_root.name]  # no staging left
