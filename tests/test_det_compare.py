"""compare_detectors' accuracy figures: COCO AP / AP50 / recall at IoU 0.5 worked out by hand."""

from __future__ import annotations

import contextlib
import io

import pytest
from pycocotools.coco import COCO

from mnapps.cli.compare_detectors import parse_args
from mnapps.export.det_compare import coco_scores


def _gt(boxes_per_image):
    images, annotations = [], []
    for image_id, boxes in enumerate(boxes_per_image, start=1):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 200, "height": 200})
        for box in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "face"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _det(image_id, box, score):
    return {"image_id": image_id, "category_id": 1, "bbox": box, "score": score}


def test_perfect_detections_score_one_everywhere():
    gt = _gt([[[10, 10, 50, 50]], [[100, 100, 40, 60]], []])
    results = [_det(1, [10, 10, 50, 50], 0.9), _det(2, [100, 100, 40, 60], 0.8)]
    assert coco_scores(gt, results, 0.5) == pytest.approx({"AP": 1.0, "AP50": 1.0, "recall50": 1.0,
                                                           "recall50_at_threshold": 1.0})


def test_a_face_found_only_under_the_threshold_counts_for_recall_but_not_at_the_operating_point():
    gt = _gt([[[10, 10, 50, 50]], [[100, 100, 40, 60]]])
    # the second face is found with IoU 0.6 (a shifted box) at score 0.3: recall 1 over all
    # detections, 0.5 at score >= 0.5; AP50 is 1 (both matched at IoU >= 0.5, nothing false)
    shifted = [100, 100 + 15, 40, 60]  # overlap 45 of 60 rows: IoU 45/75 = 0.6
    results = [_det(1, [10, 10, 50, 50], 0.9), _det(2, shifted, 0.3)]
    scores = coco_scores(gt, results, 0.5)
    assert scores["AP50"] == pytest.approx(1.0)
    assert scores["recall50"] == pytest.approx(1.0)
    assert scores["recall50_at_threshold"] == pytest.approx(0.5)
    # at IoU 0.65 and above the shifted box misses: AP over 0.50:0.95 is below 1
    assert scores["AP"] < 0.7


def test_no_detections_score_zero():
    gt = _gt([[[10, 10, 50, 50]]])
    assert coco_scores(gt, [], 0.5) == {"AP": 0.0, "AP50": 0.0, "recall50": 0.0, "recall50_at_threshold": 0.0}


def test_checkpoints_are_name_path_pairs():
    args = parse_args(["teacher=a.pt", "small=b.pt", "--ann", "x.json", "--images", "d", "--calib", "d",
                       "--work-dir", "w"])
    assert {k: str(v) for k, v in args.pairs.items()} == {"teacher": "a.pt", "small": "b.pt"}
    with pytest.raises(SystemExit):
        parse_args(["a.pt", "--ann", "x.json", "--images", "d", "--calib", "d", "--work-dir", "w"])
