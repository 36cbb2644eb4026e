"""COCO evaluation: published numbers, category-id round trip, hand-worked AP, detector loop, tool."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from mnapps.eval.coco import (
    COCO_METRIC_NAMES,
    evaluate_detector,
    evaluate_results,
    format_per_class_table,
    load_coco_gt,
    predictions_to_coco_results,
    write_metrics_json,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _published_bbox_numbers(txt: Path) -> list[float]:
    """The 12 numbers of the 'type=bbox' block in cocoapi's val2014_fake_eval_res.txt."""
    block = txt.read_text().split("type=bbox", 1)[1].split("type=keypoints", 1)[0]
    numbers = [float(value) for value in re.findall(r"\] = (-?\d+\.\d+)", block)]
    assert len(numbers) == 12, block
    return numbers


def _gt_file(tmp_path: Path, categories, images, boxes) -> Path:
    """Write a COCO annotation file; boxes = [(image_id, category_id, [x, y, w, h])]."""
    annotations = []
    for ann_id, (image_id, cat_id, (x, y, w, h)) in enumerate(boxes, start=1):
        annotations.append(
            {
                "id": ann_id, "image_id": image_id, "category_id": cat_id, "bbox": [x, y, w, h],
                "area": w * h, "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            }
        )  # fmt: skip
    data = {
        "images": [{"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"} for i, w, h in images],
        "categories": [{"id": cid, "name": name} for cid, name in categories],
        "annotations": annotations,
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


# Non-contiguous ids, as COCO's 1..90 with gaps.
CATEGORIES = [(3, "car"), (17, "cat"), (90, "toothbrush")]
LABEL_TO_CAT = {1: 3, 2: 17, 3: 90}
CAT_TO_LABEL = {cid: label for label, cid in LABEL_TO_CAT.items()}
IMAGES = [(11, 120, 100), (12, 90, 80), (13, 64, 64)]  # distinct sizes: the fake detector keys on them
GT_BOXES = [
    (11, 3, [10, 10, 40, 30]), (11, 17, [60, 20, 50, 70]),
    (12, 90, [5, 5, 20, 20]), (12, 3, [30, 30, 50, 40]),
    (13, 17, [0, 0, 64, 64]),
]  # fmt: skip


def _gt_predictions(label_of=lambda label: label):
    """Per-image perfect predictions (xyxy, contiguous labels), optionally relabelled."""
    predictions = []
    for image_id, _, _ in IMAGES:
        rows = [(cid, box) for img, cid, box in GT_BOXES if img == image_id]
        predictions.append(
            {
                "boxes": torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in rows], dtype=torch.float32),
                "labels": torch.tensor([label_of(CAT_TO_LABEL[cid]) for cid, _ in rows]),
                "scores": torch.full((len(rows),), 0.9),
            }
        )
    return predictions


def test_published_cocoapi_numbers(shared_data: Path):
    folder = shared_data / "coco_eval"
    published = _published_bbox_numbers(folder / "val2014_fake_eval_res.txt")
    metrics, per_class, summary = evaluate_results(
        folder / "instances_val2014_100.json", folder / "instances_val2014_fakebbox100_results.json"
    )
    assert list(metrics) == list(COCO_METRIC_NAMES)
    assert [round(metrics[name], 3) for name in COCO_METRIC_NAMES] == published
    # The captured summary is COCOeval's printed text: 12 lines ending in the same numbers.
    lines = summary.strip().splitlines()
    assert [float(line.rsplit("=", 1)[1]) for line in lines] == published
    # Categories without (non-crowd) GT in these 100 images are left out of the per-class table.
    gt = json.loads((folder / "instances_val2014_100.json").read_text())
    names = {c["id"]: c["name"] for c in gt["categories"]}
    present = {names[a["category_id"]] for a in gt["annotations"] if not a["iscrowd"]}
    assert set(per_class) == present and len(present) < len(names)
    assert all(0.0 <= ap <= 1.0 for ap in per_class.values())


