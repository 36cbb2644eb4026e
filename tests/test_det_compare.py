"""compare_detectors' accuracy figures: COCO AP / AP50 / recall at IoU 0.5 worked out by hand."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO

from mnapps.cli.compare_detectors import format_table, parse_args
from mnapps.export.det_compare import choose_threshold, coco_scores, operating_point, threshold_for_recall


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


# Operating points: two photos, three faces (A and C on photo 1, B on photo 2); detections best
# first: A exactly (0.9), a false box on photo 1 (0.8), B shifted to IoU 0.6 (0.6), A again (0.5,
# false: A is taken). C is never found. Worked out by hand, prefix by prefix:
#   t=0.9: 1 kept, 1 hit -> recall 1/3, precision 1     t=0.8: 2 kept, 1 hit -> 1/3, 1/2
#   t=0.6: 3 kept, 2 hits -> 2/3, 2/3                    t=0.5: 4 kept, 2 hits -> 2/3, 2/4
def _operating_case():
    gt = _gt([[[10, 10, 50, 50], [120, 120, 30, 30]], [[100, 100, 40, 60]]])
    results = [_det(1, [10, 10, 50, 50], 0.9), _det(1, [60, 150, 20, 20], 0.8), _det(2, [100, 115, 40, 60], 0.6),
               _det(1, [11, 10, 50, 50], 0.5)]
    return gt, results


@pytest.mark.parametrize("threshold, recall, precision, kept", [
    (0.9, 1 / 3, 1.0, 1), (0.7, 1 / 3, 1 / 2, 2), (0.6, 2 / 3, 2 / 3, 3), (0.5, 2 / 3, 2 / 4, 4), (0.95, 0.0, 1.0, 0),
])
def test_operating_point_counts_hits_and_false_boxes_above_the_threshold(threshold, recall, precision, kept):
    gt, results = _operating_case()
    point = operating_point(gt, results, threshold)
    assert point == pytest.approx({"threshold": threshold, "recall50": recall, "precision50": precision,
                                   "detections": kept})


def test_operating_point_recall_agrees_with_cocoeval_run_on_the_kept_detections_alone():
    gt, results = _operating_case()
    for threshold in (0.9, 0.7, 0.6, 0.5):
        assert operating_point(gt, results, threshold)["recall50"] == pytest.approx(
            coco_scores(gt, results, threshold)["recall50_at_threshold"])


def test_val_recall_rule_is_the_highest_threshold_keeping_the_validation_recall():
    gt, results = _operating_case()
    assert choose_threshold(gt, results, 0.3, "val-recall") == (0.9, True)
    assert choose_threshold(gt, results, 0.6, "val-recall") == (0.6, True)  # 2/3 first reached at B's score
    assert choose_threshold(gt, results, 2 / 3, "val-recall") == (0.6, True)
    assert choose_threshold(gt, results, 0.9, "val-recall") == (0.0, False)  # C is never found: keep everything
    with pytest.raises(ValueError, match="target recall"):
        choose_threshold(gt, results, 0.0, "val-recall")
    with pytest.raises(ValueError, match="valid: conformal, val-recall"):
        choose_threshold(gt, results, 0.5, "median")


def test_conformal_rule_takes_the_m_th_lowest_face_score():
    # the same three faces: A found at 0.9, B at 0.6, C never (ranks lowest); n = 3, so
    # m = floor(4 (1 - target)): target 0.25 -> m 3 (A's 0.9), 0.5 -> m 2 (B's 0.6),
    # 0.7 -> m 1 (C: never found, keep everything), 0.8 -> m 0 (too few faces for the bound)
    gt, results = _operating_case()
    assert choose_threshold(gt, results, 0.25) == (0.9, True)
    assert choose_threshold(gt, results, 0.5) == (0.6, True)
    assert choose_threshold(gt, results, 0.7) == (0.0, False)
    assert choose_threshold(gt, results, 0.8) == (0.0, False)


def test_on_fourteen_faces_the_rules_pick_the_lowest_and_the_second_lowest_face():
    # 14 validation faces, all found, at scores 0.30, 0.52, 0.54, 0.77, ... (the shape of a
    # student's validation scores): for a target of 0.9 the conformal rule's m is
    # floor(15 x 0.1) = 1, the lowest face; keeping 13 of 14 (val-recall) drops the lowest.
    scores = [0.30, 0.52, 0.54, 0.77, 0.79, 0.89, 0.90, 0.91, 0.92, 0.93, 0.94, 0.97, 0.98, 0.99]
    gt = _gt([[[10 + 12 * i, 10, 10, 10] for i in range(14)]])
    results = [_det(1, [10 + 12 * i, 10, 10, 10], score) for i, score in enumerate(scores)]
    results.append(_det(1, [100, 150, 30, 30], 0.34))  # a false box between the two thresholds
    assert choose_threshold(gt, results, 0.9) == (0.30, True)
    assert choose_threshold(gt, results, 0.9, "val-recall") == (0.52, True)
    assert operating_point(gt, results, 0.30) == pytest.approx(
        {"threshold": 0.30, "recall50": 1.0, "precision50": 14 / 15, "detections": 15})
    # 29 faces: m = floor(30 x 0.1) = 3, the third lowest
    assert threshold_for_recall(np.linspace(0.1, 0.9, 29), 29, 0.9) == (pytest.approx(0.1 + 2 * 0.8 / 28), True)


@pytest.mark.parametrize("rule, expected", [("conformal", 1 - 1 / 15), ("val-recall", 13 / 15)])
def test_recall_on_new_faces_is_what_each_rule_promises(rule, expected):
    # Draw 14 validation and 31 new face scores from one distribution (a few faces never found),
    # choose the threshold on the validation ones, count the new faces kept; over many draws the
    # mean is the rule's exact expectation: 1 - m/(n + 1) with m = 1 (conformal) or 2 (val-recall).
    rng = np.random.default_rng(0)
    kept = []
    for _ in range(4000):
        val, new = rng.beta(5, 1.5, size=14), rng.beta(5, 1.5, size=31)
        val[val < 0.05], new[new < 0.05] = -np.inf, -np.inf  # never found
        threshold, reached = threshold_for_recall(val[np.isfinite(val)], 14, 0.9, rule)
        kept.append(np.mean(new >= threshold) if reached else np.mean(np.isfinite(new)))
    assert np.mean(kept) == pytest.approx(expected, abs=0.006)
    assert (np.mean(kept) >= 0.9) == (rule == "conformal")


def test_val_ann_must_be_other_photos_and_adds_columns(tmp_path):
    ann = tmp_path / "heldout.json"
    with pytest.raises(SystemExit):
        parse_args(["a=a.pt", "--ann", str(ann), "--images", "d", "--calib", "d", "--work-dir", "w",
                    "--val-ann", str(ann)])
    row = {"name": "s", "width_mult": 1.0, "size": 256, "macs": 785e6, "params": 5.52e6, "torch_fp32_ms": 84.0,
           "ort_fp32_ms": 47.0, "ort_int8_ms": 34.0, "torch_fp32_AP": 0.6, "torch_fp32_AP50": 0.93,
           "torch_fp32_recall50": 0.97, "torch_fp32_recall50_at_threshold": 0.87, "ort_int8_AP50": 0.92}
    assert "val threshold" not in format_table([row])
    row["val"] = {"threshold": 0.3125, "reached": True}
    row["torch_fp32_at_val"] = {"recall50": 0.9355, "precision50": 0.8}
    assert format_table([row]).splitlines()[-1].endswith("| 0.312 | 0.935 | 0.800 |")
