"""TF Object Detection API SSD-MobileNetV1 import: a generated miniature against an independent TF-style
forward pass (runs everywhere), and face-api.js's real detector against its own outputs (../shared)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from mnapps.importers.tfjs import read_tfjs_weights
from mnapps.config import BackboneConfig
from mnapps.data.image_io import load_rgb
from mnapps.heads.ssd import SigmoidSSD, SSDConfig, TFResizeTransform, build_ssd, tf_pad_resize, tf_resize_bilinear
from mnapps.importers.tf_od_api import (
    decode_all_anchors,
    import_tf_od_api_ssd,
    normalized_anchors,
    source_anchor_index,
)
from test_tfjs import write_tfjs

EPS = 1e-3
# MobileNetV1 (paper Table 1): output channels and depthwise stride of the 13 separable blocks.
BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
          (512, 1), (1024, 2), (1024, 1)]
EXTRAS = [(256, 1, 1), (512, 3, 2), (128, 1, 1), (256, 3, 2), (128, 1, 1), (256, 3, 2), (64, 1, 1), (128, 3, 2)]


# ------------------------------------------------------------------------------------------
# an independent TF-semantics reference (float64), written from the TF OD API's definitions


def tf_legacy_resize_loops(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF's resize_bilinear (align_corners=False, half_pixel_centers=False), pixel by pixel."""
    in_h, in_w = image.shape[:2]
    out = np.zeros((out_h, out_w) + image.shape[2:])
    for y in range(out_h):
        sy = y * in_h / out_h
        y0, y1 = math.floor(sy), min(math.ceil(sy), in_h - 1)
        for x in range(out_w):
            sx = x * in_w / out_w
            x0, x1 = math.floor(sx), min(math.ceil(sx), in_w - 1)
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * (sx - x0)
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * (sx - x0)
            out[y, x] = top + (bottom - top) * (sy - y0)
    return out


def tf_anchor_specs(interpolated_after_square: bool) -> list[list[tuple[float, float]]]:
    """create_ssd_anchors(num_layers=6, min 0.2, max 0.95, ratios 1, 2, .5, 3, .3333, reduced lowest layer)."""
    scales = [0.2 + 0.75 * k / 5 for k in range(6)] + [1.0]
    specs = [[(0.1, 1.0), (0.2, 2.0), (0.2, 0.5)]]
    for k in range(1, 6):
        layer = []
        for ratio in (1.0, 2.0, 0.5, 3.0, 0.3333):
            layer.append((scales[k], ratio))
            if ratio == 1.0 and interpolated_after_square:
                layer.append((math.sqrt(scales[k] * scales[k + 1]), 1.0))
        if not interpolated_after_square:
            layer.append((math.sqrt(scales[k] * scales[k + 1]), 1.0))
        specs.append(layer)
    return specs


def tf_anchors(grids: list[int], interpolated_after_square: bool) -> np.ndarray:
    boxes = []
    for grid, layer in zip(grids, tf_anchor_specs(interpolated_after_square)):
        for y in range(grid):
            for x in range(grid):
                for scale, ratio in layer:
                    cy, cx = (y + 0.5) / grid, (x + 0.5) / grid
                    h, w = scale / math.sqrt(ratio), scale * math.sqrt(ratio)
                    boxes.append([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2])
    return np.array(boxes)


def tf_conv(x: torch.Tensor, kernel: np.ndarray, stride: int, depthwise: bool = False) -> torch.Tensor:
    """NCHW float64 convolution with a TF kernel (HWIO, or [kh, kw, C, 1]) and "SAME" padding."""
    k = torch.from_numpy(kernel.astype(np.float64))
    weight = k.permute(2, 3, 0, 1) if depthwise else k.permute(3, 2, 0, 1)
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad order: width first
        total = max((math.ceil(size / stride) - 1) * stride + kernel.shape[0] - size, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), weight, stride=stride, groups=x.shape[1] if depthwise else 1)


