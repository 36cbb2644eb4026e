"""The COCO-size simulation, the memory readers, one loader measurement and the bench_data tool."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import mnapps.data.transforms as transforms_module
from lab.bench_data_cli import main as bench_main
from mnapps.data.coco_index import load_coco_json
from lab.coco_sim import COCO_2017_CATEGORIES, prepare_image_pool, write_coco_simulation
from lab.data_path import (
    ScaleSettings,
    _annotations_only,
    _build_dataset,
    child_pids,
    measure_loader,
    process_memory,
)
from lab.data_report import check_acceptance, extrapolate_workers, format_report
from mnapps.data.transforms import build_det_transforms

_MB = 1 << 20


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Three real JPEG files of different sizes (one portrait)."""
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    entries = []
    for name, (w, h) in (("a.jpg", (160, 120)), ("b.jpg", (120, 160)), ("c.jpg", (200, 150))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name, quality=90)
        entries.append((name, w, h))
    return root, entries


@pytest.fixture(scope="module")
def simulation(pool, tmp_path_factory):
    root, entries = pool
    return write_coco_simulation(tmp_path_factory.mktemp("sim") / "sim.json", root, entries, 2000, seed=1)


# ----------------------------------------------------------------------------- the simulation
def test_simulation_has_coco_train_statistics(simulation, pool):
    root, entries = pool
    data = load_coco_json(simulation.ann_file)  # passes mnapps' structural validation
    sizes = {name: (w, h) for name, w, h in entries}
    images, annotations = data["images"], data["annotations"]
    assert len(images) == 2000 == simulation.num_images and len({i["id"] for i in images}) == 2000
    assert [(c["id"], c["name"]) for c in data["categories"]] == list(COCO_2017_CATEGORIES)
    assert len(annotations) == simulation.num_annotations and len({a["id"] for a in annotations}) == len(annotations)
    per_image = len(annotations) / len(images)
    assert 6.8 <= per_image <= 7.8  # COCO train: 860,001 / 118,287 = 7.27
    with_boxes = {a["image_id"] for a in annotations}
    empty = sum(i["id"] not in with_boxes for i in images) / len(images)
    assert 0.002 <= empty <= 0.025 and simulation.num_empty_images == round(empty * 2000)
    crowd = sum(a["iscrowd"] for a in annotations) / len(annotations)
    assert 0.004 <= crowd <= 0.02
    areas = np.array([a["bbox"][2] * a["bbox"][3] for a in annotations])
    shares = [np.mean(areas < 32**2), np.mean((areas >= 32**2) & (areas < 96**2)), np.mean(areas >= 96**2)]
    np.testing.assert_allclose(shares, [0.41, 0.34, 0.25], atol=0.03)
    np.testing.assert_allclose(shares, simulation.size_shares, atol=1e-12)
    person = np.mean([a["category_id"] == 1 for a in annotations])
    assert 0.27 <= person <= 0.34
    # Every entry shows a pool image at that image's real size, and its boxes fit inside it.
    by_id = {i["id"]: i for i in images}
    for img in images:
        assert (root / img["file_name"]).is_file() and (img["width"], img["height"]) == sizes[img["file_name"]]
    for a in annotations:
        x, y, w, h = a["bbox"]
        img = by_id[a["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= img["width"] + 0.02 and y + h <= img["height"] + 0.02
        if a["iscrowd"]:
            assert a["segmentation"]["size"] == [img["height"], img["width"]]
        else:
            polygon = a["segmentation"][0]
            assert len(polygon) % 2 == 0 and len(polygon) >= 24


def test_simulation_is_deterministic_and_seeded(pool, tmp_path):
    root, entries = pool
    a = write_coco_simulation(tmp_path / "a.json", root, entries, 300, seed=5)
    b = write_coco_simulation(tmp_path / "b.json", root, entries, 300, seed=5)
    c = write_coco_simulation(tmp_path / "c.json", root, entries, 300, seed=6)
    assert a.ann_file.read_bytes() == b.ann_file.read_bytes() != c.ann_file.read_bytes()
    lean = write_coco_simulation(tmp_path / "d.json", root, entries, 300, seed=5, polygons=False)
    assert lean.num_annotations == a.num_annotations and lean.json_bytes < a.json_bytes / 2
    assert "segmentation" not in json.loads(lean.ann_file.read_text())["annotations"][0]


def test_simulation_bad_arguments(pool, tmp_path):
    root, entries = pool
    with pytest.raises(ValueError, match="num_images must be an int >= 1"):
        write_coco_simulation(tmp_path / "x.json", root, entries, 0)
    with pytest.raises(ValueError, match="image pool is empty"):
        write_coco_simulation(tmp_path / "x.json", root, [], 10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no \\*.jpg"):
        prepare_image_pool(tmp_path / "out", tmp_path / "empty")


def test_image_pool_copies_jpegs_with_their_sizes(pool, tmp_path):
    root, entries = pool
    image_dir, copied = prepare_image_pool(tmp_path / "images", root)
    assert copied == entries and sorted(p.name for p in image_dir.iterdir()) == ["a.jpg", "b.jpg", "c.jpg"]


# ----------------------------------------------------------------------------- memory readers
def test_process_memory_sees_private_pages():
    before = process_memory()
    assert 0 < before["uss"] <= before["pss"] <= before["rss"]
    block = np.ones(64 * _MB, dtype=np.uint8)  # touched: 64 MiB of private pages
    after = process_memory()
    assert after["uss"] - before["uss"] >= 60 * _MB
    del block


def test_child_pids_lists_live_children_only():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert proc.pid in child_pids()
        assert process_memory(proc.pid)["pss"] > 0
    finally:
        proc.kill()
        proc.wait()
    assert proc.pid not in child_pids()


def test_extrapolation_is_the_least_squares_line():
    assert extrapolate_workers({0: 100.0, 2: 140.0, 4: 180.0}) == pytest.approx((20.0, 260.0))
    # Points off a line: slope (sum dx dy / sum dx^2) = (-2*-5 + 2*15) / 8 = 5; mean 110 at x=2 -> 140 at 8.
    assert extrapolate_workers({0: 100.0, 2: 100.0, 4: 130.0}, target=8) == pytest.approx((7.5, 155.0))
    with pytest.raises(ValueError, match="two or more worker counts"):
        extrapolate_workers({2: 1.0})


# ----------------------------------------------------------------------------- loader measurement
def test_loader_measurement_in_process(simulation):
    result = measure_loader("mnapps", simulation.ann_file, simulation.image_dir, workers=2, batch_size=4,
                            batches_per_pass=2, passes=2)
    assert result["after_first"]["workers"] == 2 and result["after_last"]["workers"] == 2
    for when in ("after_first", "after_last"):
        snap = result[when]
        assert snap["workers_pss"] > 0 and 0 < snap["workers_uss"] <= snap["workers_pss"]
        assert 0 < snap["main_uss"] <= snap["main_pss"]
    assert result["samples"] == 2000 and result["images_per_s"] > 0
    assert 0 < result["construct_s"] < result["first_batch_s"]
    epoch = result["annotation_epoch"]  # every sample's annotations read once by fresh workers
    assert epoch["samples"] == 2000 and epoch["at_start"]["workers"] == epoch["at_end"]["workers"] == 2
    deadline = time.monotonic() + 10
    while child_pids() and time.monotonic() < deadline:  # the persistent workers end with the loader
        time.sleep(0.1)
    assert child_pids() == []


def test_annotation_reads_follow_each_datasets_sample_path(simulation):
    data = load_coco_json(simulation.ann_file)
    anns = {}
    for a in data["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    mnapps_ds, _ = _build_dataset("mnapps", str(simulation.ann_file), str(simulation.image_dir), 300)
    expected = [mnapps_ds.annotations(i) for i in range(20)]
    _annotations_only(mnapps_ds)
    for i in range(20):
        image, target = mnapps_ds[i]
        assert image.numel() == 0 and target["image_id"] == mnapps_ds.ids[i]
        np.testing.assert_array_equal(target["boxes"].numpy(), expected[i][0])
        assert target["labels"].tolist() == expected[i][1].tolist()
    tv_ds, _ = _build_dataset("torchvision", str(simulation.ann_file), str(simulation.image_dir), 300)
    _annotations_only(tv_ds)
    for i in range(20):
        image, target = tv_ds[i]
        assert image.size == (1, 1)
        raw = anns[target["image_id"]]  # every annotation, crowd included, XYWH -> XYXY
        want = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in raw)]
        np.testing.assert_allclose(target["boxes"].numpy(), np.array(want, dtype=np.float32), rtol=0, atol=1e-4)
        assert target["labels"].tolist() == [a["category_id"] for a in raw]


def test_both_datasets_deliver_300px_ssd_samples(simulation):
    torch.manual_seed(0)
    for impl in ("mnapps", "torchvision"):
        dataset, collate = _build_dataset(impl, str(simulation.ann_file), str(simulation.image_dir), 300)
        images, targets = collate([dataset[i] for i in range(4)])[:2]
        for image, target in zip(images, targets):
            assert tuple(image.shape) == (3, 300, 300) and image.dtype == torch.float32
            assert target["boxes"].shape[1] == 4 and len(target["labels"]) == len(target["boxes"])
    # The reference drops images without a box over 1 px in both sides; mnapps keeps them all.
    data = load_coco_json(simulation.ann_file)
    usable = {a["image_id"] for a in data["annotations"] if a["bbox"][2] > 1 and a["bbox"][3] > 1}
    assert len(dataset) == len(usable) < 2000


# ----------------------------------------------------------------------------- report and tool
def fake_result(growth_mn: float, first_batch_mn: float, loader_mn: float, step: float) -> dict:
    def run(impl, workers, first_batch, pss_first, growth, images_per_s, main=100 * _MB):
        return {"impl": impl, "workers": workers, "first_batch_s": first_batch, "images_per_s": images_per_s,
                "after_first": {"main_pss": main, "workers_pss": pss_first, "workers_uss": pss_first // 2,
                                "main_uss": main // 2},
                "after_last": {"main_pss": main, "workers_pss": int(pss_first * (1 + growth)),
                               "workers_uss": int(pss_first * (1 + growth)) // 2, "main_uss": main // 2}}

    loaders = [run("mnapps", 0, 0.5, 0, 0.0, 50.0), run("mnapps", 2, first_batch_mn, 200 * _MB, growth_mn, loader_mn),
               run("mnapps", 4, 1.0, 400 * _MB, growth_mn, 2 * loader_mn),
               run("torchvision", 0, 30.0, 0, 0.0, 10.0, 2000 * _MB),
               run("torchvision", 2, 31.0, 1000 * _MB, 0.3, 20.0, 2000 * _MB),
               run("torchvision", 4, 32.0, 2000 * _MB, 0.3, 30.0, 2000 * _MB)]
    sim = {"num_images": 118287, "num_annotations": 860000, "json_bytes": 450 * _MB}
    return {"settings": {"impls": ["mnapps", "torchvision"], "passes": 3, "batches_per_pass": 8, "batch_size": 16,
                         "input_size": 300},
            "sizes": [{"simulation": sim, "loaders": loaders,
                       "first_parse": {"mnapps": {"seconds": 20.0, "peak_rss": _MB, "index_bytes": _MB},
                                       "pycocotools": {"seconds": 25.0, "peak_rss": _MB}}}],
            "step": {"images_per_s": step, "batch": 16, "device": "cpu", "threads": 2, "num_classes": 91}}


def test_acceptance_checks_pass_and_fail_on_the_targets():
    good = {c["name"].split(",")[0]: c for c in check_acceptance(fake_result(0.05, 1.2, 40.0, 20.0))}
    assert [c["ok"] for c in good.values()] == [True, True, True]
    assert good["summed worker PSS"]["mnapps"] == pytest.approx(0.05, abs=1e-6)
    assert good["summed worker PSS"]["torchvision"] == pytest.approx(0.3, abs=1e-6)
    assert good["loader images/s at 2 workers / SSD300 training step images/s"]["mnapps"] == pytest.approx(2.0)
    bad = check_acceptance(fake_result(0.15, 6.0, 10.0, 20.0))
    assert [c["ok"] for c in bad] == [False, False, False]
    text = format_report(fake_result(0.05, 1.2, 40.0, 20.0))
    # Main 100 MiB + workers 400 * 1.05 = 520 MiB at 4 workers; 100 + 210 at 2; slope (520 - 100) / 4 = 105.
    assert "loader/step ratio 2.00" in text and "PASS time to first batch" in text
    growth_rows = [line.split() for line in text.splitlines() if line.split()[:2] == ["118287", "mnapps"]]
    assert ["118287", "mnapps", "100", "310", "520", "105", "940"] in growth_rows


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="below one pass"):
        ScaleSettings(sizes=(10,))
    with pytest.raises(ValueError, match="unknown implementation"):
        ScaleSettings(impls=("detectron2",))
    with pytest.raises(ValueError, match="passes must be >= 2"):
        ScaleSettings(passes=1)


def test_tool_help_and_bad_input(capsys):
    with pytest.raises(SystemExit) as info:
        bench_main(["--help"])
    assert info.value.code == 0 and "smaps_rollup" in capsys.readouterr().out
    for argv, message in ((["--sizes", "10"], "below one pass"), (["--pool", "/nonexistent/pool"], "is not a folder"),
                          (["--step-batch", "0"], "--step-batch must be >= 1")):
        with pytest.raises(SystemExit) as info:
            bench_main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_tool_end_to_end_small(pool, tmp_path, capsys):
    root, _ = pool
    start = time.perf_counter()
    bench_main(["--sizes", "200", "--workers", "0", "--impl", "mnapps", "--batch-size", "4", "--batches", "2",
                "--passes", "2", "--no-step", "--no-polygons", "--pool", str(root), "--workdir", str(tmp_path / "w"),
                "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["sizes"][0]["simulation"]["num_images"] == 200
    assert result["sizes"][0]["first_parse"]["mnapps"]["cache_bytes"] > 0
    (run,) = result["sizes"][0]["loaders"]
    assert run["impl"] == "mnapps" and run["workers"] == 0 and run["after_last"]["main_pss"] > 0
    assert "first parse of the JSON" in out and "acceptance (largest size)" in out
    assert time.perf_counter() - start < 120


class _TunedFlag(torch.utils.data.Dataset):
    """Runs the SSD transform, then reports whether this process fixed its allocator threshold."""

    def __init__(self):
        self.transform = build_det_transforms(True, 32, "ssd")

    def __len__(self):
        return 2

    def __getitem__(self, index):
        self.transform(np.zeros((40, 50, 3), np.uint8), np.array([[1, 1, 20, 20]], np.float32), np.array([1]))
        return transforms_module._allocator_tuned


def test_detection_transform_tunes_the_allocator_in_workers_only():
    assert list(torch.utils.data.DataLoader(_TunedFlag(), batch_size=None, num_workers=1)) == [True, True]
    assert [_TunedFlag()[0]] == [False]  # the main process keeps glibc's defaults
