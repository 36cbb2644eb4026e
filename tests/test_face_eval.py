"""Face verification: pair-list parsing (LFW and CSV), pair resolution errors, the metrics
against cases worked out by hand, the collapse guard, the one embedding loop, and eval_face /
embed_faces as a user who makes mistakes would run them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mnapps.tasks.face.evaluation import (
    COLLAPSE_COSINE,
    accuracy_at_threshold,
    collapse_warning,
    embed_faces,
    embedding_spread,
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


def test_majority_answer_is_reported_beside_kfold_accuracy():
    # 3 same, 5 different: always answering "different" is right 5/8 of the time.
    distances = np.array([0.1, 0.2, 0.3, 0.9, 1.0, 1.1, 1.2, 1.3])
    same = np.array([True, True, True, False, False, False, False, False])
    result = verification_metrics(distances, same, n_folds=2)
    assert result["majority_answer"] == "different" and result["majority_accuracy"] == pytest.approx(5 / 8)
    flipped = verification_metrics(distances, ~same, n_folds=2)
    assert flipped["majority_answer"] == "same" and flipped["majority_accuracy"] == pytest.approx(5 / 8)
    table = format_verification_table({"student": result})
    assert "accuracy of always answering 'different'" in table and "0.6250" in table


def test_embedding_spread_by_hand_and_collapse_warning():
    # Four orthogonal unit vectors: every pairwise cosine 0, four equal singular values ->
    # effective rank exp(log 4) = 4.
    spread = embedding_spread(torch.eye(4, 6))
    assert spread["mean_pairwise_cosine"] == pytest.approx(0.0, abs=1e-7)
    assert spread["effective_rank"] == pytest.approx(4.0, rel=1e-6) and not spread["collapsed"]
    assert collapse_warning("student", spread) is None
    # Every row the same direction (different lengths): cosine 1, one singular value -> rank 1.
    collapsed = embedding_spread(torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]]))
    assert collapsed["mean_pairwise_cosine"] == pytest.approx(1.0) and collapsed["effective_rank"] == pytest.approx(1.0)
    assert collapsed["collapsed"] and "COLLAPSED" in collapse_warning("student", collapsed)
    # Two directions at cosine 0.96 > COLLAPSE_COSINE: collapsed by the cosine rule alone.
    angle = np.arccos(0.96)
    near = torch.tensor([[1.0, 0.0], [np.cos(angle), np.sin(angle)]], dtype=torch.float32)
    assert 0.96 > COLLAPSE_COSINE and embedding_spread(near)["collapsed"]
    # NaN rows (unreadable images) are left out; one row left says nothing.
    lonely = embedding_spread(torch.tensor([[1.0, 0.0], [float("nan"), 0.0]]))
    assert lonely["count"] == 1 and not lonely["collapsed"]


def test_resolve_pairs_reads_escaping_names_and_says_so_once(tmp_path):
    images, outside = tmp_path / "images", tmp_path / "elsewhere"
    _touch_image(images / "a.png")
    _touch_image(outside / "b.png")
    path = tmp_path / "pairs.csv"
    path.write_text(f"file_x,file_y,Decision\na.png,../elsewhere/b.jpg,Yes\na.png,{outside / 'b.png'},No\n")
    with pytest.warns(UserWarning, match=r"2 image reference\(s\) are absolute or climb out") as caught:
        resolved = resolve_pairs(read_pairs(path, n_folds=2), images)
    assert len([w for w in caught if issubclass(w.category, UserWarning)]) == 1  # once, with the count
    assert [b for _, b in resolved] == [outside / "b.png", outside / "b.png"]  # still read


def _write_png(path, colour, size=40):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


class _MeanColour(torch.nn.Module):
    """Embeds an image as its (unnormalised) mean colour: distinct colours, distinct embeddings."""

    def forward(self, images):
        return images.mean(dim=(2, 3))


def test_embed_faces_one_loop_for_files_and_folders(tmp_path):
    from mnapps.tasks.face.data.faces import FaceFolder

    _write_png(tmp_path / "red.png", (255, 0, 0))
    _write_png(tmp_path / "green.png", (0, 255, 0))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    files = [tmp_path / "red.png", tmp_path / "green.png"]
    out = embed_faces(_MeanColour(), files, image_size=32, batch_size=1)
    assert torch.allclose(out, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), atol=1e-6)
    folder = FaceFolder(tmp_path, image_size=32)  # broken.png, green.png, red.png (sorted)
    with pytest.raises(ValueError, match=r"cannot read 1 face image\(s\): .*broken.png"):
        embed_faces(_MeanColour(), folder)
    with pytest.warns(RuntimeWarning, match="broken.png"):
        rows = embed_faces(_MeanColour(), folder, unreadable="nan")
    assert torch.isnan(rows[0]).all() and torch.allclose(rows[2], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    # flip TTA: a left-red/right-blue image and its mirror embed alike; the sum is renormalised.
    half = np.zeros((32, 32, 3), np.uint8)
    half[:, :16, 0], half[:, 16:, 2] = 255, 255
    Image.fromarray(half).save(tmp_path / "half.png")
    tta = embed_faces(_MeanColour(), [tmp_path / "half.png"], image_size=32, flip_tta=True)
    assert torch.allclose(tta, torch.tensor([[2 ** -0.5, 0.0, 2 ** -0.5]]), atol=1e-5)


# ---------------------------------------------------------------------------- tools, as a user would run them


@pytest.fixture()
def small_trunk_checkpoint(tmp_path):
    """A real mnapps classification checkpoint (MobileNetV1-0.25, seeded): a --trunk baseline."""
    from mnapps.checkpoint import save_checkpoint
    from mnapps.config import BackboneConfig, to_dict
    from mnapps.tasks.classification import ClsConfig, ClsModelConfig, build_classifier

    torch.manual_seed(0)
    cfg = ClsConfig(model=ClsModelConfig(backbone=BackboneConfig(width_mult=0.25), num_classes=3))
    model = build_classifier(cfg.model, 3)
    path = tmp_path / "trunk.pt"
    save_checkpoint({"task": "classification", "config": to_dict(cfg), "model": model.state_dict()}, path)
    return path, model


def _pair_folder(tmp_path):
    images = tmp_path / "crops"
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "d"):
        images.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(images / f"{name}.png")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("file_x,file_y,Decision\na.png,b.png,Yes\nc.png,d.png,Yes\na.png,c.png,No\nb.png,d.png,No\n")
    return pairs, images


def test_trunk_baseline_is_the_checkpoints_pooled_features(tmp_path, small_trunk_checkpoint):
    from mnapps.tasks.face import evaluate_face_verification, load_trunk_embedder

    path, classifier = small_trunk_checkpoint
    trunk = load_trunk_embedder(path, input_size=48)
    images = torch.rand(2, 3, 48, 48)
    classifier.eval()
    # The classifier's own feature map, averaged and normalised: what the baseline must return.
    expected = torch.nn.functional.normalize(classifier.forward_features(images * 2 - 1).mean((2, 3)), dim=1)
    assert torch.allclose(trunk(images), expected, atol=1e-5)
    pairs, folder = _pair_folder(tmp_path)
    result = evaluate_face_verification(read_pairs(pairs, n_folds=2), folder, {"trunk": trunk}, image_size=48)
    assert result.results["trunk"]["pairs"] == 4 and len(result.files) == 4
    assert result.spreads["trunk"]["count"] == 4 and result.agreement is None


def _run_eval_face(argv, capsys):
    from mnapps.cli.eval_face import main

    code = main([str(a) for a in argv] + ["--folds", "2"])  # four pairs: two folds
    return code, capsys.readouterr()


def test_eval_face_corrupt_image_is_one_line_error(tmp_path, capsys, small_trunk_checkpoint):
    pairs, images = _pair_folder(tmp_path)
    (images / "c.png").write_bytes(b"\x89PNG truncated")
    code, out = _run_eval_face(["--pairs", pairs, "--images", images, "--trunk", small_trunk_checkpoint[0],
                                "--out", tmp_path / "out", "--device", "cpu"], capsys)
    assert code == 2 and "Traceback" not in out.err
    errors = [line for line in out.err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot read 1 face image(s)") and "c.png" in errors[0]
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_eval_face_refuses_bad_out_and_device(tmp_path, capsys, small_trunk_checkpoint):
    pairs, images = _pair_folder(tmp_path)
    trunk = small_trunk_checkpoint[0]
    (tmp_path / "taken.txt").write_text("keep me")
    code, out = _run_eval_face(["--pairs", pairs, "--images", images, "--trunk", trunk, "--out", tmp_path / "taken.txt"], capsys)
    assert code == 2 and "is an existing file" in out.err and (tmp_path / "taken.txt").read_text() == "keep me"
    code, out = _run_eval_face(["--pairs", pairs, "--images", images, "--trunk", trunk, "--out", images / "eval"], capsys)
    assert code == 2 and "is, or is inside, the input" in out.err and not (images / "eval").exists()
    code, out = _run_eval_face(["--pairs", pairs, "--images", images, "--trunk", trunk, "--device", "tpu"], capsys)
    assert code == 2 and out.err.count("\n") == 1 and "device" in out.err
    code, out = _run_eval_face(["--pairs", pairs, "--images", images, "--trunk", trunk, "--out", tmp_path / "ok",
                                "--device", "cpu"], capsys)
    assert code == 0 and "accuracy of always answering 'different'" in out.out and "spread: effective rank" in out.out
    saved = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert set(saved["models"]) == {"trunk"} and saved["spread"]["trunk"]["count"] == 4


def test_embed_faces_tool_never_writes_into_its_input(tmp_path, capsys, small_trunk_checkpoint):
    from mnapps.cli.embed_faces import main
    from mnapps.checkpoint import save_checkpoint
    from mnapps.config import BackboneConfig, to_dict
    from mnapps.heads.face_embedding import FaceModelConfig, build_face_embedder

    _, images = _pair_folder(tmp_path)
    cfg = FaceModelConfig(backbone=BackboneConfig(width_mult=0.25), input_size=48)
    student = tmp_path / "student.pt"
    save_checkpoint({"task": "face", "config": {"model": to_dict(cfg)}, "model": build_face_embedder(cfg).state_dict()},
                    student)
    assert main([str(images), "--checkpoint", str(student), "--out", str(images / "emb.npz")]) == 2
    assert "is, or is inside, the input" in capsys.readouterr().err and not (images / "emb.npz").exists()
    assert main([str(images), "--checkpoint", str(student), "--out", str(tmp_path / "emb.npz"), "--device", "cuda:7"]) == 2
    assert "device" in capsys.readouterr().err
    assert main([str(images), "--checkpoint", str(student), "--out", str(tmp_path / "emb.npz"), "--device", "cpu"]) == 0
    saved = np.load(tmp_path / "emb.npz")
    assert saved["embeddings"].shape == (4, 512) and saved["files"].tolist() == ["a.png", "b.png", "c.png", "d.png"]