def tf_batch_norm(x: torch.Tensor, p: dict[str, np.ndarray]) -> torch.Tensor:
    view = lambda a: torch.from_numpy(a.astype(np.float64))[None, :, None, None]  # noqa: E731
    gamma = view(p["gamma"]) if "gamma" in p else 1.0
    return (x - view(p["moving_mean"])) / torch.sqrt(view(p["moving_variance"]) + EPS) * gamma + view(p["beta"])


def tf_reference(params: dict, image: torch.Tensor, interpolated_after_square: bool):
    """The TF OD API's ssd_mobilenet_v1 forward + box decoding on ``image [1, 3, S, S]`` in [-1, 1].

    Returns TF-order boxes (ymin, xmin, ymax, xmax, normalised) and sigmoid scores per anchor.
    """
    relu6 = lambda t: t.clamp(0, 6)  # noqa: E731
    x = relu6(tf_batch_norm(tf_conv(image.double(), params["conv0"]["w"], 2), params["conv0"]))
    maps = []
    for index, (_, stride) in enumerate(BLOCKS, start=1):
        dw, pw = params[f"dw{index}"], params[f"pw{index}"]
        x = relu6(tf_batch_norm(tf_conv(x, dw["w"], stride, depthwise=True), dw))
        x = relu6(tf_batch_norm(tf_conv(x, pw["w"], 1), pw))
        if index in (11, 13):
            maps.append(x)
    for j, (_, _, stride) in enumerate(EXTRAS):
        x = relu6(tf_batch_norm(tf_conv(x, params[f"extra{j}"]["w"], stride), params[f"extra{j}"]))
        if j % 2:
            maps.append(x)
    deltas, logits = [], []
    for i, feature in enumerate(maps):
        for kind, out in (("box", deltas), ("cls", logits)):
            p = params[f"{kind}{i}"]
            y = tf_conv(feature, p["w"], 1) + torch.from_numpy(p["b"].astype(np.float64))[None, :, None, None]
            per_anchor = 4 if kind == "box" else params["num_logits"]
            out.append(y.permute(0, 2, 3, 1).reshape(-1, per_anchor))  # [H, W, A * k] -> [H * W * A, k]
    anchors = torch.from_numpy(tf_anchors([m.shape[-1] for m in maps], interpolated_after_square))
    t = torch.cat(deltas)  # (ty, tx, th, tw), box coder scales (10, 10, 5, 5)
    ha, wa = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cy, cx = anchors[:, 0] + ha / 2 + t[:, 0] / 10 * ha, anchors[:, 1] + wa / 2 + t[:, 1] / 10 * wa
    h, w = torch.exp(t[:, 2] / 5) * ha, torch.exp(t[:, 3] / 5) * wa
    boxes = torch.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], dim=1)
    return boxes, torch.sigmoid(torch.cat(logits)), anchors


# ------------------------------------------------------------------------------------------
# a random miniature TF model (width 0.25) in both layouts


def random_params(rng: np.random.Generator, num_logits: int = 3, alpha: float = 0.25) -> dict:
    def conv(kh: int, cin: int, cout: int, depthwise: bool = False) -> dict:
        shape = (kh, kh, cin, 1) if depthwise else (kh, kh, cin, cout)
        fan_in = kh * kh * (1 if depthwise else cin)
        return {"w": rng.normal(0, math.sqrt(2 / fan_in), shape).astype(np.float32),
                "gamma": rng.uniform(0.5, 1.5, cout).astype(np.float32),
                "beta": rng.normal(0, 0.2, cout).astype(np.float32),
                "moving_mean": rng.normal(0, 0.2, cout).astype(np.float32),
                "moving_variance": rng.uniform(0.5, 2.0, cout).astype(np.float32)}

    params = {"num_logits": num_logits}
    channels = int(32 * alpha)
    params["conv0"] = conv(3, 3, channels)
    params["conv0"]["gamma"][:] = 1  # written without gamma below, as TF's batch_norm { scale: false }
    for index, (out, _) in enumerate(BLOCKS, start=1):
        params[f"dw{index}"] = conv(3, channels, channels, depthwise=True)
        params[f"pw{index}"] = conv(1, channels, int(out * alpha))
        channels = int(out * alpha)
        if index == 11:
            map_channels = [channels]
    map_channels.append(channels)
    for j, (depth, kh, _) in enumerate(EXTRAS):
        params[f"extra{j}"] = conv(kh, channels, int(depth * alpha))
        channels = int(depth * alpha)
        if j % 2:
            map_channels.append(channels)
    for i, (c, anchors) in enumerate(zip(map_channels, [3, 6, 6, 6, 6, 6])):
        params[f"box{i}"] = {"w": rng.normal(0, 0.05, (1, 1, c, anchors * 4)).astype(np.float32),
                             "b": rng.normal(0, 0.1, anchors * 4).astype(np.float32)}
        params[f"cls{i}"] = {"w": rng.normal(0, 0.05, (1, 1, c, anchors * num_logits)).astype(np.float32),
                             "b": rng.normal(0, 0.5, anchors * num_logits).astype(np.float32)}
    return params


