"""Export: BN folding, ONNX parity (classifier, SSD, face), shared SSD post-processing, int8."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnapps.backbones import MobileNetV1
from mnapps.config import BackboneConfig, to_dict
from mnapps.checkpoint import save_checkpoint
from mnapps.export.detection import split_ssd
from mnapps.export.fuse import count_batchnorms, fold_batchnorm, fold_conv_bn
from mnapps.export.postprocess import SSDPostprocessParams, decode_boxes, postprocess_ssd, preprocess_images
from mnapps.heads.ssd import SSDConfig, build_ssd

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from mnapps.export.onnx import (  # noqa: E402
    OrtModel,
    OrtSSD,
    ParityError,
    compare_arrays,
    compare_detections,
    export_onnx,
    read_metadata,
)
from mnapps.export.quantize import int8_bias_correction, output_layer_names, quantize_onnx  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def settle_batchnorm(
    model: nn.Module, make_batch, steps: int = 1, gamma=(0.5, 1.5), beta=(-0.2, 0.2)
) -> nn.Module:
    """Give BN layers real running statistics (a few train-mode passes), then eval mode."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: the statistics of exactly these batches
            nn.init.uniform_(module.weight, *gamma)
            nn.init.uniform_(module.bias, *beta)
    model.train()
    for _ in range(steps):
        model(make_batch())
    return model.eval()


@pytest.fixture(scope="module")
def classifier() -> MobileNetV1:
    torch.manual_seed(0)
    model = MobileNetV1(0.25, 10)
    return settle_batchnorm(model, lambda: torch.rand(8, 3, 64, 64) * 2 - 1)


@pytest.fixture(scope="module")
def ssd():
    torch.manual_seed(0)
    model = build_ssd(SSDConfig(size=128), num_classes=4, backbone_cfg=BackboneConfig(width_mult=0.25))
    settle_batchnorm(model.backbone, lambda: torch.rand(4, 3, 128, 128) * 2 - 1)
    return model.eval()


def test_fold_conv_bn_matches_hand_computed_batchnorm():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(4, eps=1e-3)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.2, 3)
    nn.init.uniform_(bn.weight, -2, 2)
    nn.init.uniform_(bn.bias, -1, 1)
    x = torch.randn(2, 3, 9, 9)
    # BN in eval mode by its definition, in float64: gamma (z - mean) / sqrt(var + eps) + beta.
    z = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    shape = (1, -1, 1, 1)
    expected = (z - bn.running_mean.double().view(shape)) / torch.sqrt(bn.running_var.double().view(shape) + 1e-3)
    expected = expected * bn.weight.double().view(shape) + bn.bias.double().view(shape)
    fold_conv_bn(conv, bn)
    with torch.no_grad():
        assert torch.allclose(conv(x).double(), expected, atol=1e-5)


def test_fold_conv_bn_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="8-channel BatchNorm into a conv with 4 output channels"):
        fold_conv_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(8))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"tf_padding": True}, {"frozen_bn": True}, {"variant": "shallow"}],
    ids=["standard", "tf_padding", "frozen_bn", "shallow"],
)
def test_fold_batchnorm_removes_every_bn_and_keeps_outputs(kwargs):
    torch.manual_seed(1)
    model = MobileNetV1(0.25, 7, **kwargs)
    if not kwargs.get("frozen_bn"):
        settle_batchnorm(model, lambda: torch.rand(4, 3, 64, 64) * 2 - 1)
    model.train()  # folding must not depend on (or change) the mode of the source model
    before = count_batchnorms(model)
    folded = fold_batchnorm(model)
    # Paper Table 1: one BN per convolution, 27 layers (the shallow net drops 5 blocks = 10).
    expected = 17 if kwargs.get("variant") == "shallow" else 27
    assert folded.folded_batchnorms == expected == before
    assert count_batchnorms(folded) == 0
    assert model.training and count_batchnorms(model) == before  # the source is untouched
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        reference = model.eval()(x)
        assert torch.allclose(folded(x), reference, atol=1e-4, rtol=1e-4)


