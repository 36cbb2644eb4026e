"""The fast inference path (BN folded, channels_last, inference mode, compile) equals eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mnapps.backbones import MobileNetV1
from mnapps.config import BackboneConfig
from mnapps.export.fuse import count_batchnorms
from mnapps.export.predict import Predictor, SSDPredictor
from mnapps.heads.face_embedding import FaceModelConfig, build_face_embedder
from mnapps.heads.ssd import SSDConfig, build_ssd


@torch.no_grad()
def settle_batchnorm(model: nn.Module, make_batch, steps: int = 1) -> nn.Module:
    """Real running statistics from train-mode passes, random affine parameters."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            module.momentum = None
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    model.train()
    for _ in range(steps):
        model(make_batch())
    return model.eval()


@pytest.mark.parametrize(
    "kwargs", [{}, {"tf_padding": True, "frozen_bn": True}], ids=["standard", "tf_padding+frozen_bn"]
)
@pytest.mark.parametrize("channels_last", [True, False])
def test_predictor_equals_eval_mode_classifier(kwargs, channels_last):
    torch.manual_seed(0)
    model = MobileNetV1(0.25, 10, **kwargs)
    if not kwargs.get("frozen_bn"):
        settle_batchnorm(model, lambda: torch.rand(8, 3, 64, 64) * 2 - 1)
    model.train()
    predictor = Predictor(model, channels_last=channels_last)
    assert count_batchnorms(predictor.module) == 0 and count_batchnorms(model) == 27
    assert model.training  # the training model keeps its mode
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = model.eval()(x)
    got = predictor(x)
    assert not got.requires_grad and got.is_inference()
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    if channels_last:
        weight = predictor.module.block1.pointwise.conv.weight
        assert weight.is_contiguous(memory_format=torch.channels_last)


def test_predictor_face_embedder():
    torch.manual_seed(0)
    model = build_face_embedder(FaceModelConfig(backbone=BackboneConfig(width_mult=0.25), input_size=64, embedding_dim=32))
    settle_batchnorm(model, lambda: torch.rand(8, 3, 64, 64))
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(Predictor(model)(x), expected, atol=1e-4)


@pytest.mark.parametrize("lite", [False, True], ids=["ssd", "ssdlite"])
def test_ssd_predictor_equals_torchvision_eval(lite):
    torch.manual_seed(0)
    model = build_ssd(SSDConfig(size=128, lite=lite), num_classes=4, backbone_cfg=BackboneConfig(width_mult=0.25))
    settle_batchnorm(model.backbone, lambda: torch.rand(4, 3, 128, 128) * 2 - 1)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 140, generator=generator), torch.rand(3, 128, 128, generator=generator)]
    with torch.no_grad():
        expected = model(images)
    got = SSDPredictor(model)(images)
    for ref, out in zip(expected, got):
        assert len(ref["boxes"]) == len(out["boxes"]) > 0
        # Folding changes the last float bits, which may swap two near-equal scores: compare
        # each detection with its counterpart of the same label and score.
        ref_keys = sorted(zip(ref["labels"].tolist(), ref["scores"].tolist(), ref["boxes"].tolist()))
        out_keys = sorted(zip(out["labels"].tolist(), out["scores"].tolist(), out["boxes"].tolist()))
        for (l1, s1, b1), (l2, s2, b2) in zip(ref_keys, out_keys):
            assert l1 == l2 and abs(s1 - s2) < 1e-4
            assert max(abs(a - b) for a, b in zip(b1, b2)) < 1e-2


def test_predictor_rejects_a_single_image():
    predictor = Predictor(MobileNetV1(0.25, 10))
    with pytest.raises(ValueError, match=r"Tensor\[N, C, H, W\]"):
        predictor(torch.rand(3, 64, 64))


@pytest.mark.slow
def test_compiled_predictor_equals_eval_mode():
    torch.manual_seed(0)
    model = settle_batchnorm(MobileNetV1(0.25, 10), lambda: torch.rand(8, 3, 64, 64) * 2 - 1)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = model(x)
    predictor = Predictor(model, compile=True)
    assert torch.allclose(predictor(x), expected, atol=1e-4, rtol=1e-4)
    assert torch.allclose(predictor(x), expected, atol=1e-4, rtol=1e-4)  # the compiled graph, reused