def od_api_tensors(params: dict, drop_gamma: str = "conv0") -> dict[str, np.ndarray]:
    """The TF OD API checkpoint names (BN everywhere; one conv without gamma, as ``scale: false``)."""
    tensors = {"global_step": np.int64(200000)}  # training state that must be skipped

    def put(scope: str, p: dict, key: str) -> None:
        tensors[f"{scope}/{'depthwise_weights' if key.startswith('dw') else 'weights'}"] = p["w"]
        for name in ("gamma", "beta", "moving_mean", "moving_variance"):
            if not (name == "gamma" and key == drop_gamma):
                tensors[f"{scope}/BatchNorm/{name}"] = p[name]

    put("FeatureExtractor/MobilenetV1/Conv2d_0", params["conv0"], "conv0")
    for index in range(1, 14):
        put(f"FeatureExtractor/MobilenetV1/Conv2d_{index}_depthwise", params[f"dw{index}"], f"dw{index}")
        put(f"FeatureExtractor/MobilenetV1/Conv2d_{index}_pointwise", params[f"pw{index}"], f"pw{index}")
    for j, (depth, kh, _) in enumerate(EXTRAS):
        layer, part = j // 2 + 2, ("1_Conv2d_{}_1x1_{}" if kh == 1 else "2_Conv2d_{}_3x3_s2_{}")
        name = f"FeatureExtractor/MobilenetV1/Conv2d_13_pointwise_{part.format(layer, int(depth * 0.25))}"
        put(name, params[f"extra{j}"], f"extra{j}")
    for i in range(6):
        for kind, scope in (("box", "BoxEncodingPredictor"), ("cls", "ClassPredictor")):
            tensors[f"BoxPredictor_{i}/{scope}/weights"] = params[f"{kind}{i}"]["w"]
            tensors[f"BoxPredictor_{i}/{scope}/biases"] = params[f"{kind}{i}"]["b"]
    return tensors