def test_onnx_classifier_parity_and_metadata(classifier, tmp_path):
    path = export_onnx(
        fold_batchnorm(classifier),
        torch.rand(2, 3, 64, 64) * 2 - 1,
        tmp_path / "cls.onnx",
        output_names=("logits",),
        metadata={"task": "classification", "class_names": ["a", "b"]},
    )
    assert read_metadata(path)["task"] == "classification"
    assert read_metadata(path)["class_names"] == '["a", "b"]'
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    model = OrtModel(path)
    x = torch.rand(5, 3, 64, 64) * 2 - 1  # another batch size than exported: the axis is dynamic
    with torch.no_grad():
        reference = classifier(x)
    logits = model(x)["logits"]
    assert logits.shape == (5, 10)
    assert reference.abs().max() > 0.1  # a real signal, not a vanishing one
    report = compare_arrays("cls", reference, logits, atol=1e-4, min_top1_agreement=1.0)
    assert report.passed, report
    assert report.figures["max_abs_diff"] < 1e-4


def test_compare_arrays_fails_on_a_real_difference():
    reference = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    changed = reference.clone()
    changed[1, 0] = 0.0  # row 1 argmax moves from 0 to 1
    report = compare_arrays("x", reference, changed, atol=1e-3, min_top1_agreement=1.0)
    assert not report.passed
    assert report.figures["max_abs_diff"] == pytest.approx(3.0)
    assert report.figures["top1_agreement"] == pytest.approx(0.5)
    with pytest.raises(ParityError, match="FAILED"):
        report.raise_if_failed()


def test_decode_boxes_by_hand():
    # Anchor 20 x 40 centred on (20, 30). dx = 1/10 -> centre x 20 + 0.1 * 20 = 22;
    # dy = -2/10 -> centre y 30 - 0.2 * 40 = 22; dw = 5 log 2 / 5 -> width 40; dh = 0 -> 40.
    anchors = torch.tensor([[10.0, 10.0, 30.0, 50.0]])
    codes = torch.tensor([[1.0, -2.0, 5 * math.log(2.0), 0.0]])
    assert torch.allclose(decode_boxes(codes, anchors), torch.tensor([[2.0, 2.0, 42.0, 42.0]]), atol=1e-5)
    # A wild dw is clamped at log(1000/16) before exp: width 20 * 62.5 = 1250.
    wide = decode_boxes(torch.tensor([[0.0, 0.0, 100.0, 0.0]]), anchors)
    assert wide[0, 2] - wide[0, 0] == pytest.approx(1250.0, rel=1e-5)


def test_postprocess_threshold_nms_and_rescale_by_hand():
    params = SSDPostprocessParams(size=(100, 100), score_thresh=0.3, nms_thresh=0.5, topk_candidates=10, detections_per_img=10)
    anchors = torch.tensor([[10.0, 10.0, 50.0, 50.0], [12.0, 10.0, 52.0, 50.0], [60.0, 60.0, 90.0, 90.0]])
    regression = torch.zeros(1, 3, 4)  # boxes = anchors
    # softmax over [bg, a, b]: anchor 0 -> a 0.8; anchor 1 -> a 0.7 (IoU 0.905 with anchor 0:
    # suppressed); anchor 2 -> b 0.6, a 0.2 (below 0.3: dropped).
    probs = torch.tensor([[[0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.2, 0.2, 0.6]]])
    detections = postprocess_ssd(regression, probs.log(), anchors, params, original_sizes=[(200, 50)])
    result = detections[0]
    assert result["labels"].tolist() == [1, 2]
    assert torch.allclose(result["scores"], torch.tensor([0.8, 0.6]), atol=1e-6)
    # Back to the 200 x 50 (h x w) original: x * 0.5, y * 2.
    assert torch.allclose(result["boxes"], torch.tensor([[5.0, 20.0, 25.0, 100.0], [30.0, 120.0, 45.0, 180.0]]))


def test_postprocess_rejects_mismatched_shapes():
    params = SSDPostprocessParams(size=(64, 64))
    with pytest.raises(ValueError, match="anchor counts disagree"):
        postprocess_ssd(torch.zeros(1, 5, 4), torch.zeros(1, 5, 3), torch.zeros(4, 4), params)


def _images():
    generator = torch.Generator().manual_seed(3)
    return [torch.rand(3, 100, 150, generator=generator), torch.rand(3, 128, 128, generator=generator),
            torch.rand(3, 160, 90, generator=generator)]


