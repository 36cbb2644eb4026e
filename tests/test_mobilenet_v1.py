"""MobileNetV1 against the paper: Table 1 structure, shapes, features API, variants, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from mnapps.backbones import MobileNetV1, make_divisible
from mnapps.backbones.mobilenet_v1 import Conv2dSame

# Paper Table 1, typed from the paper: (type, stride, filter shape, input size). "dw" filters
# are 3x3xC (one per channel); "pw"/"conv" filters are kh x kw x Cin x Cout. The paper's
# table prints s2 for the last depthwise layer, but its input and output are both 7x7 (and
# every implementation uses stride 1): its input-size column is what is checked.
TABLE_1 = [
    ("conv", 2, (3, 3, 3, 32), 224),
    ("dw", 1, (3, 3, 32), 112),
    ("pw", 1, (1, 1, 32, 64), 112),
    ("dw", 2, (3, 3, 64), 112),
    ("pw", 1, (1, 1, 64, 128), 56),
    ("dw", 1, (3, 3, 128), 56),
    ("pw", 1, (1, 1, 128, 128), 56),
    ("dw", 2, (3, 3, 128), 56),
    ("pw", 1, (1, 1, 128, 256), 28),
    ("dw", 1, (3, 3, 256), 28),
    ("pw", 1, (1, 1, 256, 256), 28),
    ("dw", 2, (3, 3, 256), 28),
    ("pw", 1, (1, 1, 256, 512), 14),
    *[row for _ in range(5) for row in (("dw", 1, (3, 3, 512), 14), ("pw", 1, (1, 1, 512, 512), 14))],
    ("dw", 2, (3, 3, 512), 14),
    ("pw", 1, (1, 1, 512, 1024), 7),
    ("dw", 1, (3, 3, 1024), 7),
    ("pw", 1, (1, 1, 1024, 1024), 7),
]


def _convs_in_order(model: MobileNetV1) -> list[nn.Conv2d]:
    return [m for name in model.stage_names for m in getattr(model, name).modules() if isinstance(m, nn.Conv2d)]


def test_structure_matches_table_1():
    model = MobileNetV1(1.0, 1000).eval()
    convs = _convs_in_order(model)
    assert len(convs) == len(TABLE_1) == 27  # 1 full conv + 13 x (depthwise, pointwise)
    input_sizes = []
    hooks = [c.register_forward_hook(lambda m, inp, out: input_sizes.append(inp[0].shape[-1])) for c in convs]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for hook in hooks:
        hook.remove()
    for conv, size, (kind, stride, shape, table_size) in zip(convs, input_sizes, TABLE_1):
        assert size == table_size
        if kind == "dw":
            channels = shape[2]
            assert conv.groups == conv.in_channels == conv.out_channels == channels
            assert conv.kernel_size == (3, 3)
        else:
            assert conv.groups == 1
            assert (conv.kernel_size[0], conv.kernel_size[1], conv.in_channels, conv.out_channels) == shape
        if kind != "dw" or table_size != 7:  # the table's misprinted s2, see above
            assert conv.stride == (stride, stride)
        assert conv.bias is None  # every conv is followed by BN
    # Each conv is followed by BN and ReLU6 inside its ConvBNAct.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 27
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 27
    # "Avg Pool 7x7 s1 | 7x7x1024" then "FC / s1 | 1024x1000".
    assert isinstance(model.pool, nn.AdaptiveAvgPool2d)
    assert (model.classifier.in_features, model.classifier.out_features) == (1024, 1000)


def test_stage_names_and_relu_option():
    model = MobileNetV1(0.25, 10, activation="relu")
    assert model.stage_names == ["stem", *[f"block{i}" for i in range(1, 14)]]
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 27


@pytest.mark.parametrize(
    "alpha,resolution,last_channels",
    [(1.0, 224, 1024), (0.75, 192, 768), (0.5, 160, 512), (0.25, 128, 256), (0.5, 96, 512)],
)
def test_output_shapes(alpha, resolution, last_channels):
    model = MobileNetV1(alpha, 7).eval()
    x = torch.randn(2, 3, resolution, resolution)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert features.shape == (2, last_channels, resolution // 32, resolution // 32)
    assert logits.shape == (2, 7)
    assert model.num_features == last_channels


def test_alpha_thins_every_layer():
    model = MobileNetV1(0.75, 1000)
    full = MobileNetV1(1.0, 1000)
    for thin, wide in zip(_convs_in_order(model), _convs_in_order(full)):
        assert thin.out_channels == make_divisible(wide.out_channels * 0.75)
    assert _convs_in_order(model)[0].out_channels == 24  # 32 * 0.75


def test_no_classifier_returns_pooled_features():
    model = MobileNetV1(0.25, 0).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 256)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_feature_info_without_forward_matches_forward(alpha):
    model = MobileNetV1(alpha, 0).eval()
    infos = model.feature_info(["block5", "block11", "block13"])
    # block 11 ends the 14x14 (stride 16) stage with 512*alpha channels; block 13 stride 32.
    assert [(i.name, i.channels, i.stride) for i in infos] == [
        ("block5", int(256 * alpha), 8),
        ("block11", int(512 * alpha), 16),
        ("block13", int(1024 * alpha), 32),
    ]
    extractor = model.features_extractor(["block11", "block13"])
    assert extractor.out_channels == {"block11": int(512 * alpha), "block13": int(1024 * alpha)}
    x = torch.randn(1, 3, 160, 128)
    with torch.no_grad():
        out = extractor(x)
        full = model.forward_features(x)
    assert list(out) == ["block11", "block13"]
    for info in infos[1:]:
        assert out[info.name].shape == (1, info.channels, 160 // info.stride, 128 // info.stride)
    torch.testing.assert_close(out["block13"], full)


def test_feature_extractor_stops_at_deepest_requested_stage():
    model = MobileNetV1(0.25, 0)
    extractor = model.features_extractor(["block11"])
    assert [name for name, _ in extractor.body.named_children()][-1] == "block11"
    with pytest.raises(ValueError, match="unknown feature 'block14'"):
        model.feature_info(["block14"])


def test_split_at_shares_modules_and_composes():
    model = MobileNetV1(0.25, 0).eval()
    head, tail = model.split_at("block11")
    assert [n for n, _ in head.named_children()][-1] == "block11"
    assert [n for n, _ in tail.named_children()] == ["block12", "block13"]
    assert tail.block12 is model.block12  # shared, not copied: training one trains the other
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(tail(head(x)), model.forward_features(x))
    with pytest.raises(ValueError, match="last stage"):
        model.split_at("block13")


def test_frozen_bn():
    reference = MobileNetV1(0.25, 5)
    # Give the BNs non-trivial statistics so the frozen copy has something to preserve.
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    reference.eval()
    frozen = MobileNetV1(0.25, 5)
    frozen.load_state_dict(reference.state_dict())
    frozen.freeze_bn()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) == 27
    # Frozen BN has no trainable parameters: only convs and the classifier remain.
    assert all(p.dim() > 1 or name.startswith("classifier") for name, p in frozen.named_parameters())
    x = torch.randn(2, 3, 64, 64)
    frozen.train()  # even in train mode the statistics stay fixed
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), reference(x), rtol=1e-4, atol=1e-5)
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in MobileNetV1(0.25, 0, frozen_bn=True).modules()) == 27


def test_conv_variant_replaces_separable_blocks():
    model = MobileNetV1(1.0, 1000, variant="conv")
    convs = _convs_in_order(model)
    assert len(convs) == 14  # stem + 13 full 3x3 convolutions
    assert all(c.kernel_size == (3, 3) and c.groups == 1 for c in convs)
    assert (convs[1].in_channels, convs[1].out_channels) == (32, 64)


def test_shallow_variant_drops_the_five_14x14_blocks():
    model = MobileNetV1(1.0, 1000, variant="shallow").eval()
    assert model.stage_names == ["stem", *[f"block{i}" for i in (1, 2, 3, 4, 5, 6, 12, 13)]]
    assert model.feature_info(["block6"])[0].stride == 16
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 3, 224, 224)).shape == (1, 1024, 7, 7)


@pytest.mark.parametrize(
    "size,kernel,stride,expected",
    [
        # total = max((ceil(n/s) - 1) * s + k - n, 0), the extra pixel at the bottom/right
        (224, 3, 2, (0, 1)),  # (112-1)*2 + 3 - 224 = 1
        (112, 3, 2, (0, 1)),
        (7, 3, 2, (1, 1)),  # (4-1)*2 + 3 - 7 = 2
        (225, 3, 2, (1, 1)),  # (113-1)*2 + 3 - 225 = 2
        (56, 3, 1, (1, 1)),  # stride 1: (56-1) + 3 - 56 = 2
        (56, 1, 1, (0, 0)),
    ],
)
def test_tf_same_padding_amounts(size, kernel, stride, expected):
    assert Conv2dSame._same_pad(size, kernel, stride, 1) == expected


def test_tf_same_padding_pads_bottom_right_on_stride_2():
    conv = Conv2dSame(1, 1, 3, 2, bias=False)
    nn.init.ones_(conv.weight)
    out = conv(torch.ones(1, 1, 4, 4))
    # Windows rows/cols {0,1,2} and {2,3,pad}: 3x3=9, 3x2=6, 2x3=6, 2x2=4 ones.
    assert out[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]
    symmetric = F.conv2d(torch.ones(1, 1, 4, 4), conv.weight, stride=2, padding=1)
    assert symmetric[0, 0].tolist() == [[4.0, 6.0], [6.0, 9.0]]  # what padding=1 would give


def test_tf_padding_model_output_shapes():
    model = MobileNetV1(0.25, 3, tf_padding=True).eval()
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 3, 225, 200)).shape == (1, 256, 8, 7)


@pytest.mark.parametrize("alpha", [0, -0.5])
def test_bad_width_mult(alpha):
    with pytest.raises(ValueError, match="width_mult must be > 0"):
        MobileNetV1(alpha)


def test_bad_variant_and_activation():
    with pytest.raises(ValueError, match="unknown variant 'deep'"):
        MobileNetV1(variant="deep")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        MobileNetV1(activation="gelu")


def test_too_small_input():
    model = MobileNetV1(0.25, 3)
    with pytest.raises(ValueError, match=r"too small.*32x32"):
        model(torch.zeros(1, 3, 31, 64))
    with pytest.raises(ValueError, match="too small"):
        model.features_extractor(["block3"])(torch.zeros(1, 3, 16, 16))


def test_wrong_channel_count_and_rank():
    model = MobileNetV1(0.25, 3)
    with pytest.raises(ValueError, match="3 input channels, got 1"):
        model(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="got 4"):
        model(torch.zeros(2, 4, 64, 64))
    with pytest.raises(ValueError, match=r"Tensor\[N, C, H, W\]"):
        model(torch.zeros(3, 64, 64))