def fold(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """BN folded into a full/pointwise conv as face-api.js's export stores it: (kernel, offset)."""
    gamma = p.get("gamma", np.ones_like(p["beta"])).astype(np.float64)
    factor = gamma / np.sqrt(p["moving_variance"].astype(np.float64) + EPS)
    return (p["w"] * factor).astype(np.float32), (p["beta"] - p["moving_mean"] * factor).astype(np.float32)


def faceapi_entries(params: dict, size: int, anchors: np.ndarray) -> tuple[list[dict], dict]:
    """face-api.js's layout as TF.js entries (depthwise weights uint8-quantized), and the params
    those entries really hold (folded convs; the quantized kernels' decoded values)."""
    held = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
    entries = []

    def put(name: str, array: np.ndarray, quantize: bool = False) -> np.ndarray:
        if not quantize:
            entries.append({"name": name, "shape": list(array.shape), "dtype": "float32",
                            "data": array.astype("<f4").tobytes()})
            return array
        low, scale = float(array.min()), float(array.max() - array.min()) / 255
        codes = np.clip(np.round((array - low) / scale), 0, 255).astype(np.uint8)
        entries.append({"name": name, "shape": list(array.shape), "dtype": "float32", "data": codes.tobytes(),
                        "quantization": {"dtype": "uint8", "scale": scale, "min": low}})
        return (codes.astype(np.float64) * scale + low).astype(np.float32)

    def folded(scope: str, key: str) -> None:
        kernel, offset = fold(params[key])
        held[key] = {"w": put(f"{scope}/weights", kernel), "beta": put(f"{scope}/convolution_bn_offset", offset),
                     "moving_mean": np.zeros_like(offset), "moving_variance": np.full_like(offset, 1 - EPS)}

    folded("MobilenetV1/Conv2d_0_pointwise", "conv0")
    for index in range(1, 14):
        scope, p = f"MobilenetV1/Conv2d_{index}_depthwise", params[f"dw{index}"]
        held[f"dw{index}"]["w"] = put(f"{scope}/depthwise_weights", p["w"], quantize=True)
        for name in ("gamma", "beta", "moving_mean", "moving_variance"):
            put(f"{scope}/BatchNorm/{name}", p[name])
        folded(f"MobilenetV1/Conv2d_{index}_pointwise", f"pw{index}")
    for j in range(len(EXTRAS)):
        folded(f"Prediction/Conv2d_{j}_pointwise", f"extra{j}")
    for i in range(6):
        for kind, scope in (("box", "BoxEncodingPredictor"), ("cls", "ClassPredictor")):
            put(f"Prediction/BoxPredictor_{i}/{scope}/weights", params[f"{kind}{i}"]["w"])
            put(f"Prediction/BoxPredictor_{i}/{scope}/biases", params[f"{kind}{i}"]["b"])
    entries.append({"name": "Preprocessor/ResizeImage/size", "shape": [2], "dtype": "int32",
                    "data": np.array([size, size], "<i4").tobytes()})
    entries.append({"name": "Prediction/BoxPredictor_0/stack_1/2", "shape": [], "dtype": "int32",
                    "data": bytes([3]), "quantization": {"dtype": "uint8", "scale": 1, "min": 0}})
    put("Output/extra_dim", anchors.astype(np.float32)[None])
    return entries, held


SIZE = 96  # maps 6, 3, 2, 1, 1, 1


def _match_by_coordinates(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """For each of our anchors, the index of the reference anchor with the same coordinates."""
    distance = np.abs(ours[:, None, :] - theirs[None, :, :]).max(-1)
    index = distance.argmin(1)
    assert distance[np.arange(len(ours)), index].max() < 1e-6
    assert len(set(index.tolist())) == len(ours)
    return index


def _check_against_reference(model, params, image, after_square, expect_index):
    ref_boxes, ref_scores, ref_anchors = tf_reference(params, image, after_square)
    ours_anchors = normalized_anchors(model, SIZE).numpy()
    index = _match_by_coordinates(ours_anchors, ref_anchors.numpy())
    np.testing.assert_array_equal(index, expect_index)  # the importer's own idea of the order agrees
    boxes, scores = decode_all_anchors(model, image.float())
    np.testing.assert_allclose(boxes[0].numpy(), ref_boxes[index].numpy(), atol=2e-5, rtol=0)
    np.testing.assert_allclose(scores[0].numpy(), ref_scores[index].numpy(), atol=2e-5, rtol=0)
    assert ref_scores.std() > 0.05 and ref_boxes.std() > 0.05  # a live network, not a constant one


def test_tf_od_api_layout_reproduces_the_tf_forward(tmp_path):
    params = random_params(np.random.default_rng(0))
    path = tmp_path / "ssd.npz"
    np.savez(path, **od_api_tensors(params))
    imported = import_tf_od_api_ssd(path, size=SIZE)
    assert imported.layout == "tf_od_api" and imported.interpolated_anchor == "last"
    assert imported.num_classes == 3 and imported.skipped == ["global_step"]
    assert imported.backbone == BackboneConfig(width_mult=0.25, activation="relu6", bn_eps=EPS, tf_padding=True)
    assert imported.ssd.preprocess == "tf_resize" and imported.ssd.score_activation == "sigmoid"
    assert isinstance(imported.model, SigmoidSSD) and not imported.model.training
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    _check_against_reference(imported.model, params, image, False, source_anchor_index(imported.ssd, "last"))
    # the recorded configs rebuild the same model
    rebuilt = build_ssd(imported.ssd, num_classes=imported.num_classes, backbone_cfg=imported.backbone)
    rebuilt.load_state_dict(imported.model.state_dict())
    np.testing.assert_array_equal(decode_all_anchors(rebuilt.eval(), image)[1], decode_all_anchors(imported.model, image)[1])


def test_faceapi_tfjs_layout_reproduces_the_tf_forward(tmp_path):
    params = random_params(np.random.default_rng(2))
    grids = [6, 3, 2, 1, 1, 1]
    entries, held = faceapi_entries(params, SIZE, tf_anchors(grids, interpolated_after_square=True))
    write_tfjs(tmp_path / "faceapi", entries, manifest="ssd_mobilenetv1_model-weights_manifest.json")
    imported = import_tf_od_api_ssd(tmp_path / "faceapi")
    assert imported.layout == "faceapi" and imported.ssd.size == SIZE
    assert imported.interpolated_anchor == "after_square"  # read from the stored anchors
    assert imported.ssd.preprocess == "tf_pad_resize"
    assert "Output/extra_dim" in imported.skipped and "Prediction/BoxPredictor_0/stack_1/2" in imported.skipped
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    _check_against_reference(imported.model, held, image, True, source_anchor_index(imported.ssd, "after_square"))


def test_unknown_and_missing_tensors_are_named():
    params = random_params(np.random.default_rng(4))
    tensors = od_api_tensors(params)
    with pytest.raises(ValueError, match=r"map to no SSD parameter: \['Mystery/kernel'\]"):
        import_tf_od_api_ssd({**tensors, "Mystery/kernel": np.zeros(3)}, size=SIZE)
    del tensors["FeatureExtractor/MobilenetV1/Conv2d_4_depthwise/BatchNorm/moving_mean"]
    with pytest.raises(ValueError, match=r"Conv2d_4_depthwise/BatchNorm/moving_mean'\] are missing"):
        import_tf_od_api_ssd(tensors, size=SIZE)
    with pytest.raises(ValueError, match=r"anchors stored in .* do not match"):
        import_tf_od_api_ssd({**od_api_tensors(params), "Output/extra_dim": np.zeros((1, 10, 4))}, size=SIZE)


# ------------------------------------------------------------------------------------------
# TF preprocessing and sigmoid scores (mnapps.heads.ssd)


def test_tf_resize_matches_tf_definition():
    # By hand: [0, 10] -> 4 samples at src = 0, 0.5, 1, 1.5 (clamped): 0, 5, 10, 10.
    ramp = torch.tensor([[0.0, 10.0]])
    np.testing.assert_allclose(tf_resize_bilinear(ramp, (1, 4)).numpy(), [[0, 5, 10, 10]])
    image = np.random.default_rng(5).uniform(0, 255, (3, 13, 17))
    for out in ((5, 7), (29, 31), (13, 40)):
        ours = tf_resize_bilinear(torch.from_numpy(image), out).numpy()
        want = tf_legacy_resize_loops(image.transpose(1, 2, 0), *out).transpose(2, 0, 1)
        np.testing.assert_allclose(ours, want, rtol=0, atol=1e-9)


def test_tf_resize_transform_maps_boxes_both_ways():
    image = torch.rand(3, 60, 90)
    for pad, seen in ((True, (90, 90)), (False, (60, 90))):
        transform = TFResizeTransform(45, pad_to_square=pad)
        targets = [{"boxes": torch.tensor([[9.0, 6.0, 45.0, 30.0]]), "labels": torch.tensor([1])}]
        batch, scaled = transform([image], targets)
        assert batch.tensors.shape == (1, 3, 45, 45) and batch.image_sizes == [(45, 45)]
        sy, sx = 45 / seen[0], 45 / seen[1]
        np.testing.assert_allclose(scaled[0]["boxes"].numpy(), [[9 * sx, 6 * sy, 45 * sx, 30 * sy]], rtol=1e-6)
        expected = (tf_pad_resize(image, 45)[0] if pad else tf_resize_bilinear(image, (45, 45))) * 2 - 1
        torch.testing.assert_close(batch.tensors[0], expected)
        back = transform.postprocess([{"boxes": scaled[0]["boxes"].clone()}], [(45, 45)], [(60, 90)])
        np.testing.assert_allclose(back[0]["boxes"].numpy(), [[9, 6, 45, 30]], rtol=1e-5)
    # Padding is zeros at the bottom: the last 30 of 90 rows of the square hold nothing.
    resized, side = tf_pad_resize(torch.ones(3, 60, 90), 90)
    assert side == 90 and resized[:, :60].min() == 1 and resized[:, 60:].max() == 0


def _tiny_sigmoid_ssd(**overrides) -> SigmoidSSD:
    cfg = SSDConfig(size=64, score_activation="sigmoid", preprocess="tf_resize", **overrides)
    torch.manual_seed(0)
    return build_ssd(cfg, num_classes=3, backbone_cfg=BackboneConfig(width_mult=0.25, tf_padding=True))


def test_sigmoid_ssd_reports_the_best_sigmoid_score():
    model = _tiny_sigmoid_ssd(score_threshold=0.0).eval()
    with torch.no_grad():
        for conv in model.head.classification_head.module_list:
            conv.bias.normal_(0, 2.0)  # spread the scores
        image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2))
        batch, _ = model.transform([image])
        logits = model.head(list(model.backbone(batch.tensors).values()))["cls_logits"][0]
        detections = model([image])[0]
    best = torch.sigmoid(logits[:, 1:])  # background (logit 0) is never reported
    assert detections["scores"][0].item() == pytest.approx(best.max().item(), abs=1e-6)
    assert detections["labels"][0].item() == 1 + int(best.max(0).values.argmax())
    assert (detections["scores"] <= 1).all() and len(detections["scores"]) > 0