@pytest.mark.parametrize("lite", [False, True], ids=["ssd", "ssdlite"])
def test_split_ssd_pipeline_equals_torchvision_eval(lite):
    torch.manual_seed(0)
    model = build_ssd(SSDConfig(size=128, lite=lite), num_classes=4, backbone_cfg=BackboneConfig(width_mult=0.25))
    settle_batchnorm(model.backbone, lambda: torch.rand(4, 3, 128, 128) * 2 - 1)
    model.eval()
    images = _images()
    network, params = split_ssd(model)
    assert params.size == (128, 128) and params.box_coder_weights == (10.0, 10.0, 5.0, 5.0)
    with torch.no_grad():
        expected = model(images)
        batch, sizes = preprocess_images(images, params.size)
        got = postprocess_ssd(*network(batch), params, sizes)
    for ref, out in zip(expected, got):
        assert len(ref["boxes"]) > 0
        assert torch.equal(ref["labels"], out["labels"])
        # Resizing before or after standardising differs in the last float bits only.
        assert torch.allclose(ref["boxes"], out["boxes"], atol=1e-3)
        assert torch.allclose(ref["scores"], out["scores"], atol=1e-5)


@pytest.mark.parametrize("preprocess", ["tf_resize", "tf_pad_resize"])
def test_split_ssd_pipeline_reproduces_tf_preprocessing_and_sigmoid_scores(preprocess):
    torch.manual_seed(0)
    cfg = SSDConfig(size=96, score_activation="sigmoid", preprocess=preprocess, score_threshold=0.05)
    model = build_ssd(cfg, num_classes=3, backbone_cfg=BackboneConfig(width_mult=0.25, tf_padding=True))
    settle_batchnorm(model.backbone, lambda: torch.rand(4, 3, 96, 96) * 2 - 1)
    with torch.no_grad():
        for conv in model.head.classification_head.module_list:
            conv.bias.normal_(0, 2.0)  # spread the sigmoid scores over [0, 1]
    model.eval()
    images = _images()
    network, params = split_ssd(model)
    assert (params.preprocess, params.score_activation, params.size) == (preprocess, "sigmoid", (96, 96))
    assert SSDPostprocessParams.from_json(params.to_json()) == params
    with torch.no_grad():
        expected = model(images)
        batch, sizes = preprocess_images(images, params.size, params.preprocess)
        got = postprocess_ssd(*network(batch), params, sizes)
    # The graph input is the model's own resize of each photo, before its 2x - 1.
    resized, _ = model.transform(images)
    assert torch.allclose(batch * 2 - 1, resized.tensors, atol=1e-6)
    for image, ref, out in zip(images, expected, got):
        assert len(ref["boxes"]) > 0
        assert torch.equal(ref["labels"], out["labels"]) and (ref["labels"] >= 1).all()
        assert torch.allclose(ref["boxes"], out["boxes"], atol=1e-3)
        assert torch.allclose(ref["scores"], out["scores"], atol=1e-5)
        # Sigmoid scores, and boxes inside the picture the network saw (the padded square or the photo).
        height, width = image.shape[-2:]
        side = (max(height, width),) * 2 if preprocess == "tf_pad_resize" else (height, width)
        assert out["boxes"][:, 2].max() <= side[1] and out["boxes"][:, 3].max() <= side[0]
    # Softmax scores of the same logits would differ: the activation is really used.
    softmax = postprocess_ssd(*network(batch), SSDPostprocessParams(**{**params.__dict__, "score_activation": "softmax"}), sizes)
    assert not torch.allclose(softmax[0]["scores"][:5], got[0]["scores"][:5])


def test_postprocess_tf_pad_resize_maps_boxes_to_the_padded_square_by_hand():
    # A 96 input seen from a 200 (h) x 100 (w) photo padded to 200 x 200: x and y both * 200/96;
    # a box reaching into the padding is kept there, clipped to the square (x up to 200).
    params = SSDPostprocessParams(size=(96, 96), score_thresh=0.3, score_activation="sigmoid",
                                  preprocess="tf_pad_resize")
    anchors = torch.tensor([[24.0, 48.0, 72.0, 96.0], [0.0, 0.0, 10.0, 10.0]])
    logits = torch.tensor([[[0.0, 2.0], [0.0, -3.0]]])  # sigmoid: 0.881 and 0.047 (dropped)
    result = postprocess_ssd(torch.zeros(1, 2, 4), logits, anchors, params, original_sizes=[(200, 100)])[0]
    assert result["labels"].tolist() == [1]
    assert result["scores"].tolist() == pytest.approx([1 / (1 + math.exp(-2.0))], abs=1e-6)
    assert torch.allclose(result["boxes"], torch.tensor([[50.0, 100.0, 150.0, 200.0]]), atol=1e-4)
    with pytest.raises(ValueError, match="preprocess must be one of"):
        SSDPostprocessParams(size=(96, 96), preprocess="letterbox")


