"""The compact COCO index: arrays equal to the file, the cache beside the JSON, and the dataset built on it."""

from __future__ import annotations

import gc
import json
import math
import os
import pickle
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mnapps.data.coco as coco_module
import mnapps.data.coco_index as coco_index
from mnapps.data.coco import CocoDetection
from mnapps.data.coco_index import CACHE_SUFFIX, CocoIndex, index_cache_paths, load_coco_index, load_coco_json
from lab.coco_sim import write_coco_simulation


def small_coco() -> dict:
    """Images listed out of id order, one without size, one without boxes; annotations interleaved."""
    return {
        "images": [{"id": 30, "file_name": "c.jpg", "width": 64, "height": 48},
                   {"id": 10, "file_name": "ä/a.jpg", "width": 64.0, "height": 48},
                   {"id": 20, "file_name": "b.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 2, 3, 4]},
            {"id": 2, "image_id": 30, "category_id": 3, "bbox": [0.1, 0.2, 10.3, 20.7], "iscrowd": 1},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [5.5, 6.25, 7, 8], "iscrowd": 0},
            {"id": 4, "image_id": 30, "category_id": 7, "bbox": [1e-7, 3, 1e300, 2]},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


# ----------------------------------------------------------------------------- the arrays
def test_index_arrays_hold_exactly_the_file():
    index = CocoIndex.from_coco_dict(small_coco())
    assert index.image_ids.tolist() == [30, 10, 20]  # file order
    assert [index.file_name(i) for i in range(3)] == ["c.jpg", "ä/a.jpg", "b.jpg"]
    assert index.widths[:2].tolist() == [64.0, 64.0] and math.isnan(index.widths[2]) and math.isnan(index.heights[2])
    # Image 30 (position 0) owns annotations 2 and 4, image 10 owns 1 and 3 (file order kept), image 20 none.
    assert index.ann_offsets.tolist() == [0, 2, 4, 4]
    assert index.category_ids.tolist() == [3, 7, 7, 3]
    assert index.iscrowd.tolist() == [True, False, False, False]
    assert index.bboxes.dtype == np.float64
    assert index.bboxes.tolist() == [[0.1, 0.2, 10.3, 20.7], [1e-7, 3, 1e300, 2], [1, 2, 3, 4], [5.5, 6.25, 7, 8]]
    assert index.category_names() == {7: "seven", 3: "three"}
    assert index.num_images == 3 and index.num_annotations == 4


def test_file_without_annotations_gives_empty_arrays(tmp_path):
    data = small_coco()
    del data["annotations"]
    index = load_coco_index(write_json(tmp_path / "test.json", data))
    assert index.bboxes.shape == (0, 4) and index.ann_offsets.tolist() == [0, 0, 0, 0]


# ----------------------------------------------------------------------------- the cache
def count_parses(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = coco_index.load_coco_json

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(coco_index, "load_coco_json", counting)
    return calls


def assert_same_index(a: CocoIndex, b: CocoIndex) -> None:
    for name in ("image_ids", "file_names", "file_name_offsets", "widths", "heights", "ann_offsets", "bboxes",
                 "category_ids", "iscrowd", "cat_ids", "cat_names", "cat_name_offsets"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_cache_is_written_beside_the_json_and_read_without_parsing(tmp_path, monkeypatch):
    ann = write_json(tmp_path / "instances.json", small_coco())
    calls = count_parses(monkeypatch)
    first = load_coco_index(ann)
    cache = tmp_path / ("instances.json" + CACHE_SUFFIX)
    assert cache.is_file() and index_cache_paths(ann)[0] == cache.resolve()
    second = load_coco_index(ann)
    assert calls == [ann]  # parsed once
    assert_same_index(first, second)
    with np.load(cache, allow_pickle=False) as z:  # plain arrays only: nothing to unpickle
        assert all(z[key].dtype != object for key in z.files)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o644


def test_a_changed_json_is_parsed_again(tmp_path, monkeypatch):
    ann = write_json(tmp_path / "a.json", small_coco())
    calls = count_parses(monkeypatch)
    load_coco_index(ann)
    data = small_coco()
    data["categories"][0]["name"] = "SEVEN"  # same size, other content
    write_json(ann, data)
    os.utime(ann, ns=(ann.stat().st_atime_ns, ann.stat().st_mtime_ns + 1_000_000))
    assert load_coco_index(ann).category_names()[7] == "SEVEN"
    # A new modification time alone (e.g. the file was copied) is enough to re-parse.
    os.utime(ann, ns=(ann.stat().st_atime_ns, ann.stat().st_mtime_ns + 1_000_000))
    load_coco_index(ann)
    assert len(calls) == 3


def test_a_damaged_or_foreign_cache_is_rebuilt(tmp_path, monkeypatch):
    ann = write_json(tmp_path / "a.json", small_coco())
    other = write_json(tmp_path / "b.json", {**small_coco(), "images": small_coco()["images"][:1],
                                             "annotations": []})
    cache = index_cache_paths(ann)[0]
    cache.write_bytes(b"not a zip file")
    calls = count_parses(monkeypatch)
    assert load_coco_index(ann).num_images == 3
    load_coco_index(other)
    index_cache_paths(other)[0].replace(cache)  # the other file's index under this file's name
    assert load_coco_index(ann).num_images == 3  # its stamp does not match: rebuilt
    assert len(calls) == 3
    assert load_coco_index(ann).num_images == 3 and len(calls) == 3


def test_read_only_dataset_folder_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    folder = tmp_path / "coco"
    folder.mkdir()
    ann = write_json(folder / "instances.json", small_coco())
    monkeypatch.setenv("MNAPPS_CACHE", str(tmp_path / "user-cache"))
    calls = count_parses(monkeypatch)
    folder.chmod(0o555)  # read-only by its permission bits, which mnapps respects even as root
    try:
        load_coco_index(ann)
        assert sorted(p.name for p in folder.iterdir()) == ["instances.json"]
        cached = index_cache_paths(ann)[1]
        assert cached.is_file() and cached.parent == tmp_path / "user-cache" / "coco-index"
        load_coco_index(ann)
        assert len(calls) == 1
    finally:
        folder.chmod(0o755)


def test_no_writable_cache_anywhere_warns_and_still_loads(tmp_path, monkeypatch):
    folder = tmp_path / "coco"
    folder.mkdir()
    ann = write_json(folder / "instances.json", small_coco())
    user_cache = tmp_path / "user-cache"
    (user_cache / "coco-index").mkdir(parents=True)
    monkeypatch.setenv("MNAPPS_CACHE", str(user_cache))
    folder.chmod(0o555)
    (user_cache / "coco-index").chmod(0o555)
    try:
        with pytest.warns(RuntimeWarning, match=r"cannot cache the annotation index of .*instances\.json"):
            index = load_coco_index(ann)
        assert index.num_images == 3
    finally:
        folder.chmod(0o755)
        (user_cache / "coco-index").chmod(0o755)


def test_an_invalid_file_leaves_no_cache_and_keeps_its_error(tmp_path):
    data = small_coco()
    data["annotations"][2]["image_id"] = 99
    ann = write_json(tmp_path / "bad.json", data)
    for _ in range(2):  # the second time too: nothing was cached
        with pytest.raises(ValueError, match=r"bad\.json: annotations\[2\] \(id 3\) refers to image_id 99"):
            load_coco_index(ann)
    assert not index_cache_paths(ann)[0].exists()
    with pytest.raises(FileNotFoundError, match=r"COCO annotation file .*nope\.json not found"):
        load_coco_index(tmp_path / "nope.json")


def test_use_cache_false_writes_nothing(tmp_path):
    ann = write_json(tmp_path / "a.json", small_coco())
    assert load_coco_index(ann, use_cache=False).num_images == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


# ----------------------------------------------------------------------------- the dataset on top
@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """2,000 COCO-like entries over two real JPEG files (sizes 64x48 and 50x70)."""
    root = tmp_path_factory.mktemp("sim")
    rng = np.random.default_rng(0)
    pool = []
    for name, (w, h) in (("p0.jpg", (64, 48)), ("p1.jpg", (50, 70))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name)
        pool.append((name, w, h))
    sim = write_coco_simulation(root / "sim.json", root, pool, 2000, seed=3, polygons=False)
    return sim


def reference_targets(data: dict, min_box_size: float = 1.0) -> dict[int, tuple[list, list]]:
    """Per image id, the sanitised boxes and labels by the documented rules, one dict at a time."""
    cat_ids = sorted(c["id"] for c in data["categories"])
    images = {img["id"]: img for img in data["images"]}
    out: dict[int, tuple[list, list]] = {image_id: ([], []) for image_id in images}
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        img = images[ann["image_id"]]
        box = [min(max(x, 0.0), img["width"]), min(max(y, 0.0), img["height"]),
               min(max(x + w, 0.0), img["width"]), min(max(y + h, 0.0), img["height"])]
        if box[2] - box[0] < min_box_size or box[3] - box[1] < min_box_size:
            continue
        out[ann["image_id"]][0].append(box)
        out[ann["image_id"]][1].append(cat_ids.index(ann["category_id"]) + 1)
    return out


def test_dataset_targets_match_a_per_dict_reading(simulated):
    data = load_coco_json(simulated.ann_file)
    expected = reference_targets(data, min_box_size=2.0)
    ds = CocoDetection(simulated.ann_file, simulated.image_dir, min_box_size=2.0)
    assert ds.ids == sorted(img["id"] for img in data["images"])
    kept = 0
    for i, image_id in enumerate(ds.ids):
        boxes, labels = ds.annotations(i)
        want_boxes, want_labels = expected[image_id]
        np.testing.assert_array_equal(boxes, np.asarray(want_boxes, dtype=np.float32).reshape(-1, 4))
        assert labels.tolist() == want_labels
        kept += len(labels)
    stats = ds.box_stats
    assert stats.kept == kept and stats.annotations == len(data["annotations"]) == simulated.num_annotations
    assert stats.crowd == simulated.num_crowd
    assert stats.crowd + stats.degenerate + stats.kept == stats.annotations
    image, target = ds[-1]  # negative indices work as on a list
    assert target["image_id"] == ds.ids[-1] and image.shape[0] == 3


def test_dataset_keeps_no_python_object_per_image(simulated, tmp_path):
    """Reachable Python objects other than the ``ids`` list's ints do not grow with the file."""

    def reachable_non_int(ds: CocoDetection) -> int:
        seen, stack, count = set(), list(ds.__dict__.values()), 0
        while stack:
            obj = stack.pop()
            if id(obj) in seen or isinstance(obj, (type, type(gc))):
                continue
            seen.add(id(obj))
            count += not isinstance(obj, int)
            stack.extend(gc.get_referents(obj))
        return count

    data = load_coco_json(simulated.ann_file)
    small = write_json(tmp_path / "small.json", {**data, "images": data["images"][:200], "annotations": [
        a for a in data["annotations"] if a["image_id"] in {img["id"] for img in data["images"][:200]}]})
    full = CocoDetection(simulated.ann_file, simulated.image_dir)
    part = CocoDetection(small, simulated.image_dir)
    assert len(full) == 10 * len(part)
    # 1,800 more images; only the paths (other folders, other parts) may differ by a few objects.
    assert abs(reachable_non_int(full) - reachable_non_int(part)) < 10


def test_dataset_never_builds_a_coco_object_unless_asked(simulated, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("COCO() built")

    monkeypatch.setattr(coco_module, "COCO", refuse)
    ds = CocoDetection(simulated.ann_file, simulated.image_dir)
    for i in range(3):
        assert ds[i] is not None
    monkeypatch.undo()
    assert ds.coco.getImgIds() and sorted(ds.coco.imgs) == ds.ids  # built on first access


def test_pickled_dataset_gives_the_same_samples_and_stays_small(simulated):
    ds = CocoDetection(simulated.ann_file, simulated.image_dir)
    _ = ds.coco  # not part of the pickled state
    blob = pickle.dumps(ds)
    clone = pickle.loads(blob)
    assert len(blob) < 1_000_000 and clone._coco is None
    for i in (0, 7, len(ds) - 1):
        a, b = ds[i], clone[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
        assert a[1]["image_id"] == b[1]["image_id"]


def test_returned_targets_do_not_alias_the_dataset(simulated):
    ds = CocoDetection(simulated.ann_file, simulated.image_dir)
    index = next(i for i in range(len(ds)) if len(ds.annotations(i)[0]))
    _, target = ds[index]
    target["boxes"] += 1000.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(ds.annotations(index)[0].max()) < 1000.0