def test_sigmoid_ssd_classification_loss_by_hand():
    model = _tiny_sigmoid_ssd(neg_pos_ratio=1.0)
    logits = torch.tensor([[[0.5, -1.0, 2.0], [3.0, 1.0, -2.0], [0.0, 0.5, 0.0], [-1.0, -2.0, 0.3]]])
    head_outputs = {"cls_logits": logits, "bbox_regression": torch.zeros(1, 4, 4)}
    anchors = [torch.tensor([[0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 30, 30], [10, 10, 40, 40]], dtype=torch.float)]
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([2])}]
    losses = model.compute_loss(targets, head_outputs, anchors, [torch.tensor([0, -1, -1, -1])])

    def bce(logit: float, target: float) -> float:  # -[t log s + (1 - t) log(1 - s)], s = sigmoid(logit)
        s = 1 / (1 + math.exp(-logit))
        return -(target * math.log(s) + (1 - target) * math.log(1 - s))

    per_anchor = [sum(bce(l, float(c == label)) for c, l in enumerate(row))
                  for row, label in zip(logits[0].tolist(), [2, 0, 0, 0])]
    # One positive; with neg_pos_ratio 1 only the hardest negative (anchor 2: 2.36 > 2.29 > 1.49) counts.
    assert sorted(per_anchor[1:]) == [per_anchor[1], per_anchor[3], per_anchor[2]]
    assert losses["classification"].item() == pytest.approx(per_anchor[0] + per_anchor[2], rel=1e-6)