def test_onnx_ssd_detections_match_torchvision(ssd, tmp_path):
    network, params = split_ssd(ssd)
    path = export_onnx(
        fold_batchnorm(network),
        torch.rand(2, 3, 128, 128),
        tmp_path / "ssd.onnx",
        output_names=("bbox_regression", "cls_logits", "anchors"),
        metadata={"ssd_postprocess": params.to_json()},
    )
    detector = OrtSSD(path)
    assert detector.params == params
    images = _images()
    with torch.no_grad():
        expected = ssd(images)
        batch, _ = preprocess_images(images, params.size)
        regression, logits, anchors = network(batch)
    raw = detector.raw(batch)
    assert torch.allclose(raw[0], regression, atol=1e-4) and torch.allclose(raw[1], logits, atol=1e-4)
    assert torch.equal(raw[2], anchors)
    report = compare_detections("ssd", expected, detector(images), min_agreement=0.95)
    assert report.passed, report
    assert report.figures["detections"] >= 100
    assert report.figures["max_box_diff"] < 1e-2


def test_compare_detections_counts_disagreement():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    reference = [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}]
    relabelled = [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 3])}]
    report = compare_detections("d", reference, relabelled, min_agreement=0.9)
    assert report.figures["agreement"] == pytest.approx(0.5) and not report.passed


@pytest.mark.parametrize("reduce_range, levels", [(False, 127), (True, 64)])
def test_bias_correction_cancels_the_mean_shift_of_rounded_weights(reduce_range, levels):
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 6, 3, padding=1)
    x = torch.rand(16, 8, 12, 12)  # post-ReLU-like inputs: positive mean, so rounding shifts it
    corrections = int8_bias_correction(nn.Sequential(layer), x, reduce_range=reduce_range)
    assert set(corrections) == {"0.bias"}
    # ONNX Runtime's symmetric weights: scale max|w| / 127, or / 64 with its reduced range.
    scale = layer.weight.abs().amax(dim=(1, 2, 3), keepdim=True) / levels
    rounded = torch.round(layer.weight / scale) * scale
    with torch.no_grad():
        float_mean = layer(x).mean(dim=(0, 2, 3))
        plain = F.conv2d(x, rounded, layer.bias, padding=1).mean(dim=(0, 2, 3))
        corrected = F.conv2d(x, rounded, corrections["0.bias"], padding=1).mean(dim=(0, 2, 3))
    assert (plain - float_mean).abs().max() > 1e-5  # there was a shift to correct
    assert torch.allclose(corrected, float_mean, atol=1e-6)


def test_reduced_range_quantizes_dense_convs_to_7_bits_and_depthwise_to_8(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.ReLU6(), nn.Conv2d(8, 16, 1), nn.ReLU6(), nn.Conv2d(16, 4, 1))
    fp32 = export_onnx(net.eval(), torch.rand(2, 3, 16, 16), tmp_path / "n.onnx", output_names=("out",))
    calibration = [torch.rand(2, 3, 16, 16) for _ in range(4)]
    for reduce_range, dense_max in ((False, 127), (True, 64)):
        int8 = quantize_onnx(fp32, tmp_path / f"n{int(reduce_range)}.int8.onnx", calibration, reduce_range=reduce_range)
        graph = onnx.load(str(int8)).graph
        weights = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
        largest = {}
        for name, module in net.named_modules():
            if isinstance(module, nn.Conv2d) and name != "6":  # "6" produces the output: float
                quantized = [w for key, w in weights.items() if key.startswith(f"{name}.weight") and w.dtype == np.int8 and w.ndim == 4]
                assert len(quantized) == 1, (name, list(weights))
                largest[name] = int(np.abs(quantized[0]).max())
        # Per-channel symmetric: the largest weight of a channel maps to the end of the range.
        assert largest == {"0": dense_max, "2": 127, "4": dense_max}
        assert read_metadata(int8)["int8_dense_weight_bits"] == ("7" if reduce_range else "8")


