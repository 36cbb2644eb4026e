"""The embedded shapes dataset: deterministic, valid COCO, cached, never half-written."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mnapps.data import synthetic_det
from mnapps.data.synthetic_det import SHAPE_CATEGORIES, ShapesPaths, ensure_shapes_detection

# pycocotools' own decode trips numpy 2's copy-keyword deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = {"num_train": 6, "num_val": 3, "image_size": 128, "progress": False}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> ShapesPaths:
    return ensure_shapes_detection(tmp_path_factory.mktemp("shapes") / "ds", **SMALL)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(dataset, tmp_path):
    again = ensure_shapes_detection(tmp_path / "again", **SMALL)
    first_root, second_root = dataset.train_ann.parents[1], again.train_ann.parents[1]
    first, second = tree_bytes(first_root), tree_bytes(second_root)
    assert len(first) == 6 + 3 + 2 + 1  # images, two annotation files, manifest
    assert first == second
    other = tree_bytes(ensure_shapes_detection(tmp_path / "other", **SMALL, seed=1).train_ann.parents[1])
    assert other["train/train_000000.jpg"] != first["train/train_000000.jpg"]


def test_files_are_valid_coco_with_non_contiguous_categories(dataset):
    for ann_file, image_dir, count in ((dataset.train_ann, dataset.train_images, 6),
                                       (dataset.val_ann, dataset.val_images, 3)):
        coco = load_coco(ann_file)
        assert len(coco.imgs) == count
        assert sorted(coco.cats) == [2, 5, 9, 11]
        assert [coco.cats[c["id"]]["name"] for c in SHAPE_CATEGORIES] == ["circle", "square", "triangle", "cross"]
        for image_id, info in coco.imgs.items():
            with Image.open(image_dir / info["file_name"]) as image:
                assert image.size == (info["width"], info["height"]) and image.mode == "RGB"
            anns = coco.imgToAnns[image_id]
            assert 1 <= len(anns) <= 5
            for a in anns:
                rle = coco.annToRLE(a)
                mask = mask_utils.decode(rle)
                # bbox and area are those of the visible mask, as in COCO.
                assert a["area"] == float(mask.sum()) == float(mask_utils.area(rle)) > 0
                np.testing.assert_allclose(a["bbox"], mask_utils.toBbox(rle))
                x, y, w, h = a["bbox"]
                assert 0 <= x and 0 <= y and x + w <= info["width"] and y + h <= info["height"]
                assert a["iscrowd"] == 0
    train_ids = set(load_coco(dataset.train_ann).imgs)
    assert not train_ids & set(load_coco(dataset.val_ann).imgs)


def test_shapes_have_the_annotated_colour_contrast(dataset):
    """The pixels under a shape's visible mask differ clearly from the pixels around its box."""
    coco = load_coco(dataset.train_ann)
    for image_id, info in coco.imgs.items():
        pixels = np.asarray(Image.open(dataset.train_images / info["file_name"]), dtype=np.float32)
        for a in coco.imgToAnns[image_id]:
            mask = mask_utils.decode(coco.annToRLE(a)).astype(bool)
            if mask.sum() < 200:
                continue
            x, y, w, h = (int(v) for v in a["bbox"])
            inside = pixels[mask].mean(axis=0)
            ring = np.zeros_like(mask)
            ring[max(0, y - 3) : y + h + 3, max(0, x - 3) : x + w + 3] = True
            ring[y : y + h, x : x + w] = False
            if ring.sum() < 50:
                continue
            assert np.linalg.norm(inside - pixels[ring].mean(axis=0)) > 20


def test_all_coco_area_ranges_are_populated(tmp_path):
    paths = ensure_shapes_detection(tmp_path / "ds", num_train=40, num_val=1, image_size=288, progress=False)
    areas = np.array([a["area"] for a in json.loads(paths.train_ann.read_text())["annotations"]])
    small, large = (areas < 32**2).mean(), (areas >= 96**2).mean()
    medium = 1 - small - large
    assert 0.05 < small < 0.35 and medium > 0.3 and large > 0.08, (small, medium, large)


def test_existing_dataset_is_reused_without_regenerating(dataset, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(synthetic_det, "_generate", must_not_run)
    assert ensure_shapes_detection(dataset.train_ann.parents[1], **SMALL) == dataset


def test_root_holding_something_else_is_a_clear_error(dataset, tmp_path):
    with pytest.raises(ValueError, match="does not hold the shapes_det_v1 dataset"):
        ensure_shapes_detection(dataset.train_ann.parents[1], **{**SMALL, "num_train": 7})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="pass another root"):
        ensure_shapes_detection(tmp_path / "busy", **SMALL)


def test_interrupted_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    real_render = synthetic_det._render_image
    calls = []

    def render_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synthetic_det, "_render_image", render_then_die)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes_detection(tmp_path / "ds", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its temporary folder


def test_default_root_lives_in_the_mnapps_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MNAPPS_CACHE", str(tmp_path))
    paths = ensure_shapes_detection(num_train=2, num_val=1, image_size=96, progress=False)
    assert paths.train_ann.parents[1] == tmp_path / "shapes_det_v1_n2-1_s96_seed0"
    assert synthetic_det.default_cache_dir() == tmp_path


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="num_train must be an int >= 1"):
        ensure_shapes_detection(tmp_path / "x", num_train=0)
    with pytest.raises(ValueError, match="image_size must be an int >= 96"):
        ensure_shapes_detection(tmp_path / "x", image_size=32)


def test_command_line_entry(tmp_path, capsys):
    assert synthetic_det.main(["--out", str(tmp_path / "cli"), "--num-train", "2", "--num-val", "1",
                               "--image-size", "96"]) == 0
    printed = capsys.readouterr().out
    assert f"train_ann: {tmp_path / 'cli' / 'annotations' / 'instances_train.json'}" in printed
    assert (tmp_path / "cli" / "val" / "val_000000.jpg").is_file()


def test_abandoned_temporary_folders_are_cleaned_up_fresh_ones_kept(tmp_path):
    dead_pid = 2**22 + 12345  # above Linux's pid_max default range: no such process
    stale = tmp_path / f".ds.tmp-{dead_pid}-deadbeef"
    fresh = tmp_path / f".ds.tmp-{dead_pid}-cafef00d"
    for folder in (stale, fresh):
        (folder / "train").mkdir(parents=True)
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    ensure_shapes_detection(tmp_path / "ds", **SMALL)
    assert not stale.exists()  # killed long ago
    assert fresh.exists()  # may belong to a generation on another machine sharing the folder
