"""TF-slim weight import: layouts, name mapping, loud failures, and TensorFlow's own logits."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mnapps.backbones import MobileNetV1
from mnapps.importers.tf_slim import build_from_tf_slim, read_tf_slim_tensors, tf_slim_to_state_dict
from mnapps.backbones.trunk import load_backbone_weights
from mnapps.tasks.classification import import_tf_slim_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# Paper Table 1 output channels of the 13 separable blocks (before the width multiplier).
BLOCK_CHANNELS = [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]


def _fake_tf_tensors(alpha: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors under TF-slim's names and layouts for a width-``alpha`` MobileNetV1."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}

    def add_bn(scope: str, channels: int) -> None:
        tensors[f"{scope}/BatchNorm/gamma"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        tensors[f"{scope}/BatchNorm/beta"] = rng.normal(0, 0.1, channels).astype(np.float32)
        tensors[f"{scope}/BatchNorm/moving_mean"] = rng.normal(0, 0.1, channels).astype(np.float32)
        tensors[f"{scope}/BatchNorm/moving_variance"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)

    channels = int(32 * alpha)
    tensors["MobilenetV1/Conv2d_0/weights"] = rng.normal(0, 0.1, (3, 3, 3, channels)).astype(np.float32)
    add_bn("MobilenetV1/Conv2d_0", channels)
    for index, base in enumerate(BLOCK_CHANNELS, start=1):
        out = int(base * alpha)
        scope = f"MobilenetV1/Conv2d_{index}"
        tensors[f"{scope}_depthwise/depthwise_weights"] = rng.normal(0, 0.1, (3, 3, channels, 1)).astype(np.float32)
        add_bn(f"{scope}_depthwise", channels)
        tensors[f"{scope}_pointwise/weights"] = rng.normal(0, 0.1, (1, 1, channels, out)).astype(np.float32)
        add_bn(f"{scope}_pointwise", out)
        channels = out
    tensors["MobilenetV1/Logits/Conv2d_1c_1x1/weights"] = rng.normal(0, 0.1, (1, 1, channels, 1001)).astype(np.float32)
    tensors["MobilenetV1/Logits/Conv2d_1c_1x1/biases"] = rng.normal(0, 0.1, 1001).astype(np.float32)
    return tensors


def test_full_conv_layout_matches_tf_semantics():
    # TF: out[o] = sum_{h,w,i} x[h,w,i] * W[h,w,i,o] over one 3x3 window (HWIO kernel).
    tensors = _fake_tf_tensors(0.25)
    state, _ = tf_slim_to_state_dict(tensors)
    kernel = tensors["MobilenetV1/Conv2d_0/weights"]
    patch = np.random.default_rng(1).normal(size=(3, 3, 3)).astype(np.float32)
    expected = np.einsum("hwi,hwio->o", patch, kernel)
    ours = F.conv2d(torch.from_numpy(patch).permute(2, 0, 1)[None], state["stem.conv.weight"])
    np.testing.assert_allclose(ours[0, :, 0, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_depthwise_layout_matches_tf_semantics():
    # TF depthwise: out[c] = sum_{h,w} x[h,w,c] * W[h,w,c,0], channel by channel.
    tensors = _fake_tf_tensors(0.25)
    state, _ = tf_slim_to_state_dict(tensors)
    kernel = tensors["MobilenetV1/Conv2d_2_depthwise/depthwise_weights"]
    channels = kernel.shape[2]
    patch = np.random.default_rng(2).normal(size=(3, 3, channels)).astype(np.float32)
    expected = np.einsum("hwc,hwc->c", patch, kernel[..., 0])
    weight = state["block2.depthwise.conv.weight"]
    assert weight.shape == (channels, 1, 3, 3)
    ours = F.conv2d(torch.from_numpy(patch).permute(2, 0, 1)[None], weight, groups=channels)
    np.testing.assert_allclose(ours[0, :, 0, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_background_offset_and_bn_mapping():
    tensors = _fake_tf_tensors(0.5)
    state, info = tf_slim_to_state_dict(tensors)
    assert (info.width_mult, info.num_classes, info.background_dropped) == (0.5, 1000, True)
    logits_w = tensors["MobilenetV1/Logits/Conv2d_1c_1x1/weights"][0, 0]
    # ImageNet class i is TF class i + 1: row i of our classifier is TF column i + 1.
    np.testing.assert_array_equal(state["classifier.weight"][7].numpy(), logits_w[:, 8])
    np.testing.assert_array_equal(state["classifier.bias"].numpy(), tensors["MobilenetV1/Logits/Conv2d_1c_1x1/biases"][1:])
    np.testing.assert_array_equal(
        state["block13.pointwise.bn.running_var"].numpy(),
        tensors["MobilenetV1/Conv2d_13_pointwise/BatchNorm/moving_variance"],
    )
    kept, info = tf_slim_to_state_dict(tensors, keep_background=True)
    assert info.num_classes == 1001 and kept["classifier.weight"].shape == (1001, 256 * 2)


def test_built_model_has_tf_settings():
    model, info = build_from_tf_slim(_fake_tf_tensors(0.25))
    assert info.width_mult == 0.25 and model.tf_padding and model.activation == "relu6"
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not model.training


def test_non_weight_tensors_are_skipped_and_reported():
    tensors = _fake_tf_tensors(0.25)
    tensors["global_step"] = np.array(5)
    tensors["MobilenetV1/Conv2d_0/weights/RMSProp"] = np.zeros(1, np.float32)
    tensors["MobilenetV1/Predictions/Reshape/shape"] = np.array([-1, 1001])
    _, info = tf_slim_to_state_dict(tensors)
    assert info.skipped == sorted(["global_step", "MobilenetV1/Conv2d_0/weights/RMSProp", "MobilenetV1/Predictions/Reshape/shape"])


def test_unmapped_tensor_fails_loudly():
    tensors = _fake_tf_tensors(0.25)
    tensors["MobilenetV1/AuxLogits/Conv2d_1b_1x1/weights"] = np.zeros((1, 1, 256, 10), np.float32)
    with pytest.raises(ValueError, match=r"map to no MobileNetV1 parameter: \['MobilenetV1/AuxLogits"):
        tf_slim_to_state_dict(tensors)


def test_missing_tensor_fails_loudly():
    tensors = _fake_tf_tensors(0.25)
    del tensors["MobilenetV1/Conv2d_7_pointwise/BatchNorm/gamma"]
    with pytest.raises(ValueError, match="'MobilenetV1/Conv2d_7_pointwise/BatchNorm/gamma' is missing"):
        tf_slim_to_state_dict(tensors)


def test_wrong_shape_fails_loudly():
    tensors = _fake_tf_tensors(0.25)
    tensors["MobilenetV1/Conv2d_3_depthwise/depthwise_weights"] = np.zeros((3, 3, 40, 1), np.float32)
    with pytest.raises(ValueError, match="block3.depthwise.conv.weight"):
        build_from_tf_slim(tensors)


def test_reading_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_tf_slim_tensors(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="neither an .npz file nor a TensorFlow checkpoint"):
        read_tf_slim_tensors(tmp_path / "model.ckpt")
    tensors = _fake_tf_tensors(0.25)
    np.savez(tmp_path / "w.npz", **tensors)
    assert read_tf_slim_tensors(tmp_path / "w.npz").keys() == tensors.keys()


def test_official_ckpt_is_read_without_tensorflow(tmp_path):
    """The .ckpt prefix goes to mnapps' own TensorFlow checkpoint reader (no TensorFlow import)."""
    fixture = ROOT / "tests" / "fixtures" / "tf_checkpoint"
    tensors = read_tf_slim_tensors(fixture / "small")  # written by TensorFlow, see make_tf_checkpoint.py
    with np.load(fixture / "small_expected.npz", allow_pickle=True) as expected:
        names = [n for n in expected.files if not n.startswith("__")]
        assert set(names) == set(tensors)
        np.testing.assert_array_equal(tensors["FeatureExtractor/MobilenetV1/Conv2d_0/weights"],
                                      expected["FeatureExtractor/MobilenetV1/Conv2d_0/weights"])
    (tmp_path / "mobilenet_v1_1.0_224.ckpt.index").write_bytes(b"")
    with pytest.raises(ValueError, match="too short for a checkpoint index"):
        read_tf_slim_tensors(tmp_path / "mobilenet_v1_1.0_224.ckpt")