@pytest.mark.slow
def test_int8_export_runs_and_stays_close(tmp_path):
    # A random network whose BN shifts sit around 0 is chaotic: 1% input noise alone turns its
    # logits' cosine to ~0.83, so no quantizer could "stay close" to it. Positive shifts keep the
    # ReLU6s in their linear range, as in a trained network, where int8 is a small perturbation.
    torch.manual_seed(0)
    classifier = settle_batchnorm(
        MobileNetV1(0.25, 10), lambda: torch.rand(8, 3, 64, 64) * 2 - 1, gamma=(0.5, 1.0), beta=(0.5, 1.0)
    )
    fp32 = export_onnx(
        fold_batchnorm(classifier), torch.rand(2, 3, 64, 64) * 2 - 1, tmp_path / "m.onnx",
        output_names=("logits",), metadata={"task": "classification"},
    )
    calibration = torch.rand(16, 3, 64, 64) * 2 - 1
    corrections = int8_bias_correction(fold_batchnorm(classifier), calibration)
    int8 = quantize_onnx(fp32, tmp_path / "m.int8.onnx", list(calibration.split(4)), bias_corrections=corrections)
    graph = onnx.load(str(int8)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") >= 27 and "DequantizeLinear" in ops
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    assert output_layer_names(fp32)  # the classifier head stays float ...
    gemm = next(node for node in graph.node if node.op_type == "Gemm")
    initializers = {init.name for init in graph.initializer}
    assert gemm.input[1] in initializers  # ... its weight is a float initializer, not a DQ output
    assert read_metadata(int8)["precision"] == "int8" and read_metadata(int8)["task"] == "classification"
    x = torch.rand(8, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        reference = classifier(x)
    report = compare_arrays("int8", reference, OrtModel(int8)(x)["logits"], min_cosine=0.99, min_top1_agreement=0.75)
    assert report.passed, report


def _write_pngs(folder, count, size, seed=0):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        # Smooth random images (low-res noise upsampled): closer to photos than white noise.
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"{i:02d}.png")
    return folder


def _export_tool_main():
    module = importlib.import_module("mnapps.cli.export")
    return module.main


@pytest.mark.slow
def test_export_tool_face_checkpoint_end_to_end(tmp_path):
    from mnapps.heads.face_embedding import FaceModelConfig, build_face_embedder

    torch.manual_seed(0)
    cfg = FaceModelConfig(backbone=BackboneConfig(width_mult=0.25), input_size=64, embedding_dim=32)
    model = build_face_embedder(cfg)
    settle_batchnorm(model, lambda: torch.rand(8, 3, 64, 64))
    checkpoint = save_checkpoint(
        {"task": "face", "head": "face_embedding", "config": {"model": to_dict(cfg)}, "model": model.state_dict(),
         "epoch": 0, "metrics": {}},
        tmp_path / "face.pt",
    )
    images = _write_pngs(tmp_path / "faces", 6, 80)
    result = subprocess.run(
        [sys.executable, "tools/export.py", "--checkpoint", str(checkpoint), "--images", str(images),
         "--out", str(tmp_path / "face.onnx")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "parity face fp32 embeddings: OK" in result.stdout
    embeddings = OrtModel(tmp_path / "face.onnx")(torch.rand(3, 3, 64, 64))["embeddings"]
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_export_tool_rejects_unknown_task(tmp_path, capsys):
    checkpoint = save_checkpoint({"task": "segmentation", "config": {}, "model": {}}, tmp_path / "x.pt")
    assert _export_tool_main()(["--checkpoint", str(checkpoint)]) == 2
    error = capsys.readouterr().err
    assert "task='segmentation'" in error and "classification" in error


@pytest.mark.slow
def test_tf_slim_weights_export_and_int8_keep_the_reference_top1(shared_data, tmp_path):
    from mnapps.importers.tf_slim import build_from_tf_slim, read_tf_slim_tensors
    from PIL import Image

    from mnapps.data.image_io import load_rgb
    from mnapps.data.imagefolder import build_cls_transforms
    from mnapps.export.pipeline import find_images

    folder = shared_data / "mobilenet_v1_tfslim"
    model, _ = build_from_tf_slim(read_tf_slim_tensors(folder / "mobilenet_v1_1.0_224_tfslim.npz"), keep_background=True)
    reference = np.load(folder / "reference_tf_outputs.npz")
    inputs, tf_logits = torch.from_numpy(reference["inputs_nchw"]), reference["tf_logits_1001"]
    folded = fold_batchnorm(model)
    fp32 = export_onnx(folded, inputs[:2], tmp_path / "mnv1.onnx", output_names=("logits",))
    logits = OrtModel(fp32)(inputs)["logits"]
    # TensorFlow's own logits, through fold + export + ONNX Runtime.
    assert np.abs(logits - tf_logits).max() < 1e-3
    # Calibrate on other real photos (COCO images and portraits), never the reference ones.
    transform = build_cls_transforms(False, 224)
    files = find_images([shared_data / "coco8" / "images", shared_data / "faces" / "deepface"], 32)
    calibration = torch.stack([transform(Image.fromarray(load_rgb(f))) for f in files])
    corrections = int8_bias_correction(folded, calibration)
    int8 = quantize_onnx(fp32, tmp_path / "mnv1.int8.onnx", list(calibration.split(1)), bias_corrections=corrections)
    int8_logits = OrtModel(int8)(inputs)["logits"]
    assert tf_logits.argmax(1).tolist() == [286, 968, 519, 541]
    # chelsea -> Egyptian cat (TF 286, p=0.93) and coffee -> espresso (968, p=0.99) keep their
    # class. TF itself barely separates the astronaut's (519/574/451: p=0.14/0.11/0.09) and the
    # rocket's (541/683/658: p=0.27/0.20/0.19) best classes; int8 noise may swap those (it does
    # with 7-bit weights on AVX2-only CPUs, not on VNNI ones), but must stay within TF's top 3.
    int8_top1 = int8_logits.argmax(1).tolist()
    assert int8_top1[:2] == [286, 968]
    tf_top3 = np.argsort(-tf_logits, axis=1)[:, :3]
    assert all(int8_top1[i] in tf_top3[i].tolist() for i in (2, 3)), int8_top1
    assert compare_arrays("int8", tf_logits, int8_logits, min_cosine=0.99).passed


def _op_types(graph) -> set[str]:
    """Op types of a graph and of its sub-graphs (NMS sits inside an ``If`` branch)."""
    found = set()
    for node in graph.node:
        found.add(node.op_type)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                found |= _op_types(attribute.g)
    return found


def _faster_rcnn(fpn: bool):
    from mnapps.heads.faster_rcnn import FasterRCNNConfig, build_faster_rcnn, build_faster_rcnn_fpn

    torch.manual_seed(0)
    build = build_faster_rcnn_fpn if fpn else build_faster_rcnn
    model = build(FasterRCNNConfig(min_size=128, max_size=160), num_classes=4,
                  backbone_cfg=BackboneConfig(width_mult=0.25))
    # Made-up BN statistics leave the RoI box head (the trunk's last stage in the paper variant)
    # saturated: most RoIs then get bit-identical features and scores, their order is a tie
    # that any float difference flips, and even BN folding alone changes which boxes survive
    # NMS. Real statistics from train-mode passes (backbone on images, box head on the RoI
    # features it is fed) give every RoI its own score, as a trained model does.
    with torch.no_grad():
        images = [torch.rand(3, 128, 128) for _ in range(4)]
        normalised = model.transform(images)[0].tensors
        settle_batchnorm(model.backbone, lambda: normalised)
        model.eval()
        roi_features = []
        hook = model.roi_heads.box_head.register_forward_hook(lambda module, args, out: roi_features.append(args[0]))
        model(images)
        hook.remove()
        settle_batchnorm(model.roi_heads.box_head, lambda: roi_features[0])
        model.roi_heads.box_predictor.cls_score.weight.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("fpn", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["paper", "fpn"])
def test_onnx_faster_rcnn_whole_model_parity(fpn, tmp_path):
    from mnapps.export.onnx import OrtDetector, export_detector_onnx

    model = _faster_rcnn(fpn)
    images = _images()
    path = export_detector_onnx(fold_batchnorm(model), images[0], tmp_path / "frcnn.onnx", metadata={"head": "x"})
    assert "NonMaxSuppression" in _op_types(onnx.load(str(path)).graph)  # NMS in the graph
    with torch.no_grad():
        expected = [model([image])[0] for image in images]  # images of three different sizes
    report = compare_detections("frcnn", expected, OrtDetector(path)(images), min_agreement=0.95)
    assert report.passed, report
    # boxes come from an untrained regression head: 0.05 px on 100-160 px images
    # is float32 rounding through BN folding and another back-end (measured: 0.003 / 0.014 px)
    assert report.figures["detections"] >= 100 and report.figures["max_box_diff"] < 5e-2
