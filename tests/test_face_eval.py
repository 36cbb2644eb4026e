"""Face verification: pair-list parsing (LFW and CSV), pair resolution errors, and the metrics
against cases worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from mnapps.eval.face import (
    accuracy_at_threshold,
    equal_error_rate,
    format_verification_table,
    kfold_accuracy,
    plot_roc,
    read_pairs,
    resolve_pairs,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification_metrics,
)

# Two folds of four pairs (file order). Fold A: same 0.3, 0.55; different 0.8, 1.2.
# Fold B: same 0.5, 0.9; different 0.7, 1.5.
DIST = np.array([0.3, 0.55, 0.8, 1.2, 0.5, 0.9, 0.7, 1.5])
SAME = np.array([True, True, False, False, True, True, False, False])


def test_kfold_accuracy_by_hand():
    # Fold A held out: on fold B the candidate thresholds 0.6 and 1.2 both classify 3/4 right;
    # the lowest, 0.6, gets all of fold A right (0.3, 0.55 < 0.6 <= 0.8, 1.2).
    # Fold B held out: on fold A, 0.675 (between 0.55 and 0.8) is perfect; on fold B it
    # rejects the same pair at 0.9 and nothing else: 3/4.
    result = kfold_accuracy(DIST, SAME, n_folds=2)
    assert result["folds"] == [1.0, 0.75]
    assert result["thresholds"] == pytest.approx([0.6, 0.675])
    assert result["mean"] == pytest.approx(0.875)
    assert result["std"] == pytest.approx(0.125)


def test_roc_auc_eer_by_hand():
    far, tar, thresholds = roc_curve(DIST, SAME)
    # Sorted: 0.3S 0.5S 0.55S 0.7D 0.8D 0.9S 1.2D 1.5D -> (FAR, TAR) steps.
    assert far.tolist() == [0, 0, 0, 0, 0.25, 0.5, 0.5, 0.75, 1.0]
    assert tar.tolist() == [0, 0.25, 0.5, 0.75, 0.75, 0.75, 1.0, 1.0, 1.0]
    # AUC = P(same distance < different distance): 4 + 4 + 4 + 2 of 16 orderings.
    assert roc_auc(far, tar) == pytest.approx(14 / 16)
    # At threshold 0.7 one of four different pairs is accepted and one of four same pairs
    # rejected: FAR = FRR = 0.25.
    eer, threshold = equal_error_rate(far, tar, thresholds)
    assert eer == pytest.approx(0.25)
    assert threshold == pytest.approx(0.7)


def test_eer_interpolates_between_roc_points():
    # same 0.1, 0.4; different 0.2, 0.5: points (0,0.5)->(0.5,0.5)->(0.5,1): FRR 0.5 -> 0.5 -> 0;
    # the crossing FAR = FRR = 0.5 is at the point (0.5, 0.5) itself.
    far, tar, thr = roc_curve(np.array([0.1, 0.4, 0.2, 0.5]), np.array([True, True, False, False]))
    assert equal_error_rate(far, tar, thr)[0] == pytest.approx(0.5)
    # same 0.1; different 0.2: perfect separation, EER 0.
    far, tar, thr = roc_curve(np.array([0.1, 0.2]), np.array([True, False]))
    assert equal_error_rate(far, tar, thr)[0] == pytest.approx(0.0)


def test_tar_at_far_by_hand_and_unmeasurable():
    # 4 different pairs: FAR 0.25 allows 1 false accept -> threshold = 2nd smallest different
    # distance 0.8 -> same pairs below it: 0.3, 0.5, 0.55 -> 3/4.
    value, _ = tar_at_far(DIST, SAME, 0.25)
    assert value == pytest.approx(0.75)
    value, _ = tar_at_far(DIST, SAME, 0.5)  # 2 allowed -> threshold 1.2 -> all 4 same
    assert value == pytest.approx(1.0)
    value, note = tar_at_far(DIST, SAME, 0.1)  # one false accept is already 0.25 > 0.1
    assert value is None and "at least 10" in note and "has 4" in note


def test_accuracy_at_threshold_by_hand():
    # distance < 1.0: all 4 same pairs right; different 0.8 and 0.7 wrongly accepted.
    assert accuracy_at_threshold(DIST, SAME, 1.0) == pytest.approx(6 / 8)


def test_verification_metrics_lfw_sized_far_rules():
    rng = np.random.default_rng(0)
    same = np.tile(np.r_[np.ones(300, bool), np.zeros(300, bool)], 10)  # LFW: 3000 different
    distances = np.where(same, rng.uniform(0.2, 1.0, same.size), rng.uniform(0.8, 1.8, same.size))
    result = verification_metrics(distances, same, n_folds=10, fars=(1e-3, 1e-4))
    assert result["different_pairs"] == 3000
    assert result["tar_at_far"]["1e-03"] is not None  # 3000 * 1e-3 = 3 false accepts allowed
    assert result["tar_at_far"]["1e-04"] is None
    assert "10000" in result["tar_at_far_notes"]["1e-04"]
    assert 0.8 < result["accuracy"] <= 1.0 and len(result["fold_accuracies"]) == 10
    table = format_verification_table({"student": result, "teacher": result}, agreement=0.5)
    assert "TAR @ FAR=1e-04" in table and "n/a" in table and "not measurable" in table
    json.dumps(result)  # JSON-ready


def test_lfw_pairs_both_line_forms(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("2\t1\nAbel_Pacheco\t1\t4\nAbel_Pacheco 2 Dean_Barker 1\nBob 1 2\nCarl 3 Dan 12\n")
    pairs = read_pairs(path)
    assert pairs.format == "lfw" and pairs.n_folds == 2 and len(pairs) == 4
    first, second = pairs.pairs[0], pairs.pairs[1]
    assert (first.first, first.second, first.same, first.line) == (
        "Abel_Pacheco/Abel_Pacheco_0001", "Abel_Pacheco/Abel_Pacheco_0004", True, 2)
    assert (second.first, second.second, second.same) == (
        "Abel_Pacheco/Abel_Pacheco_0002", "Dean_Barker/Dean_Barker_0001", False)
    assert pairs.pairs[3].second == "Dan/Dan_0012"
    assert pairs.issame.tolist() == [True, False, True, False]


def test_lfw_pairs_malformed_line_names_it(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("10 300\nAbel 1 2\nAbel 1 Bob\n")
    with pytest.raises(ValueError, match=r"line 3: 'Abel 1 Bob'"):
        read_pairs(path)
    path.write_text("Abel 1 x\n")
    with pytest.raises(ValueError, match=r"line 1.*'x' is not an integer"):
        read_pairs(path)


def test_csv_pairs(tmp_path):
    path = tmp_path / "master.csv"
    path.write_text("file_x,file_y,Decision\nimg1.jpg,img2.jpg,Yes\nimg1.jpg,img3.jpg,No\n\nimg2.jpg,img3.jpg,yes\n")
    pairs = read_pairs(path, n_folds=3)
    assert pairs.format == "csv" and pairs.n_folds == 3
    assert [(p.first, p.second, p.same, p.line) for p in pairs.pairs] == [
        ("img1.jpg", "img2.jpg", True, 2), ("img1.jpg", "img3.jpg", False, 3), ("img2.jpg", "img3.jpg", True, 5)]
    path.write_text("file_x,file_y,Decision\nimg1.jpg,img2.jpg,Maybe\n")
    with pytest.raises(ValueError, match="line 2.*'Maybe'"):
        read_pairs(path)


def _touch_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def test_resolve_pairs_finds_aligned_png_and_names_missing_line(tmp_path):
    images = tmp_path / "aligned"
    _touch_image(images / "Abel" / "Abel_0001.png")
    _touch_image(images / "Abel" / "Abel_0002.png")
    _touch_image(images / "Bob" / "Bob_0001.jpg")
    path = tmp_path / "pairs.txt"
    path.write_text("Abel 1 2\nAbel 1 Bob 1\n")
    resolved = resolve_pairs(read_pairs(path, n_folds=2), images)
    assert [(a.name, b.name) for a, b in resolved] == [("Abel_0001.png", "Abel_0002.png"), ("Abel_0001.png", "Bob_0001.jpg")]
    path.write_text("Abel 1 2\nAbel 1 Bob 3\n")  # Bob has no 3rd image
    with pytest.raises(ValueError, match=r"pairs.txt line 2: 'Abel 1 Bob 3': no image for 'Bob/Bob_0003'"):
        resolve_pairs(read_pairs(path, n_folds=2), images)
    path.write_text("Abel 1 2\nAbel 1 Zed 1\n")  # a name that does not exist
    with pytest.raises(ValueError, match=r"line 2: 'Abel 1 Zed 1': no image for 'Zed/Zed_0001'"):
        resolve_pairs(read_pairs(path, n_folds=2), images)
    (images / "no_face.txt").write_text("Zed/Zed_0001.jpg\n")
    with pytest.raises(ValueError, match="found no face in it"):
        resolve_pairs(read_pairs(path, n_folds=2), images)


def test_resolve_csv_pairs_by_stem(tmp_path):
    _touch_image(tmp_path / "img1.png")
    _touch_image(tmp_path / "img2.png")
    path = tmp_path / "master.csv"
    path.write_text("file_x,file_y,Decision\nimg1.jpg,img2.jpg,Yes\nimg1.jpg,img9.jpg,No\n")
    with pytest.raises(ValueError, match=r"master.csv line 3: .*no image for 'img9.jpg'"):
        resolve_pairs(read_pairs(path, n_folds=2), tmp_path)


def test_roc_png_written(tmp_path):
    far, tar, _ = roc_curve(DIST, SAME)
    out = plot_roc({"student": (far, tar)}, tmp_path / "roc.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shared_pair_files(shared_data):
    lfw = read_pairs(shared_data / "faces" / "lfw_pairs_format" / "pairs.txt")
    assert len(lfw) == 6000 and lfw.n_folds == 10
    same = lfw.issame
    # Ten sets in file order, each 300 same then 300 different pairs.
    assert same.reshape(10, 600)[:, :300].all() and not same.reshape(10, 600)[:, 300:].any()
    assert lfw.pairs[0].first == "Abel_Pacheco/Abel_Pacheco_0001" and lfw.pairs[0].second == "Abel_Pacheco/Abel_Pacheco_0004"
    deepface = read_pairs(shared_data / "faces" / "deepface" / "master.csv")
    assert len(deepface) == 300 and int(deepface.issame.sum()) == 38
    result = tar_at_far(np.linspace(0, 1, 300), deepface.issame, 1e-3)
    assert result[0] is None and "262" in result[1]
    assert math.isclose(len(resolve_pairs(deepface, shared_data / "faces" / "deepface")), 300)
