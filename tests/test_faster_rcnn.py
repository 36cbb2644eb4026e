"""Faster R-CNN heads: shapes of the paper's RoI head, proposals, training, freezing, stats, transfer."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from mnapps.backbones import MobileNetV1
from mnapps.config import BackboneConfig
from mnapps.backbones.trunk import extract_backbone_state, load_backbone_weights
from mnapps.checkpoint import save_checkpoint
from mnapps.heads.faster_rcnn import (
    FasterRCNNConfig,
    FPNConfig,
    MobileNetV1BoxHead,
    build_faster_rcnn,
    build_faster_rcnn_fpn,
)
from lab.paper_tables import ROWS, measure
from mnapps.stats import count_macs, count_params

SMALL = FasterRCNNConfig(min_size=128, max_size=128, rpn_pre_nms_top_n_train=300, box_batch_size_per_image=32)
SMALL_FPN = FasterRCNNConfig(
    min_size=128,
    max_size=128,
    box_batch_size_per_image=32,
    fpn=FPNConfig(out_channels=32, anchor_sizes=((16, 32), (32, 64), (64, 128)), representation_size=64),
)
QUARTER = BackboneConfig(width_mult=0.25)


def _trunk_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = extract_backbone_state(model.state_dict())
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _randomise_bn_statistics(model: torch.nn.Module, seed: int) -> None:
    """Give every BN non-default statistics so a weight transfer is visible in them too."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
            n = module.running_mean.numel()
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator))


# ------------------------------------------------------------------------------------------
# the paper's RoI head