def test_category_id_round_trip_through_results_file(tmp_path: Path):
    ann = _gt_file(tmp_path, CATEGORIES, IMAGES, GT_BOXES)
    results = predictions_to_coco_results(_gt_predictions(), [i for i, _, _ in IMAGES], LABEL_TO_CAT)
    assert {r["category_id"] for r in results} == {3, 17, 90}
    assert results[0]["bbox"] == [10.0, 10.0, 40.0, 30.0]  # xyxy -> xywh
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))

    metrics, per_class, _ = evaluate_results(str(ann), results_file)
    assert per_class == pytest.approx({"car": 1.0, "cat": 1.0, "toothbrush": 1.0})
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)

    # Every label shifted to the next class: right boxes, wrong categories -> nothing matches.
    shifted = predictions_to_coco_results(
        _gt_predictions(lambda label: label % 3 + 1), [i for i, _, _ in IMAGES], LABEL_TO_CAT
    )
    results_file.write_text(json.dumps(shifted))
    metrics, per_class, _ = evaluate_results(ann, results_file)
    assert per_class == {"car": 0.0, "cat": 0.0, "toothbrush": 0.0}
    assert metrics["AP"] == 0.0


def test_unmapped_label_is_named():
    prediction = {
        "boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]), "labels": torch.tensor([7]), "scores": torch.tensor([0.5])
    }
    with pytest.raises(ValueError, match="label 7"):
        predictions_to_coco_results([prediction], [11], LABEL_TO_CAT)
    with pytest.raises(ValueError, match="2 image ids"):
        predictions_to_coco_results([prediction], [11, 12], LABEL_TO_CAT)


def test_scale_maps_boxes_back_to_original_pixels():
    prediction = {
        "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]),
        "labels": torch.tensor([1]),
        "scores": torch.tensor([0.123456789]),
    }
    (result,) = predictions_to_coco_results([prediction], [11], LABEL_TO_CAT, scale=[(2.0, 0.5)])
    assert result["bbox"] == [20.0, 10.0, 40.0, 20.0]
    assert result["score"] == 0.12346


def test_hand_computed_single_box(tmp_path: Path):
    # GT 40x40 at (10,10); detection 27x40 at the same corner: IoU = 27*40 / (40*40) = 0.675.
    # It is a true positive at the IoU thresholds .50, .55, .60, .65 and a miss at .70 ... .95,
    # so with one GT and one detection AP is 1 or 0 per threshold: AP@[.5:.95] = 4/10.
    ann = _gt_file(tmp_path, [(5, "box")], [(1, 100, 100)], [(1, 5, [10, 10, 40, 40])])
    results = [{"image_id": 1, "category_id": 5, "bbox": [10, 10, 27, 40], "score": 0.9}]
    metrics, per_class, _ = evaluate_results(ann, results)
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == 0.0
    assert metrics["AP"] == pytest.approx(0.4) and per_class == {"box": pytest.approx(0.4)}
    assert metrics["APm"] == pytest.approx(0.4)  # area 1600 px is "medium" (32^2 .. 96^2)
    assert metrics["APs"] == -1.0 and metrics["APl"] == -1.0  # no GT there: COCO's -1

    # A higher-scored false positive first: precision is 0 then 1/2 at recall 1, and the
    # interpolated (right-maximum) precision is 1/2 at every recall point, so AP50 = 0.5.
    results = [
        {"image_id": 1, "category_id": 5, "bbox": [60, 60, 30, 30], "score": 0.95},
        {"image_id": 1, "category_id": 5, "bbox": [10, 10, 40, 40], "score": 0.8},
    ]
    metrics, _, _ = evaluate_results(ann, results)
    assert metrics["AP50"] == pytest.approx(0.5)
    assert metrics["AR1"] == 0.0 and metrics["AR10"] == pytest.approx(1.0)  # maxDets=1 keeps only the FP


