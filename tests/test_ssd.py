"""SSD head: anchors, box coding, matching and hard negative mining, train/eval contracts.

Expected values are worked out by hand from the TF Object Detection API's formulas
(``create_ssd_anchors``: scales 0.2 + 0.15 k for k = 0..5 at 300x300) and the paper's Table 13.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou

from mnapps.config import BackboneConfig
from mnapps.checkpoint import save_checkpoint
from mnapps.backbones import MobileNetV1
from mnapps.heads.ssd import SSDConfig, SSDAnchorGenerator, build_ssd, build_ssdlite, ssd_anchor_specs

GRIDS_300 = [(19, 19), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
TINY = BackboneConfig(width_mult=0.25)


@pytest.fixture(scope="module")
def anchors_300() -> torch.Tensor:
    generator = SSDAnchorGenerator(ssd_anchor_specs(SSDConfig()))
    return generator.grid_anchors(GRIDS_300, (300, 300), dtype=torch.float64)


def test_feature_maps_at_300_and_anchor_count():
    model = build_ssd(SSDConfig(size=300), num_classes=3, backbone_cfg=TINY).eval()
    with torch.no_grad():
        maps = model.backbone(torch.zeros(1, 3, 300, 300))
    assert [tuple(m.shape[-2:]) for m in maps.values()] == GRIDS_300
    assert model.anchor_generator.num_anchors_per_location() == [3, 6, 6, 6, 6, 6]
    # 19*19*3 + (100 + 25 + 9 + 4 + 1) * 6 = 1083 + 834
    assert model.anchor_generator.num_anchors(GRIDS_300) == 1917
    head = model.head(list(maps.values()))
    assert head["cls_logits"].shape == (1, 1917, 3)
    assert head["bbox_regression"].shape == (1, 1917, 4)


def test_scales_follow_tf_formula():
    specs = ssd_anchor_specs(SSDConfig())
    assert specs[0] == [(0.1, 1.0), (0.2, 2.0), (0.2, 0.5)]
    for k, layer in enumerate(specs[1:], start=1):
        s_k, s_next = 0.2 + 0.15 * k, (0.2 + 0.15 * (k + 1)) if k < 5 else 1.0
        assert [r for _, r in layer] == pytest.approx([1.0, 2.0, 0.5, 3.0, 1 / 3, 1.0])
        assert [s for s, _ in layer[:5]] == pytest.approx([s_k] * 5)
        assert layer[5][0] == pytest.approx(math.sqrt(s_k * s_next))


def test_first_map_small_square_box(anchors_300):
    # cell (row 4, col 7) of the 19x19 map, first spec: scale 0.1, ratio 1 -> 30x30 px
    index = (4 * 19 + 7) * 3
    cx, cy = 7.5 / 19 * 300, 4.5 / 19 * 300
    assert anchors_300[index].tolist() == pytest.approx([cx - 15, cy - 15, cx + 15, cy + 15])
    # same cell, ratio 2 at scale 0.2: w = 0.2*sqrt(2)*300 = 84.85, h = 42.43
    w, h = 0.2 * math.sqrt(2) * 300, 0.2 / math.sqrt(2) * 300
    assert anchors_300[index + 1].tolist() == pytest.approx([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def test_extra_square_box_on_second_map(anchors_300):
    # 10x10 map, cell (row 2, col 3), sixth spec: sqrt(0.35 * 0.5) * 300 = 125.50 px square
    index = 19 * 19 * 3 + (2 * 10 + 3) * 6 + 5
    side = math.sqrt(0.35 * 0.5) * 300
    cx, cy = 3.5 * 30, 2.5 * 30
    assert side == pytest.approx(125.499, abs=1e-3)
    assert anchors_300[index].tolist() == pytest.approx(
        [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
    )


def test_last_map_boxes(anchors_300):
    last = anchors_300[-6:]
    # one 1x1 cell centred on the image; scale 0.95 (ratio 3: w = 493.6, h = 164.5), extra
    # square sqrt(0.95 * 1.0) * 300 = 292.4; not clipped to the image (TF does not clip)
    w3, h3 = 0.95 * math.sqrt(3) * 300, 0.95 / math.sqrt(3) * 300
    assert last[3].tolist() == pytest.approx([150 - w3 / 2, 150 - h3 / 2, 150 + w3 / 2, 150 + h3 / 2])
    side = math.sqrt(0.95) * 300
    assert last[5].tolist() == pytest.approx([150 - side / 2] * 2 + [150 + side / 2] * 2)
    assert last[0].tolist() == pytest.approx([7.5, 7.5, 292.5, 292.5])


def test_box_encoding_round_trip_with_10_10_5_5():
    model = build_ssd(SSDConfig(size=64), num_classes=2, backbone_cfg=TINY)
    assert model.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    anchor = torch.tensor([[0.0, 0.0, 10.0, 10.0]])  # centre (5, 5), 10x10
    gt = torch.tensor([[1.0, 2.0, 11.0, 14.0]])  # centre (6, 8), 10x12
    codes = model.box_coder.encode_single(gt, anchor)
    # dx = 10 * 1/10, dy = 10 * 3/10, dw = 5 * log(10/10), dh = 5 * log(12/10)
    assert codes[0].tolist() == pytest.approx([1.0, 3.0, 0.0, 5 * math.log(1.2)], abs=1e-6)
    decoded = model.box_coder.decode_single(codes, anchor)
    assert decoded[0].tolist() == pytest.approx(gt[0].tolist(), abs=1e-5)


def _hand_made_anchors() -> torch.Tensor:
    # One ground truth [0, 0, 10, 10]. Anchor IoUs worked out by hand:
    #   a0 identical -> 1.0;  a1 [0, 0, 10, 12] -> 100/120 = 0.833;  a2 [0, 0, 10, 20] -> 0.5
    #   a3 [5, 0, 15, 10] -> 50/150 = 0.333;  a4..a11 far away -> 0.
    boxes = [[0, 0, 10, 10], [0, 0, 10, 12], [0, 0, 10, 20], [5, 0, 15, 10]]
    boxes += [[100 + 20 * i, 100, 110 + 20 * i, 110] for i in range(8)]
    return torch.tensor(boxes, dtype=torch.float32)


def test_matching_threshold_and_forced_best_anchor():
    model = build_ssd(SSDConfig(size=64), num_classes=2, backbone_cfg=TINY)
    anchors = _hand_made_anchors()
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    iou = box_iou(gt, anchors)
    assert iou[0, :4].tolist() == pytest.approx([1.0, 100 / 120, 0.5, 1 / 3])
    matched = model.proposal_matcher(iou)
    # IoU >= 0.5 -> positive (a0, a1, a2); below -> background (-1)
    assert matched.tolist() == [0, 0, 0] + [-1] * 9
    # A ground truth whose best IoU is only 1/3 (with a3) is still forced onto a3.
    lone = torch.tensor([[10.0, 0.0, 20.0, 10.0]])  # overlaps a3 by 5x10: 50 / 150
    matched = model.proposal_matcher(box_iou(lone, anchors))
    assert matched.tolist() == [-1, -1, -1, 0] + [-1] * 8


def test_hard_negative_mining_keeps_three_per_positive():
    model = build_ssd(SSDConfig(size=64), num_classes=2, backbone_cfg=TINY)
    anchors = _hand_made_anchors()
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}
    matched = model.proposal_matcher(box_iou(target["boxes"], anchors))
    positives = [0, 1, 2]
    # Logits [0, z]: CE against background is softplus(z), against class 1 softplus(-z).
    z = torch.tensor([2.0, 1.0, 0.5, 0.3, -1.0, 4.0, -2.0, 3.0, 0.1, 2.5, -0.5, 1.5])
    cls_logits = torch.stack([torch.zeros_like(z), z], dim=1).unsqueeze(0)
    regression = model.box_coder.encode_single(target["boxes"][[0, 0, 0]], anchors[positives])
    bbox = torch.zeros(1, 12, 4)
    bbox[0, positives] = regression  # perfect boxes -> zero box loss
    losses = model.compute_loss([target], {"bbox_regression": bbox, "cls_logits": cls_logits}, [anchors], [matched])

    def softplus(v: float) -> float:
        return math.log1p(math.exp(v))

    # 3 positives -> up to 9 negatives: all nine background anchors are kept.
    negatives = [i for i in range(12) if i not in positives]
    expected = sum(softplus(-z[i].item()) for i in positives) + sum(softplus(z[i].item()) for i in negatives)
    assert losses["classification"].item() == pytest.approx(expected / 3, rel=1e-5)
    assert losses["bbox_regression"].item() == pytest.approx(0.0, abs=1e-6)

    # At IoU threshold 0.9 only a0 is positive (a1 and a2 become background): 3 negatives are
    # kept, those with the largest background loss, i.e. the highest z: a5 (4.0), a7 (3.0), a9 (2.5).
    strict = build_ssd(SSDConfig(size=64, iou_threshold=0.9), num_classes=2, backbone_cfg=TINY)
    matched = strict.proposal_matcher(box_iou(target["boxes"], anchors))
    assert (matched >= 0).nonzero().flatten().tolist() == [0]
    bbox = torch.zeros(1, 12, 4)
    bbox[0, 0] = strict.box_coder.encode_single(target["boxes"], anchors[:1])[0]
    losses = strict.compute_loss([target], {"bbox_regression": bbox, "cls_logits": cls_logits}, [anchors], [matched])
    expected = softplus(-2.0) + softplus(4.0) + softplus(3.0) + softplus(2.5)
    assert losses["classification"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("builder", [build_ssd, build_ssdlite])
def test_train_mode_finite_losses_with_empty_image_and_eval_outputs(builder):
    torch.manual_seed(0)
    model = builder(SSDConfig(size=128), num_classes=3, backbone_cfg=TINY)
    images = [torch.rand(3, 96, 128), torch.rand(3, 140, 110)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # background only
    ]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"bbox_regression", "classification"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["classification"].item() > 0
    sum(losses.values()).backward()
    assert model.backbone.trunk.stem.conv.weight.grad.abs().sum() > 0

    # an all-background batch trains too (no positives -> no loss, but finite)
    losses = model(images[1:] * 2, targets[1:] * 2)
    assert all(torch.isfinite(v) for v in losses.values())

    model.eval()
    with torch.no_grad():
        out = model(images)
    assert isinstance(out, list) and len(out) == 2
    for det, image in zip(out, images):
        assert set(det) == {"boxes", "labels", "scores"}
        assert det["boxes"].shape[1] == 4 and det["boxes"].shape[0] == det["scores"].shape[0]
        h, w = image.shape[-2:]
        if len(det["boxes"]):  # boxes come back in the original image's pixels
            assert det["boxes"][:, 2].max() <= w and det["boxes"][:, 3].max() <= h
            assert det["labels"].min() >= 1 and det["labels"].max() <= 2


def test_lite_uses_depthwise_extras_and_predictors():
    model = build_ssdlite(SSDConfig(size=128), num_classes=3, backbone_cfg=TINY)
    depthwise = [m for m in model.backbone.extras.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 4
    head_dw = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(head_dw) == 12  # one per map for classes and one for boxes


def test_width_multiplier_scales_extras():
    model = build_ssd(SSDConfig(size=128), num_classes=3, backbone_cfg=BackboneConfig(width_mult=0.5))
    assert model.backbone.out_channels == [256, 512, 256, 128, 128, 64]


def test_input_is_standardised_to_minus_one_one():
    model = build_ssd(SSDConfig(size=64), num_classes=2, backbone_cfg=TINY)
    normalized = model.transform.normalize(torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1).expand(3, 2, 2))
    assert normalized[:, 0, 0].tolist() == pytest.approx([-1.0, 0.0, 1.0])


def test_backbone_weights_from_classification_checkpoint(tmp_path):
    classifier = MobileNetV1(0.25, num_classes=10)
    path = save_checkpoint({"task": "classification", "model": classifier.state_dict()}, tmp_path / "cls.pt")
    model = build_ssd(SSDConfig(size=64), num_classes=2, backbone_cfg=TINY, weights_backbone=path)
    assert torch.equal(model.backbone.trunk.block13.pointwise.conv.weight, classifier.block13.pointwise.conv.weight)
    assert model.backbone_load_report.loaded > 0 and not model.backbone_load_report.missing


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="num_classes"):
        build_ssd(SSDConfig(size=64), num_classes=1, backbone_cfg=TINY)
    with pytest.raises(ValueError, match="block12"):
        build_ssd(SSDConfig(size=64, feature_maps=("block12x",)), num_classes=3, backbone_cfg=TINY)
    with pytest.raises(ValueError, match="ssd.size"):
        SSDConfig(size=16)
    with pytest.raises(ValueError, match="trainable_stages"):
        build_ssd(SSDConfig(size=64), num_classes=3, backbone_cfg=BackboneConfig(width_mult=0.25, trainable_stages=99))


def test_trainable_stages_freezes_the_early_trunk():
    model = build_ssd(SSDConfig(size=64), num_classes=3, backbone_cfg=BackboneConfig(width_mult=0.25, trainable_stages=2))
    trunk = model.backbone.trunk
    assert not trunk.block11.pointwise.conv.weight.requires_grad
    assert trunk.block12.pointwise.conv.weight.requires_grad and trunk.block13.depthwise.conv.weight.requires_grad
    assert all(p.requires_grad for p in model.backbone.extras.parameters())


@pytest.mark.slow
def test_stats_row_within_five_percent_of_paper():
    from lab.paper_tables import ROWS, measure

    row = next(r for r in ROWS if r.name == "ssd300_mobilenet_v1")
    measured = measure(row)
    assert abs(measured["macs"] - 1200e6) <= 0.05 * 1200e6
    assert abs(measured["params"] - 6.8e6) <= 0.05 * 6.8e6