@pytest.mark.parametrize("width_mult,c11,c13", [(0.25, 128, 256), (0.5, 256, 512)])
def test_roi_head_shapes(width_mult, c11, c13):
    torch.manual_seed(0)
    cfg = dataclasses.replace(SMALL, max_size=256)
    model = build_faster_rcnn(cfg, backbone_cfg=BackboneConfig(width_mult=width_mult), num_classes=5)
    model.eval()
    seen = {}
    hooks = [
        model.backbone.register_forward_hook(lambda m, i, o: seen.update(features=o)),
        model.roi_heads.box_roi_pool.register_forward_hook(lambda m, i, o: seen.update(crops=o.shape)),
        model.roi_heads.box_head.body.register_forward_hook(lambda m, i, o: seen.update(blocks=o.shape)),
        model.roi_heads.box_head.register_forward_hook(lambda m, i, o: seen.update(pooled=o.shape)),
        model.roi_heads.box_predictor.register_forward_hook(
            lambda m, i, o: seen.update(scores=o[0].shape, deltas=o[1].shape)
        ),
    ]
    with torch.no_grad():
        model([torch.rand(3, 128, 160)])  # kept at 128x160: a multiple of block 11's stride
    for hook in hooks:
        hook.remove()

    assert list(seen["features"]) == ["block11"]
    assert seen["features"]["block11"].shape == (1, c11, 128 // 16, 160 // 16)
    rois = seen["crops"][0]
    assert rois > 0
    assert seen["crops"] == (rois, c11, 14, 14)  # RoIAlign crops 14x14 from block 11
    assert seen["blocks"] == (rois, c13, 7, 7)  # block 12's stride 2, block 13 keeps 7x7
    assert seen["pooled"] == (rois, c13)  # global average pooling
    assert seen["scores"] == (rois, 5) and seen["deltas"] == (rois, 5 * 4)


def test_box_head_is_the_backbone_blocks_12_13_with_the_paper_cost():
    model = build_faster_rcnn(FasterRCNNConfig(), num_classes=91)
    head = model.roi_heads.box_head
    assert isinstance(head, MobileNetV1BoxHead)
    assert [name for name, _ in head.body.named_children()] == ["block12", "block13"]
    # Per RoI, worked out by hand from paper Table 1 on a 14x14x512 crop:
    # block12 dw 7*7*512*9 + pw 7*7*512*1024, block13 dw 7*7*1024*9 + pw 7*7*1024*1024.
    expected = 7 * 7 * (512 * 9 + 512 * 1024 + 1024 * 9 + 1024 * 1024)
    assert expected == 77_747_712
    assert count_macs(head, torch.zeros(1, 512, 14, 14)) == expected
    # The second stage has no weights of its own besides the predictors: blocks 12-13 are
    # the trunk's (1024*91 + 91 scores and 1024*364 + 364 box deltas for 91 classes).
    own = count_params(model) - count_params(model.backbone) - count_params(model.rpn)
    assert own == count_params(head) + (1024 * 91 + 91) + (1024 * 364 + 364)


def test_300_proposals_per_image_at_test():
    torch.manual_seed(0)
    cfg = FasterRCNNConfig(min_size=320, max_size=320)
    assert cfg.rpn_post_nms_top_n_test == 300
    model = build_faster_rcnn(cfg, backbone_cfg=QUARTER, num_classes=3).eval()
    seen = {}
    model.roi_heads.box_roi_pool.register_forward_hook(
        lambda m, inputs, out: seen.update(proposals=[p.shape[0] for p in inputs[1]], crops=out.shape[0])
    )
    with torch.no_grad():
        detections = model([torch.rand(3, 320, 320), torch.rand(3, 240, 320)])
    assert seen["proposals"] == [300, 300]
    assert seen["crops"] == 600
    assert len(detections) == 2
    for det, (h, w) in zip(detections, [(320, 320), (240, 320)]):
        assert set(det) == {"boxes", "labels", "scores"}
        assert det["boxes"].shape[0] <= cfg.detections_per_img
        if len(det["boxes"]):
            assert float(det["boxes"][:, 2].max()) <= w and float(det["boxes"][:, 3].max()) <= h
            assert int(det["labels"].min()) >= 1  # background is never reported


# ------------------------------------------------------------------------------------------
# training


def _images_with_squares(n: int, size: int = 128, seed: int = 0):
    """A bright axis-aligned square of class 1 or a dark one of class 2 on a mid-grey noise."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n):
        image = 0.5 + 0.05 * torch.randn(3, size, size, generator=generator)
        side = int(torch.randint(32, 64, (1,), generator=generator))
        x0, y0 = (int(v) for v in torch.randint(0, size - side, (2,), generator=generator))
        label = 1 + i % 2
        image[:, y0 : y0 + side, x0 : x0 + side] = 1.0 if label == 1 else 0.0
        images.append(image.clamp(0, 1))
        targets.append(
            {
                "boxes": torch.tensor([[x0, y0, x0 + side, y0 + side]], dtype=torch.float32),
                "labels": torch.tensor([label]),
            }
        )
    return images, targets


@pytest.mark.parametrize("builder,cfg", [(build_faster_rcnn, SMALL), (build_faster_rcnn_fpn, SMALL_FPN)])
def test_empty_target_images_train(builder, cfg):
    torch.manual_seed(0)
    model = builder(cfg, backbone_cfg=QUARTER, num_classes=3).train()
    images, targets = _images_with_squares(2)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}

    losses = model(images[:1], [empty])  # background only: nothing to regress
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_rpn_box_reg"].item() == 0.0
    assert losses["loss_objectness"].item() > 0.0 and losses["loss_classifier"].item() > 0.0

    losses = model([images[0], images[1]], [empty, targets[1]])  # mixed batch
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grad = model.roi_heads.box_predictor.bbox_pred.weight.grad
    assert grad is not None and torch.isfinite(grad).all()


@pytest.mark.parametrize("builder,cfg", [(build_faster_rcnn, SMALL), (build_faster_rcnn_fpn, SMALL_FPN)])
def test_short_training_run_loss_falls(builder, cfg):
    torch.manual_seed(0)
    model = builder(cfg, backbone_cfg=QUARTER, num_classes=3).train()
    images, targets = _images_with_squares(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    history = []
    for _ in range(8):
        total = sum(model(images, targets).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert all(math.isfinite(v) for v in history)
    assert sum(history[-3:]) / 3 < 0.8 * history[0], f"loss did not fall: {history}"


# ------------------------------------------------------------------------------------------
# freezing


def test_trainable_stages_freezes_the_earliest_stages():
    model = build_faster_rcnn(SMALL, backbone_cfg=BackboneConfig(width_mult=0.25, trainable_stages=3), num_classes=3)
    body, head = model.backbone.body, model.roi_heads.box_head.body
    frozen = ["stem"] + [f"block{i}" for i in range(1, 11)]
    for name in frozen:
        stage = getattr(body, name)
        assert not any(p.requires_grad for p in stage.parameters()), name
        # their statistics cannot drift in train mode either
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in stage.modules()), name
        assert any(isinstance(m, FrozenBatchNorm2d) for m in stage.modules()), name
    for stage in (body.block11, head.block12, head.block13):
        assert all(p.requires_grad for p in stage.parameters())
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in stage.modules())
    for part in (model.rpn, model.roi_heads.box_predictor):
        assert all(p.requires_grad for p in part.parameters())

    # a training step leaves the frozen stages exactly as they were
    before = {k: v.clone() for k, v in body.stem.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    images, targets = _images_with_squares(2)
    model.train()
    sum(model(images, targets).values()).backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in body.stem.state_dict().items())


def test_trainable_stages_zero_freezes_whole_trunk_and_none_freezes_nothing():
    model = build_faster_rcnn_fpn(SMALL_FPN, backbone_cfg=BackboneConfig(width_mult=0.25, trainable_stages=0), num_classes=3)
    trunk = model.backbone.body
    assert not any(p.requires_grad for p in trunk.parameters())
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    model = build_faster_rcnn(SMALL, backbone_cfg=QUARTER, num_classes=3)
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_bn_everywhere_in_the_trunk():
    model = build_faster_rcnn(SMALL, backbone_cfg=BackboneConfig(width_mult=0.25, frozen_bn=True), num_classes=3)
    trunk_modules = list(model.backbone.modules()) + list(model.roi_heads.box_head.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk_modules)
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in trunk_modules) == 27  # stem + 13 blocks x 2


@pytest.mark.parametrize("value", [-1, 15, 2.5])
def test_trainable_stages_out_of_range(value):
    with pytest.raises(ValueError, match="trainable_stages"):
        build_faster_rcnn(SMALL, backbone_cfg=BackboneConfig(width_mult=0.25, trainable_stages=value), num_classes=3)


# ------------------------------------------------------------------------------------------
# backbone transfer between heads


def test_backbone_checkpoint_moves_between_heads(tmp_path):
    from mnapps.heads.ssd import SSDConfig, build_ssd

    torch.manual_seed(1)
    ssd = build_ssd(SSDConfig(size=128), num_classes=4, backbone_cfg=QUARTER)
    _randomise_bn_statistics(ssd, seed=1)
    path = save_checkpoint({"task": "detection", "head": "ssd", "config": {}, "model": ssd.state_dict()}, tmp_path / "ssd.pt")

    torch.manual_seed(2)  # a different initialisation, so equality below is the transfer's doing
    fresh = _trunk_state(build_faster_rcnn(SMALL, backbone_cfg=QUARTER, num_classes=3))
    frcnn = build_faster_rcnn(SMALL, backbone_cfg=QUARTER, num_classes=3, weights_backbone=path)
    source, target = _trunk_state(ssd), _trunk_state(frcnn)
    # 27 conv + BN layers (stem, 13 x depthwise/pointwise): a weight and 4 BN tensors each
    assert len(source) == len(target) == 27 * 5
    assert frcnn.backbone_load_report.loaded == 27 * 5
    for key, value in source.items():
        assert torch.equal(target[key], value), key
        assert not torch.equal(fresh[key], value), key  # ... which a fresh model did not have
    # the box head's blocks 12-13 are the loaded ones
    assert torch.equal(
        frcnn.roi_heads.box_head.body.block13.pointwise.conv.weight, source["block13.pointwise.conv.weight"]
    )

    # and back: a Faster R-CNN trunk (blocks 12-13 living in its box head) into a classifier
    classifier = MobileNetV1(0.25, num_classes=10)
    report = load_backbone_weights(classifier, {"model": frcnn.state_dict()}, strict=True)
    assert report.loaded == len(source)
    for key, value in classifier.state_dict().items():
        if key in source:
            assert torch.equal(value, source[key]), key


def test_backbone_weights_of_another_width_are_a_clear_error(tmp_path):
    other = MobileNetV1(0.5, num_classes=0)
    path = save_checkpoint({"task": "classification", "model": other.state_dict()}, tmp_path / "half.pt")
    with pytest.raises(ValueError, match="width_mult"):
        build_faster_rcnn(SMALL, backbone_cfg=QUARTER, num_classes=3, weights_backbone=path)


# ------------------------------------------------------------------------------------------
# FPN variant and bad configs


def test_fpn_levels_and_anchors():
    model = build_faster_rcnn_fpn(SMALL_FPN, backbone_cfg=QUARTER, num_classes=3).eval()
    with torch.no_grad():
        features = model.backbone(torch.rand(1, 3, 128, 128))
    assert list(features) == ["block11", "block13", "pool"]
    assert [tuple(f.shape) for f in features.values()] == [(1, 32, 8, 8), (1, 32, 4, 4), (1, 32, 2, 2)]
    assert model.rpn.anchor_generator.num_anchors_per_location() == [6, 6, 6]  # 2 sizes x 3 ratios
    assert model.roi_heads.box_roi_pool.featmap_names == ["block11", "block13"]


@pytest.mark.parametrize(
    "builder,kwargs,match",
    [
        (build_faster_rcnn, dict(cfg=SMALL, num_classes=1), "num_classes"),
        (build_faster_rcnn, dict(cfg=FasterRCNNConfig(min_size=800, max_size=600), num_classes=3), "min_size"),
        (build_faster_rcnn, dict(cfg=FasterRCNNConfig(rpn_feature="block99"), num_classes=3), "block99"),
        (build_faster_rcnn, dict(cfg=FasterRCNNConfig(aspect_ratios=()), num_classes=3), "aspect_ratios"),
        (
            build_faster_rcnn_fpn,
            dict(cfg=FasterRCNNConfig(fpn=FPNConfig(anchor_sizes=((32,), (64,)))), num_classes=3),
            "one list of sizes per pyramid level",
        ),
        (
            build_faster_rcnn_fpn,
            dict(cfg=FasterRCNNConfig(fpn=FPNConfig(features=("block13", "block11"))), num_classes=3),
            "shallow to deep",
        ),
    ],
)
def test_bad_config_is_a_clear_error(builder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        builder(kwargs.pop("cfg"), backbone_cfg=QUARTER, **kwargs)


# ------------------------------------------------------------------------------------------
# stats rows (paper Table 13)


@pytest.mark.parametrize(
    "name",
    ["faster_rcnn300_mobilenet_v1", pytest.param("faster_rcnn600_mobilenet_v1", marks=pytest.mark.slow)],
)
def test_stats_rows_match_the_paper(name):
    row = next(r for r in ROWS if r.name == name)
    assert row.macs_tolerance == 0.10
    result = measure(row)
    assert abs(result["macs"] - row.paper_macs) <= 0.10 * row.paper_macs, result
    assert abs(result["params"] - row.paper_params) <= row.params_tolerance, result


def test_fpn_stats_row_exists_without_paper_value():
    row = next(r for r in ROWS if r.name == "faster_rcnn_fpn_mobilenet_v1")
    assert row.paper_macs is None and row.paper_params is None


# ------------------------------------------------------------------------------------------
# configs and checkpoints through the detection task


@pytest.mark.parametrize(
    "name,head,min_size",
    [
        ("faster_rcnn_mnv1_a100_r300_coco", "faster_rcnn", 300),
        ("faster_rcnn_mnv1_a100_r600_coco", "faster_rcnn", 600),
        ("faster_rcnn_fpn_mnv1_a100_r600_coco", "faster_rcnn_fpn", 600),
        ("faster_rcnn_mnv1_a025_r256_shapes", "faster_rcnn", 256),
        ("faster_rcnn_fpn_mnv1_a025_r256_shapes", "faster_rcnn_fpn", 256),
    ],
)
def test_configs_build_their_detector(name, head, min_size):
    from mnapps.tasks.detection import build_model
    from mnapps.config import load_config
    from mnapps.tasks.detection import DetConfig

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml", DetConfig)
    assert cfg.model.head == head and cfg.model.head_settings.min_size == min_size
    model = build_model(cfg, 81)
    assert model.transform.min_size == (min_size,)
    if "coco" in name:  # the paper's 300 proposals at test time, ImageNet-style fine-tuning
        assert model.rpn._post_nms_top_n["testing"] == 300
        assert cfg.model.backbone.frozen_bn and cfg.model.backbone.tf_padding


def test_checkpoint_reloads_with_load_detector(tmp_path):
    from mnapps.config import to_dict
    from mnapps.tasks.detection import DetConfig, DetModelConfig, load_detector

    cfg = DetConfig(
        model=DetModelConfig(
            head="faster_rcnn",
            backbone=BackboneConfig(width_mult=0.25, trainable_stages=5),
            head_settings=SMALL,
            num_classes=3,
            class_names=("__background__", "a", "b"),
            category_ids=(1, 2),
        )
    )
    torch.manual_seed(0)
    from mnapps.tasks.detection import build_model

    model = build_model(cfg, 3)
    _randomise_bn_statistics(model, seed=3)
    path = save_checkpoint(
        {"task": "detection", "head": "faster_rcnn", "config": to_dict(cfg), "model": model.state_dict()},
        tmp_path / "best.pt",
    )
    loaded, loaded_cfg = load_detector(path)
    assert loaded_cfg == cfg
    image = torch.rand(3, 128, 128)
    with torch.no_grad():
        expected = model.eval()([image])[0]
        got = loaded([image])[0]
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(expected[key], got[key]), key
