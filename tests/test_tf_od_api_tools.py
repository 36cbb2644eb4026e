"""Imported TF OD API SSDs in the tools: import_weights --kind ssd, infer_det, train_det --weights,
ONNX export (TF preprocessing, sigmoid scores) and the SSD face cropper.

A generated miniature (random width-0.25 weights in face-api.js's TF.js layout and in the TF OD
API's .npz layout, from test_tf_od_api) runs everywhere; face-api.js's real detector, its
reference detections and the shared photos are used when ../shared is present.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from mnapps.checkpoint import load_checkpoint, save_checkpoint
from lab import face_pipeline_bench_cli as face_pipeline_bench
from mnapps.cli import eval_det, import_weights, infer_det, train_det
from mnapps.data.box_crops import SQUARE, BoxFaceAligner, CropGeometry, crop_region, cut_crop
from mnapps.data.image_io import load_rgb
from mnapps.export.onnx import OrtSSD
from mnapps.export.pipeline import export_checkpoint, load_export_spec
from mnapps.heads.ssd import SigmoidSSD, TFResizeTransform
from mnapps.importers.tf_od_api import decode_all_anchors, import_tf_od_api_ssd
from mnapps.tasks.detection import (
    box_detector,
    build_model,
    fine_tune_config,
    import_tf_od_api_ssd_checkpoint,
    load_detector,
    load_detector_weights,
)
from test_tf_od_api import SIZE, faceapi_entries, od_api_tensors, random_params, tf_anchors
from test_tfjs import write_tfjs
from test_train_det import _data_args, tiny_shapes  # noqa: F401 - tiny_shapes is a fixture

GRIDS = [6, 3, 2, 1, 1, 1]  # maps of a 96 input


@pytest.fixture(scope="module")
def mini_tfjs(tmp_path_factory):
    """A miniature face-api.js-layout detector (3 logits per anchor) as a TF.js folder."""
    folder = tmp_path_factory.mktemp("mini") / "faceapi_mini"
    entries, _ = faceapi_entries(random_params(np.random.default_rng(7)), SIZE, tf_anchors(GRIDS, True))
    write_tfjs(folder, entries, manifest="ssd_mobilenetv1_model-weights_manifest.json")
    return folder


@pytest.fixture(scope="module")
def mini_ckpt(mini_tfjs, tmp_path_factory):
    output = tmp_path_factory.mktemp("ckpt") / "mini_ssd.pt"
    assert import_weights.main(["--kind", "ssd", str(mini_tfjs), "--output", str(output)]) == 0
    return output


def _photos(folder, sizes=((70, 110), (96, 96), (120, 64))):
    """Generated non-square photos (smooth blobs, so a resize has something to interpolate)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    paths = []
    for index, (height, width) in enumerate(sizes):
        y, x = np.mgrid[:height, :width]
        image = np.stack([np.sin(x / (5 + c) + rng.uniform(0, 6)) * np.cos(y / (7 + c)) for c in range(3)], -1)
        paths.append(folder / f"photo{index}.png")
        Image.fromarray(((image + 1) * 127.5).astype(np.uint8)).save(paths[-1])
    return paths


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255


# ------------------------------------------------------------------------------------------
# import_weights --kind ssd


def test_import_tool_writes_a_detector_checkpoint_that_rebuilds_the_source(mini_tfjs, mini_ckpt, capsys):
    model, cfg = load_detector(mini_ckpt)
    ssd = cfg.model.head_settings
    # face-api.js reports only logit 1 (face): its third logit is dropped by default.
    assert cfg.model.head == "ssd" and cfg.model.num_classes == 2
    assert cfg.model.class_names == ("__background__", "face")
    assert (ssd.size, ssd.preprocess, ssd.score_activation, ssd.nms_threshold) == (SIZE, "tf_pad_resize", "sigmoid", 0.5)
    assert isinstance(model, SigmoidSSD) and isinstance(model.transform, TFResizeTransform)
    assert load_checkpoint(mini_ckpt)["source"].startswith("TF OD API SSD faceapi_mini")
    # The checkpoint holds what the library import makes of the same folder, less the third
    # class: sigmoid scores are per class, so every box and kept score is unchanged.
    direct = import_tf_od_api_ssd(mini_tfjs)
    assert direct.num_classes == 3
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    (boxes, scores), (direct_boxes, direct_scores) = decode_all_anchors(model, image), decode_all_anchors(direct.model, image)
    assert torch.equal(boxes, direct_boxes) and scores.shape[-1] == 2
    assert torch.allclose(scores, direct_scores[..., :2], atol=1e-6, rtol=0)