# ------------------------------------------------------------------------------------------
# the real release (../shared/data)


@pytest.fixture(scope="module")
def tfslim_dir(shared_data):
    return shared_data / "mobilenet_v1_tfslim"


@pytest.fixture(scope="module")
def reference(tfslim_dir):
    with np.load(tfslim_dir / "reference_tf_outputs.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("keep_background", [True, False])
def test_logits_match_tensorflow(tfslim_dir, reference, keep_background):
    tensors = read_tf_slim_tensors(tfslim_dir / "mobilenet_v1_1.0_224_tfslim.npz")
    model, _ = build_from_tf_slim(tensors, keep_background=keep_background)
    with torch.no_grad():
        logits = model(torch.from_numpy(reference["inputs_nchw"])).numpy()
    expected = reference["tf_logits_1001"] if keep_background else reference["tf_logits_1001"][:, 1:]
    assert np.abs(logits - expected).max() < 1e-4


def test_symmetric_padding_does_not_reproduce_tensorflow(tfslim_dir, reference):
    # The reason TF padding exists: the same weights with padding=1 drift far beyond 1e-4.
    model, _ = build_from_tf_slim(read_tf_slim_tensors(tfslim_dir / "mobilenet_v1_1.0_224_tfslim.npz"))
    symmetric = MobileNetV1(1.0, 1000)
    symmetric.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = symmetric.eval()(torch.from_numpy(reference["inputs_nchw"])).numpy()
    assert np.abs(logits - reference["tf_logits_1001"][:, 1:]).max() > 1e-2


def _tool(name: str):
    module = importlib.import_module(f"mnapps.cli.{name}")
    return module


def test_import_tool_then_classify_photos(tfslim_dir, tmp_path, capsys):
    output = tmp_path / "imagenet.pt"
    assert _tool("import_weights").main([str(tfslim_dir / "mobilenet_v1_1.0_224_tfslim.npz"), "--output", str(output)]) == 0
    assert "1000 classes (background logit dropped)" in capsys.readouterr().out
    photos = tfslim_dir / "photos"
    assert _tool("classify").main([str(photos / "chelsea.png"), str(photos / "coffee.png"), "--checkpoint", str(output)]) == 0
    # Each image prints "IMAGE:" then "  1. <label>   <prob>%  (class <index>)" ... "  5. ...".
    first_labels = re.findall(r"^\s+1\. (.+?)\s+\d+\.\d+%", capsys.readouterr().out, flags=re.M)
    assert len(first_labels) == 2
    assert first_labels[0] in ("Egyptian cat", "tabby")
    assert first_labels[1] == "espresso"


def test_imported_checkpoint_feeds_any_head(tfslim_dir, tmp_path):
    path, _ = import_tf_slim_checkpoint(tfslim_dir / "mobilenet_v1_1.0_224_tfslim.npz", tmp_path / "w.pt")
    trunk = MobileNetV1(1.0, 0, tf_padding=True)
    wrapper = torch.nn.Module()
    wrapper.features = trunk.features_extractor(["block11", "block13"])
    report = load_backbone_weights(wrapper, path, strict=True)
    assert report.loaded == 27 * 5


def test_classify_without_checkpoint_explains_how_to_make_one(tmp_path, capsys, monkeypatch):
    tool = _tool("classify")
    monkeypatch.chdir(tmp_path)  # the default checkpoint is runs/weights/... under the current folder
    image = tmp_path / "x.png"
    assert tool.main([str(image)]) == 2
    err = capsys.readouterr().err
    assert "tools/import_weights.py" in err and "no classification checkpoint" in err