def test_segm_perfect_masks(tmp_path: Path):
    ann = _gt_file(tmp_path, CATEGORIES, IMAGES, GT_BOXES)
    data = json.loads(ann.read_text())
    sizes = {i: (h, w) for i, w, h in IMAGES}
    results = []
    for gt in data["annotations"]:
        h, w = sizes[gt["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(gt["segmentation"], h, w))
        rle["counts"] = rle["counts"].decode("ascii")
        results.append(
            {"image_id": gt["image_id"], "category_id": gt["category_id"], "segmentation": rle, "score": 1.0}
        )
    metrics, _, _ = evaluate_results(ann, results, iou_type="segm")
    assert metrics["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="iou_type"):
        evaluate_results(ann, results, iou_type="keypoints")


def test_empty_results_give_zeros(tmp_path: Path):
    ann = _gt_file(tmp_path, CATEGORIES, IMAGES, GT_BOXES)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    for results in ([], empty):
        metrics, per_class, summary = evaluate_results(ann, results)
        assert metrics["AP"] == 0.0 and metrics["AR100"] == 0.0
        assert set(per_class.values()) == {0.0}
        assert summary.startswith("note:") and "no detections" in summary


def test_bad_inputs_are_named(tmp_path: Path):
    ann = _gt_file(tmp_path, CATEGORIES, IMAGES, GT_BOXES)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate_results(tmp_path / "missing.json", [])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate_results(ann, tmp_path / "nope.json")
    with pytest.raises(ValueError, match=r"image_id.*\[999\]"):
        evaluate_results(ann, [{"image_id": 999, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match=r"category_id.*\[2\].*original category ids"):
        evaluate_results(ann, [{"image_id": 11, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match="lacks"):
        evaluate_results(ann, [{"image_id": 11, "category_id": 3, "score": 1.0}])


def test_bad_ground_truth_boxes_are_dropped_and_counted(tmp_path: Path):
    # One real GT box and a higher-scored false positive far from it: precision 0 then 1/2 at
    # recall 1, so AP = AP50 = 1/2 (the TP overlaps exactly). A NaN GT box lets pycocotools
    # count that false positive as a match (a NaN IoU is never "< threshold"), inflating AP;
    # zero-width and negative-height GT boxes can never be matched and only cost recall.
    good = [(1, 5, [10, 10, 40, 40])]
    bad = [(1, 5, [float("nan"), 60, 30, 30]), (1, 5, [70, 10, 0, 10]), (2, 5, [5, 70, 10, -5])]
    images = [(1, 100, 100), (2, 100, 100)]
    clean_ann = _gt_file(tmp_path, [(5, "box")], images, good)
    clean_ann = clean_ann.rename(tmp_path / "clean.json")
    bad_ann = _gt_file(tmp_path, [(5, "box")], images, good + bad)
    results = [
        {"image_id": 1, "category_id": 5, "bbox": [60, 60, 30, 30], "score": 0.95},
        {"image_id": 1, "category_id": 5, "bbox": [10, 10, 40, 40], "score": 0.8},
    ]
    clean, _, clean_summary = evaluate_results(clean_ann, results)
    assert clean["AP"] == pytest.approx(0.5) and clean["AP50"] == pytest.approx(0.5)
    assert "num_gt_dropped" not in clean and not clean_summary.startswith("note:")

    # What pycocotools alone makes of the file with the NaN box: a higher, false AP.
    gt = COCO(str(bad_ann))
    raw = COCOeval(gt, gt.loadRes(results), iouType="bbox")
    raw.evaluate(), raw.accumulate(), raw.summarize()
    assert raw.stats[0] > 0.5 + 0.1

    metrics, per_class, summary = evaluate_results(bad_ann, results)
    assert metrics["AP"] == clean["AP"] and metrics["AP50"] == clean["AP50"]
    assert {name: metrics[name] for name in COCO_METRIC_NAMES} == clean
    assert per_class == {"box": pytest.approx(0.5)}
    assert metrics["num_gt_dropped"] == 3
    assert summary.startswith("note: 3 ground-truth box(es)") and str(bad_ann) in summary.splitlines()[0]

    # Counted only where evaluated; the caller's COCO object is left as it was.
    gt = load_coco_gt(bad_ann)
    metrics, _, summary = evaluate_results(gt, results, img_ids=[1])
    assert metrics["num_gt_dropped"] == 2 and metrics["AP"] == clean["AP"]
    assert len(gt.dataset["annotations"]) == 4 and len(gt.anns) == 4


@pytest.mark.parametrize(
    "entry,shown",
    [
        ({"bbox": ["10", 10, 40, 40]}, "bbox ['10', 10, 40, 40]"),
        ({"bbox": [10, 10, float("nan"), 40]}, "bbox [10, 10, nan, 40]"),
        ({"bbox": "10 10 40 40"}, "bbox '10 10 40 40'"),
        ({"score": "high"}, "score 'high'"),
        ({"image_id": [1]}, "image_id [1]"),
    ],
)
def test_malformed_result_entry_is_named(tmp_path: Path, entry, shown):
    ann = _gt_file(tmp_path, [(5, "box")], [(1, 100, 100)], [(1, 5, [10, 10, 40, 40])])
    good = {"image_id": 1, "category_id": 5, "bbox": [10, 10, 40, 40], "score": 0.9}
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps([good, {**good, **entry}]))
    with pytest.raises(ValueError) as caught:
        evaluate_results(ann, results_file)
    message = str(caught.value)
    assert message.startswith(f"{results_file}: detection #1 has {shown}") and "\n" not in message


def test_tool_names_a_string_bbox_in_one_line(tmp_path: Path, capsys):
    ann = _gt_file(tmp_path, [(5, "box")], [(1, 100, 100)], [(1, 5, [10, 10, 40, 40])])
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps([{"image_id": 1, "category_id": 5, "bbox": ["a", 1, 2, 3], "score": 1}]))
    code = _exit_code(_load_tool(), ["--results", str(results_file), "--val-ann", str(ann), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(results_file) in err and "detection #0 has bbox" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instances.json", "results.json"]  # nothing written


class _SizeKeyedDetector(nn.Module):
    """Returns each image's ground truth, found by the image's (distinct) size."""

    def __init__(self, predictions_by_size):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # so .training and .to() behave like a model
        self.predictions_by_size = predictions_by_size
        self.seen_training_flags = []

    def forward(self, images):
        self.seen_training_flags.append(self.training)
        return [self.predictions_by_size[tuple(image.shape[-2:])] for image in images]


class _FakeDataset:
    def __init__(self, ann: Path):
        from mnapps.eval.coco import load_coco_gt

        self.coco = load_coco_gt(ann)
        self.label_to_cat_id = LABEL_TO_CAT
        self.ids = [i for i, _, _ in IMAGES]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id, width, height = IMAGES[index]
        return torch.rand(3, height, width), {"image_id": image_id}


def _collate(batch):
    return [image for image, _ in batch], [target for _, target in batch], 0


def test_evaluate_detector_with_fake_detector(tmp_path: Path):
    ann = _gt_file(tmp_path, CATEGORIES, IMAGES, GT_BOXES)
    dataset = _FakeDataset(ann)
    by_size = {(h, w): prediction for (_, w, h), prediction in zip(IMAGES, _gt_predictions())}
    model = _SizeKeyedDetector(by_size).train()
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=_collate)

    metrics, per_class, summary = evaluate_detector(model, loader, dataset, "cpu", progress=False)
    assert metrics["AP"] == pytest.approx(1.0)
    assert per_class == pytest.approx({"car": 1.0, "cat": 1.0, "toothbrush": 1.0})
    assert model.seen_training_flags == [False, False] and model.training  # eval inside, restored after

    # Two images only: COCOeval is restricted to them, so image 13's cat is not counted as missed.
    metrics, per_class, _ = evaluate_detector(model, loader, dataset, "cpu", max_images=2, progress=False)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)
    assert per_class == pytest.approx({"car": 1.0, "cat": 1.0, "toothbrush": 1.0})
    assert len(model.seen_training_flags) == 3  # one batch of 2, the loop then stopped

    # Without the restriction the same detections miss image 13's cat: precision 1 up to recall
    # 1/2, i.e. 51 of COCO's 101 recall points, so the cat AP is 51/101.
    results = predictions_to_coco_results(_gt_predictions()[:2], [11, 12], LABEL_TO_CAT)
    _, unrestricted, _ = evaluate_results(ann, results)
    assert unrestricted["cat"] == pytest.approx(51 / 101)


def test_metrics_json_and_table(tmp_path: Path):
    metrics = {name: 0.25 for name in COCO_METRIC_NAMES}
    per_class = {"car": 0.5, "toothbrush": float("nan")}
    path = write_metrics_json(tmp_path / "out" / "metrics.json", metrics, per_class, {"checkpoint": "best.pt"})
    written = json.loads(path.read_text())
    assert set(COCO_METRIC_NAMES) <= set(written) and written["AP"] == 0.25
    assert written["per_class_AP"] == {"car": 0.5, "toothbrush": None} and written["checkpoint"] == "best.pt"
    with pytest.raises(ValueError, match="AR100"):
        write_metrics_json(tmp_path / "m.json", {"AP": 1.0}, {})

    table = format_per_class_table(per_class, columns=2)
    lines = table.splitlines()
    assert len(lines) == 3 and "car" in lines[2] and "0.500" in lines[2] and "nan" in lines[2]


def _load_tool():
    module = importlib.import_module("mnapps.cli.eval_det")
    return module


def _exit_code(tool, argv) -> int:
    """The tool's exit status, whether argparse exits or main returns it."""
    try:
        return tool.main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_tool_results_mode(shared_data: Path, tmp_path: Path, capsys):
    folder = shared_data / "coco_eval"
    tool = _load_tool()
    tool.main(
        [
            "--results", str(folder / "instances_val2014_fakebbox100_results.json"),
            "--val-ann", str(folder / "instances_val2014_100.json"),
            "--out-dir", str(tmp_path),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    published = _published_bbox_numbers(folder / "val2014_fake_eval_res.txt")
    summary_numbers = [float(v) for v in re.findall(r"maxDets=\s*\d+ \] = (-?\d+\.\d+)", printed)]
    assert summary_numbers == published
    assert "toothbrush" in printed  # per-class table
    written = json.loads((tmp_path / tool.METRICS_FILE).read_text())
    assert [round(written[name], 3) for name in COCO_METRIC_NAMES] == published

    assert _exit_code(tool, ["--results", str(tmp_path / "missing.json"), "--val-ann", str(tmp_path / "x.json")]) == 2
    assert "file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["--results", str(folder / "instances_val2014_fakebbox100_results.json")])
    assert "--val-ann" in capsys.readouterr().err


def test_evaluate_detector_on_real_coco_dataset(shared_data: Path):
    # The real loader path: CocoDetection + collate_fn on eight COCO photos with their original
    # (gapped) category ids. A detector replaying the dataset's own targets, in loader order,
    # must score AP 1 once its labels are mapped back through label_to_cat_id.
    coco_module = pytest.importorskip("mnapps.data.coco")
    dataset = coco_module.CocoDetection(
        shared_data / "coco8" / "instances_val.json", shared_data / "coco8" / "images" / "val"
    )
    replay = [dataset[i][1] for i in range(len(dataset))]

    class ReplayDetector(nn.Module):
        def forward(self, images):
            targets = [replay.pop(0) for _ in images]
            return [
                {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))} for t in targets
            ]

    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=coco_module.collate_fn)
    metrics, per_class, summary = evaluate_detector(ReplayDetector(), loader, dataset, "cpu", progress=False)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)
    assert per_class and all(ap == pytest.approx(1.0) for ap in per_class.values())


@pytest.mark.slow
def test_tool_checkpoint_mode(shared_data: Path, tmp_path: Path, capsys):
    # A real (untrained, tiny) SSD checkpoint through the tool: load_detector, the config's val
    # split, the loader, COCOeval and metrics.json. Untrained, its AP is near 0; the wiring is
    # what is checked: every evaluated category is a real coco8 one and the file has the keys.
    detection = pytest.importorskip("mnapps.tasks.detection")
    from mnapps.tasks.detection import build_model
    from mnapps.config import BackboneConfig, to_dict
    from mnapps.data.coco import CocoDetection
    from mnapps.checkpoint import save_checkpoint
    from mnapps.heads.ssd import SSDConfig

    val_ann, val_images = shared_data / "coco8" / "instances_val.json", shared_data / "coco8" / "images" / "val"
    dataset = CocoDetection(val_ann, val_images)
    cfg = detection.DetConfig(
        model=detection.DetModelConfig(
            backbone=BackboneConfig(width_mult=0.25),
            head_settings=SSDConfig(size=128),
            num_classes=dataset.num_classes,
            class_names=tuple(dataset.class_names),
            category_ids=tuple(dataset.cat_ids),
        ),
        data=detection.DetDataConfig(val_ann=str(val_ann), val_images=str(val_images)),
    )
    torch.manual_seed(0)
    model = build_model(cfg, dataset.num_classes)
    checkpoint = tmp_path / "best.pt"
    save_checkpoint(
        {"task": "detection", "head": "ssd", "config": to_dict(cfg), "model": model.state_dict(), "epoch": 0},
        checkpoint,
    )

    tool = _load_tool()
    tool.main(["--checkpoint", str(checkpoint), "--max-images", "2", "--workers", "0", "--no-progress"])
    printed = capsys.readouterr().out
    assert len(re.findall(r"maxDets=\s*\d+ \] = ", printed)) == 12
    written = json.loads((tmp_path / tool.METRICS_FILE).read_text())  # default: next to the checkpoint
    assert set(COCO_METRIC_NAMES) <= set(written) and written["checkpoint"] == str(checkpoint)
    assert set(written["per_class_AP"]) <= set(dataset.class_names[1:])
    assert all(0.0 <= ap <= 1.0 for ap in written["per_class_AP"].values())


def test_ground_truth_without_area_uses_the_box_area(tmp_path):
    """Exporters often omit "area"; COCOeval raised KeyError: 'area'. Box area w*h is COCO's rule for boxes."""
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 40], "iscrowd": 0}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    perfect = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 40], "score": 0.9}]
    metrics, _, _ = evaluate_results(path, perfect)
    # 20 x 40 = 800 px^2 is "small" (< 32^2): the box counts in APs, not APm.
    assert metrics["AP"] == pytest.approx(1.0) and metrics["APs"] == pytest.approx(1.0) and metrics["APm"] == -1.0