def test_sigmoid_ssd_trains_with_tf_preprocessing():
    model = _tiny_sigmoid_ssd().train()
    images = [torch.rand(3, 50, 70), torch.rand(3, 64, 40)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model(images, targets)
    assert set(losses) == {"bbox_regression", "classification"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert sum(conv.weight.grad.abs().sum() for conv in model.head.classification_head.module_list) > 0


# ------------------------------------------------------------------------------------------
# face-api.js's real detector (../shared/data/faceapi_ssd_mobilenetv1)


@pytest.fixture(scope="module")
def faceapi(shared_data):
    folder = shared_data / "faceapi_ssd_mobilenetv1"
    imported = import_tf_od_api_ssd(folder)
    reference = dict(np.load(folder / "reference_faceapi_outputs.npz"))
    detections = json.loads((folder / "reference_detections.json").read_text())
    return imported, reference, detections, folder


def test_faceapi_import_settings(faceapi):
    imported, *_ = faceapi
    assert imported.layout == "faceapi" and imported.interpolated_anchor == "after_square"
    assert imported.num_classes == 3 and imported.ssd.size == 512
    assert imported.ssd.extra_depths == (512, 256, 256, 128)
    assert imported.backbone.width_mult == 1.0


def test_faceapi_anchors_equal_the_files(faceapi):
    imported, _, _, folder = faceapi
    stored = read_tfjs_weights(folder)["Output/extra_dim"][0]
    ours = normalized_anchors(imported.model, 512).numpy()
    index = source_anchor_index(imported.ssd, imported.interpolated_anchor)
    assert ours.shape == stored.shape == (5118, 4)
    print(f"\nanchors vs Output/extra_dim: max abs error {np.abs(ours - stored[index]).max():.2e}")  # pytest -s
    assert np.abs(ours - stored[index]).max() < 1e-5
    assert sorted(index.tolist()) == list(range(5118))


def _input512(reference: dict, name: str) -> np.ndarray:
    array = reference[f"input512_{name}"]
    if array.max() < 1:
        # The reference file stores astronaut's input (512 x 512: no resize, so tfjs kept the
        # decoded int32 pixels) as int32 bit patterns labelled float32; read the bits back.
        array = array.view(np.int32).astype(np.float32)
    return array


@pytest.mark.parametrize("name", ["multiface", "obama_and_biden", "astronaut"])
def test_faceapi_every_anchor_matches_on_its_exact_input(faceapi, name):
    imported, reference, detections, folder = faceapi
    pixels = _input512(reference, name)
    assert pixels.min() >= 0 and pixels.max() == 255
    batch = torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1
    boxes, scores = decode_all_anchors(imported.model, batch)
    index = source_anchor_index(imported.ssd, imported.interpolated_anchor)
    box_error = np.abs(boxes[0].numpy() - reference[f"boxes_{name}"][index]).max()
    score_error = np.abs(scores[0, :, 1].numpy() - reference[f"scores_{name}"][index]).max()
    print(f"\n{name}: 5118 anchors, max abs error boxes {box_error:.2e}, scores {score_error:.2e}")  # pytest -s
    assert box_error < 1e-4 and score_error < 1e-4, (box_error, score_error)
    # mnapps' own preprocessing of the photo gives that input.
    photo = load_rgb(folder.parent / detections[name]["photo"], apply_exif=False)
    ours, _ = tf_pad_resize(torch.from_numpy(photo).permute(2, 0, 1).double(), 512)
    assert np.abs(ours.permute(1, 2, 0).numpy() - pixels).max() < 1e-3


@pytest.mark.slow
def test_faceapi_final_detections_on_15_photos(faceapi):
    imported, _, detections, folder = faceapi
    model = imported.model
    model.score_thresh, model.nms_thresh, model.detections_per_img = 0.3, 0.5, 100  # face-api's settings
    assert len(detections) == 15
    for name, entry in detections.items():
        photo = load_rgb(folder.parent / entry["photo"], apply_exif=False)
        assert list(photo.shape[:2]) == entry["height_width"]
        with torch.no_grad():
            found = model([torch.from_numpy(photo).permute(2, 0, 1).float() / 255])[0]
        want = torch.tensor(entry["detections"], dtype=torch.float64).reshape(-1, 5)
        assert len(found["boxes"]) == len(want), name
        if not len(want):
            print(f"\n{name}: no face, none found")  # pytest -s
            continue
        want_boxes = torch.cat([want[:, 1:3], want[:, 1:3] + want[:, 3:5]], dim=1)  # xywh -> xyxy
        iou = box_iou(found["boxes"].double(), want_boxes)
        best = iou.max(dim=0)
        assert best.indices.unique().numel() == len(want), name  # one detection per reference face
        assert best.values.min() >= 0.98, (name, best.values.min().item())
        score_error = (found["scores"][best.indices].double() - want[:, 0]).abs().max()
        print(f"\n{name}: {len(want)} face(s), worst IoU {best.values.min():.4f}, worst score error "
              f"{score_error:.4f}")  # pytest -s
        assert score_error <= 0.01, (name, score_error.item())
        assert (found["labels"] == 1).all()