def test_import_tool_refuses_overwrite_and_bad_options(mini_tfjs, mini_ckpt, tmp_path, capsys):
    capsys.readouterr()
    assert import_weights.main(["--kind", "ssd", str(mini_tfjs), "--output", str(mini_ckpt)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    copy = tmp_path / "copy.pt"
    copy.write_bytes(b"old")
    assert import_weights.main(["--kind", "ssd", str(mini_tfjs), "--output", str(copy), "--overwrite",
                                "--class-names", "face,other", "--nms-threshold", "0.45"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "input 96, 2 class(es) + background (face, other), faceapi layout, anchor order after-square" in printed
    _, cfg = load_detector(copy)
    assert cfg.model.class_names == ("__background__", "face", "other") and cfg.model.head_settings.nms_threshold == 0.45
    assert import_weights.main(["--kind", "ssd", str(mini_tfjs), "--output", str(tmp_path / "x.pt"),
                                "--class-names", "a,b,c"]) == 2  # fmt: skip
    assert "the model has 2 foreground classes" in capsys.readouterr().err
    assert import_weights.main(["--kind", "ssd", str(mini_tfjs), "--format", "npz", "--output", str(tmp_path / "y.pt")]) == 2
    assert "--format npz expects a file ending in .npz" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        import_weights.main([str(mini_tfjs), "--size", "96"])
    assert exit_info.value.code == 2 and "--size is only for --kind ssd" in capsys.readouterr().err


def test_import_tool_reads_the_tf_od_api_npz_layout(tmp_path, capsys):
    params = random_params(np.random.default_rng(8))
    source = tmp_path / "ssd_coco_mini.npz"
    np.savez(source, **od_api_tensors(params))
    output = tmp_path / "coco.pt"
    assert import_weights.main(["--kind", "ssd", str(source), "--format", "npz", "--size", "96",
                                "--class-names", "a,b", "--output", str(output)]) == 0  # fmt: skip
    assert "tf_od_api layout, anchor order last, preprocess tf_resize" in capsys.readouterr().out
    model, cfg = load_detector(output)
    assert cfg.model.head_settings.nms_threshold == 0.6 and cfg.model.head_settings.preprocess == "tf_resize"
    assert cfg.model.class_names == ("__background__", "a", "b")
    # The default output name follows the source.
    assert import_weights._default_output(import_weights.parse_args(["--kind", "ssd", str(source)])).name == (
        "ssd_coco_mini_ssd.pt"
    )


# ------------------------------------------------------------------------------------------
# export: TF preprocessing and sigmoid scores through ONNX Runtime


def test_onnx_export_of_an_imported_detector_matches_pytorch(mini_ckpt, tmp_path):
    photos = _photos(tmp_path / "photos")
    result = export_checkpoint(mini_ckpt, tmp_path / "mini.onnx", parity_images=photos)
    detector = OrtSSD(result.fp32_path)
    assert (detector.params.preprocess, detector.params.score_activation) == ("tf_pad_resize", "sigmoid")
    assert "zero-padded bottom/right to a square" in detector.model.metadata["input"]
    model, _ = load_detector(mini_ckpt)
    images = [_as_tensor(load_rgb(path)) for path in photos]
    with torch.no_grad():
        expected = model(images)
    for ref, got, image in zip(expected, detector(images), images):
        assert len(ref["boxes"]) > 10 and len(got["boxes"]) == len(ref["boxes"])
        assert torch.equal(got["labels"], ref["labels"])
        assert torch.allclose(got["scores"], ref["scores"], atol=1e-4)
        assert torch.allclose(got["boxes"], ref["boxes"], atol=0.05)  # pixels of photos ~100 px wide


def test_export_of_an_imported_detector_asks_for_images(mini_ckpt, tmp_path):
    spec = load_export_spec(mini_ckpt)
    with pytest.raises(ValueError, match=r"was imported .* pass --images"):
        spec.default_images["parity"]()
    with pytest.raises(ValueError, match=r"pass --calib-images"):
        spec.default_images["calibration"]()


# ------------------------------------------------------------------------------------------
# train_det --weights


FAST = ["--set", "train.num_workers=0", "--set", "train.num_threads=1", "--set", "train.channels_last=false",
        "--set", "train.warmup_epochs=0.0", "--set", "data.eval_batch_size=4"]  # fmt: skip


def test_load_detector_weights_keeps_what_fits(mini_ckpt):
    cfg = fine_tune_config(mini_ckpt, None, ["model.ssd.score_threshold=0.2"])
    assert cfg.model.num_classes is None and cfg.model.head_settings.preprocess == "tf_pad_resize"
    assert cfg.model.head_settings.score_threshold == 0.2 and cfg.model.backbone.tf_padding
    source = load_checkpoint(mini_ckpt)["model"]
    same = build_model(cfg, 2)
    lines = load_detector_weights(same, mini_ckpt, 2)
    assert lines == [f"loaded {len(source)} of {len(source)} tensors from {mini_ckpt}"]
    assert all(torch.equal(value, source[key]) for key, value in same.state_dict().items())
    torch.manual_seed(0)
    other = build_model(cfg, 5)
    fresh = {k: v.clone() for k, v in other.state_dict().items()}
    lines = load_detector_weights(other, mini_ckpt, 5)
    # Map 0 has 3 anchors, the others 6; block 11 of a width-0.25 trunk has 128 channels.
    assert "class predictors re-initialised (2 classes in the checkpoint, 5 in the data" in lines[1]
    assert "head.classification_head.module_list.0.weight [6, 128, 1, 1] -> [15, 128, 1, 1]" in lines[1]
    assert "(and 6 bias tensor(s))" in lines[1]
    for key, value in other.state_dict().items():
        expected = fresh[key] if key.startswith("head.classification_head.") else source[key]
        assert torch.equal(value, expected), key


def test_train_det_fine_tunes_an_imported_detector(mini_ckpt, tiny_shapes, tmp_path, capsys, monkeypatch):
    import mnapps.checkpoint

    reads = []
    real_load = mnapps.checkpoint.safe_load
    monkeypatch.setattr(mnapps.checkpoint, "safe_load", lambda path, *a: reads.append(Path(path)) or real_load(path, *a))
    out = tmp_path / "ft"
    code = train_det.main(["--weights", str(mini_ckpt), *_data_args(tiny_shapes), "--epochs", "1",
                           "--batch-size", "4", "--output-dir", str(out), *FAST])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert reads.count(Path(mini_ckpt)) == 1  # --weights is read once, for the config and the weights alike
    total = len(load_checkpoint(mini_ckpt)["model"])  # all fit but the 6 class predictors' weights and biases
    assert f"weights: loaded {total - 12} of {total} tensors from {mini_ckpt}" in printed
    assert "weights: class predictors re-initialised (2 classes in the checkpoint, 5 in the data" in printed
    model, cfg = load_detector(out / "last.pt")
    assert cfg.model.num_classes == 5 and cfg.model.class_names[1:] == ("circle", "square", "triangle", "cross")
    assert (cfg.model.head_settings.size, cfg.model.head_settings.preprocess, cfg.model.head_settings.score_activation) == (96, "tf_pad_resize", "sigmoid")
    # One epoch moved the weights it loaded, starting from the imported ones.
    imported = load_checkpoint(mini_ckpt)["model"]
    key = "head.regression_head.module_list.1.weight"
    assert model.state_dict()[key].shape == imported[key].shape and not torch.equal(model.state_dict()[key], imported[key])


def test_train_det_weights_errors(mini_ckpt, tiny_shapes, tmp_path, capsys):
    classifier = save_checkpoint({"task": "classification", "head": None, "config": {}, "model": {}}, tmp_path / "c.pt")
    assert train_det.main(["--weights", str(classifier), *_data_args(tiny_shapes), *FAST]) == 2
    assert "is not an mnapps detection checkpoint" in capsys.readouterr().err
    assert train_det.main(["--weights", str(mini_ckpt), "--weights-backbone", str(classifier),
                           *_data_args(tiny_shapes), "--output-dir", str(tmp_path / "r"), *FAST]) == 2  # fmt: skip
    assert "not both" in capsys.readouterr().err
    assert train_det.main(["--weights", str(mini_ckpt), "--head", "ssdlite", *_data_args(tiny_shapes), *FAST]) == 2
    assert "holds a 'ssd' detector" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# SSD face crops


def test_crop_geometry_by_hand():
    # Box 40 wide, 80 tall, centred (50, 100); shifts are fractions of the longer side (80).
    box = (30.0, 60.0, 70.0, 140.0)
    assert crop_region(box, CropGeometry()) == box
    assert crop_region(box, SQUARE) == (10.0, 60.0, 90.0, 140.0)
    moved = crop_region(box, CropGeometry(scale_x=1.5, scale_y=1.25, shift_x=0.1, shift_y=-0.25))
    assert moved == pytest.approx((58 - 30, 80 - 50, 58 + 30, 80 + 50))
    with pytest.raises(ValueError, match="x2 > x1"):
        crop_region((10, 10, 5, 20))


def test_cut_crop_equals_facenet_pytorch_extract_face():
    from facenet_pytorch.models.utils.detect_face import extract_face

    image = (np.random.default_rng(3).uniform(0, 255, (120, 90, 3))).astype(np.uint8)
    for box, margin in (((10.3, 20.7, 70.2, 100.9), 0), ((10.3, 20.7, 70.2, 100.9), 32), ((-5, 60, 40, 130), 16)):
        theirs = extract_face(Image.fromarray(image), np.array(box), 160, margin)
        theirs = theirs.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        np.testing.assert_array_equal(cut_crop(image, box, 160, margin), theirs)


def test_box_face_aligner_selects_filters_and_crops():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 100:] = 200  # right half bright
    boxes = np.array([[110, 10, 150, 60], [10, 10, 30, 30], [20, 20, 90, 90]], np.float32)
    scores = np.array([0.9, 0.95, 0.4], np.float32)
    aligner = BoxFaceAligner(lambda img: (boxes, scores), image_size=32, min_score=0.5, geometry=CropGeometry())
    faces = aligner.detect(image, keep_all=True)
    assert [f.box for f in faces] == [tuple(map(float, boxes[0])), tuple(map(float, boxes[1]))]  # largest first; 0.4 dropped
    assert faces[0].crop.shape == (32, 32, 3) and faces[0].crop.min() == 200 and faces[1].crop.max() == 0
    by_score = BoxFaceAligner(lambda img: (boxes, scores), image_size=32, select="probability")
    assert by_score.detect(image)[0].probability == pytest.approx(0.95)
    assert aligner([image, image])[0].shape == (32, 32, 3)
    assert BoxFaceAligner(lambda img: (np.zeros((0, 4)), np.zeros(0)))([image]) == [None]
    with pytest.raises(ValueError, match="min_score"):
        BoxFaceAligner(lambda img: (boxes, scores), min_score=1.5)


def test_box_detector_returns_one_class_of_the_model(mini_tfjs, tmp_path):
    path, _ = import_tf_od_api_ssd_checkpoint(mini_tfjs, tmp_path / "two.pt", class_names=["face", "other"])
    model, _ = load_detector(path)
    model.score_thresh = 0.0
    image = (np.random.default_rng(5).uniform(0, 255, (80, 120, 3))).astype(np.uint8)
    boxes, scores = box_detector(model, label=2)(image)
    with torch.no_grad():
        found = model([_as_tensor(image)])[0]
    keep = found["labels"] == 2
    assert len(boxes) == int(keep.sum()) > 0 and (~keep).sum() > 0 and boxes.dtype == np.float32
    np.testing.assert_allclose(boxes, found["boxes"][keep].numpy())
    np.testing.assert_allclose(scores, found["scores"][keep].numpy())


# ------------------------------------------------------------------------------------------
# face-api.js's real detector (../shared/data)


@pytest.fixture(scope="module")
def faceapi_ckpt(shared_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("faceapi") / "faceapi_ssd.pt"
    source = shared_data / "faceapi_ssd_mobilenetv1"
    assert import_weights.main(["--kind", "ssd", str(source), "--output", str(output)]) == 0
    detections = json.loads((source / "reference_detections.json").read_text())
    return output, detections


def _matches(found: dict, want: list) -> tuple[float, float]:
    """(worst IoU, worst |score difference|) of each reference face's best detection."""
    want = torch.tensor(want, dtype=torch.float64).reshape(-1, 5)
    if not len(want):
        return 1.0, 0.0
    boxes = torch.cat([want[:, 1:3], want[:, 1:3] + want[:, 3:5]], dim=1)
    iou = box_iou(found["boxes"].double(), boxes)
    best = iou.max(dim=0)
    assert best.indices.unique().numel() == len(want)
    return float(best.values.min()), float((found["scores"][best.indices].double() - want[:, 0]).abs().max())


def test_infer_det_draws_the_faces_of_multiface(faceapi_ckpt, shared_data, tmp_path, capsys):
    checkpoint, detections = faceapi_ckpt
    photo = shared_data / "facenet_test_images" / "multiface.jpg"
    results = tmp_path / "results.json"
    assert infer_det.main(["--checkpoint", str(checkpoint), str(photo), "--out", str(tmp_path / "drawn"),
                           "--results-json", str(results)]) == 0  # fmt: skip
    assert "multiface.jpg: 6 detection(s) >= 0.3: face 0.99" in capsys.readouterr().out
    assert Image.open(tmp_path / "drawn" / "multiface.jpg").size == (1200, 630)
    found = [r for r in json.loads(results.read_text()) if r["score"] >= 0.3]
    as_detections = {"boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in found)]),
                     "scores": torch.tensor([r["score"] for r in found])}
    assert len(found) == len(detections["multiface"]["detections"]) == 6
    worst_iou, worst_score = _matches(as_detections, detections["multiface"]["detections"])
    assert worst_iou >= 0.98 and worst_score <= 0.01


def test_eval_det_scores_the_imported_detector_against_faceapis_detections(faceapi_ckpt, shared_data, tmp_path, capsys):
    # face-api.js's own detections (score >= 0.3) as ground truth: the import reproduces every one
    # (IoU >= 0.98) and ranks no false detection above any of them, so COCO AP is 1 at every IoU up to 0.95.
    checkpoint, detections = faceapi_ckpt
    images_dir = tmp_path / "photos"
    images_dir.mkdir()
    images, annotations = [], []
    for image_id, (name, entry) in enumerate(detections.items(), start=1):
        photo = shared_data / entry["photo"]
        (images_dir / f"{name}{photo.suffix}").symlink_to(photo)
        height, width = entry["height_width"]
        images.append({"id": image_id, "file_name": f"{name}{photo.suffix}", "height": height, "width": width})
        for _, x, y, w, h in entry["detections"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
    ann = tmp_path / "faces.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "face"}]}))
    assert eval_det.main(["--checkpoint", str(checkpoint), "--val-ann", str(ann), "--val-images", str(images_dir),
                          "--out-dir", str(tmp_path / "eval"), "--no-progress"]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert len(annotations) == 27  # 6 + 1 + 1 + 1 + 1 + 3 + 2 + 1 + 2 + 5 + 1 + 1 + 1 + 0 + 1
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)


@pytest.mark.slow
def test_onnx_fp32_and_int8_of_faceapi_on_the_15_photos(faceapi_ckpt, shared_data, tmp_path):
    checkpoint, detections = faceapi_ckpt
    photos = [shared_data / entry["photo"] for entry in detections.values()]
    result = export_checkpoint(checkpoint, tmp_path / "faceapi.onnx", parity_images=photos, num_parity=15, int8=True,
                               calib_images=shared_data / "faces" / "deepface", num_calib=16)
    model, _ = load_detector(checkpoint)
    backends = {"fp32": OrtSSD(result.fp32_path), "int8": OrtSSD(result.int8_path)}
    worst = {"fp32": [1.0, 0.0], "int8": [1.0, 0.0]}
    for name, entry in detections.items():
        image = _as_tensor(load_rgb(shared_data / entry["photo"], apply_exif=False))  # as the reference was made
        with torch.no_grad():
            reference = model([image])[0]
        keep = reference["scores"] >= 0.3
        reference = {k: v[keep] for k, v in reference.items()}
        for backend, detector in backends.items():
            found = detector([image])[0]
            found = {k: v[found["scores"] >= 0.3] for k, v in found.items()}
            if backend == "fp32":  # the acceptance rule against PyTorch: same count, IoU >= 0.98, score +-0.01
                assert len(found["boxes"]) == len(reference["boxes"]), name
                want = [[s, *b[:2], *(b[2:] - b[:2])] for s, b in zip(reference["scores"].tolist(), reference["boxes"].numpy())]
            else:  # int8 keeps every face face-api.js reports
                want = entry["detections"]
            if want:
                iou, score = _matches(found, want)
                worst[backend] = [min(worst[backend][0], iou), max(worst[backend][1], score)]
    faces = sum(len(entry["detections"]) for entry in detections.values())
    print(f"\nONNX fp32 vs PyTorch, 15 photos, {faces} detections >= 0.3: same counts, worst IoU {worst['fp32'][0]:.6f}, "
          f"worst score difference {worst['fp32'][1]:.2e}")  # pytest -s
    print(f"ONNX int8 vs face-api.js: all {faces} faces kept, worst IoU {worst['int8'][0]:.4f}, "
          f"worst score shift {worst['int8'][1]:.4f}")
    assert worst["fp32"][0] >= 0.98 and worst["fp32"][1] <= 0.01
    assert worst["int8"][0] >= 0.8


@pytest.mark.slow
def test_face_pipeline_bench_on_a_few_photos(faceapi_ckpt, shared_data, deepface_four, tmp_path, capsys):
    checkpoint, _ = faceapi_ckpt
    photos, pairs, names = deepface_four
    out = tmp_path / "out"
    assert face_pipeline_bench.main(["--detector-weights", str(checkpoint), "--data", str(shared_data),
                                     "--photos", str(photos), "--pairs", str(pairs), "--pair-images", str(photos),
                                     "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "SSD is" in printed and "x the speed of MTCNN" in printed
    report = json.loads((out / "face_pipeline.json").read_text())
    assert report["photos"] == 4 and report["faces_found"] == {"mtcnn": 4, "ssd": 4}
    assert report["comparison"]["matched"] == 4 and report["fallbacks"] == {"mtcnn": 0, "ssd_mtcnn": 0, "ssd_square": 0}
    for pipeline in ("mtcnn", "ssd_mtcnn", "ssd_square"):
        assert sorted(p.name for p in (out / "crops" / pipeline).iterdir()) == [n.replace(".jpg", ".png") for n in names]
        assert report["verification"][pipeline]["pairs"] == 12 and report["verification"][pipeline]["auc"] == 1.0
    assert math.isfinite(report["comparison"]["geometry_median"]["height_ratio"])
