"""Faster R-CNN heads on the MobileNetV1 trunk: the paper's model and an FPN variant.

This module owns the two Faster R-CNN detectors of mnapps and their config
(:class:`FasterRCNNConfig`), both assembled from :class:`torchvision.models.detection.FasterRCNN`
parts around one :class:`mnapps.backbones.MobileNetV1`:

* :func:`build_faster_rcnn`, the MobileNet paper's detector (arXiv 1704.04861, Sec. 4.6 and
  Table 13) as the TF Object Detection API builds it: the region proposal network runs on
  block 11 (stride 16, ``512 * alpha`` channels) with 4 scales x 3 aspect ratios of anchors per
  location; RoIAlign crops 14x14 from that map; the box head is blocks 12-13 *of the same
  backbone* (block 12's stride 2 takes 14x14 to 7x7), then global average pooling and the
  class / box predictors. 300 proposals per image at test time, as in the paper.
* :func:`build_faster_rcnn_fpn`, where the framework goes beyond the paper: a feature pyramid
  (torchvision's :class:`~torchvision.models.detection.backbone_utils.BackboneWithFPN`) over
  blocks 11 and 13 plus a max-pooled level, anchors sized per level and a two-layer MLP box head,
  like torchvision's ``fasterrcnn_mobilenet_v3_large_fpn``.

Both models take images in [0, 1] and standardise them to [-1, 1] inside (image mean and std
0.5, the TF-slim convention of the backbone weights). The trunk's stages keep their own names
in the model (``backbone.body.block7...``, ``roi_heads.box_head.body.block12...``), so
:func:`mnapps.backbones.trunk.load_backbone_weights` moves a trunk trained with any other
head (SSD, classifier) into these and back.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from os import PathLike
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mnapps.backbones import MobileNetV1, prepare_trunk
from mnapps.config import BackboneConfig

__all__ = [
    "FasterRCNNConfig",
    "FPNConfig",
    "MobileNetV1RPNFeatures",
    "MobileNetV1BoxHead",
    "build_faster_rcnn",
    "build_faster_rcnn_fpn",
]

# The backbone weights expect RGB scaled to [-1, 1]: (x - 0.5) / 0.5 of an image in [0, 1].
_IMAGE_MEAN = [0.5, 0.5, 0.5]
_IMAGE_STD = [0.5, 0.5, 0.5]


@dataclass(frozen=True)
class FPNConfig:
    """Feature-pyramid settings, used by :func:`build_faster_rcnn_fpn` only.

    Attributes:
        features: trunk stages feeding the pyramid, shallow to deep (stride 16 and 32).
        out_channels: channels of every pyramid level.
        extra_pool: add a max-pooled level on top (stride 64), as torchvision's mobile FPNs do.
        anchor_sizes: anchor sizes (pixels) for each pyramid level, extra level included;
            every level needs the same number of sizes (the RPN head is shared across levels).
        roi_output_size: RoIAlign crop (the MLP head sees ``out_channels * size * size``).
        representation_size: width of the two fully connected layers of the box head.
    """

    features: tuple[str, ...] = ("block11", "block13")
    out_channels: int = 256
    extra_pool: bool = True
    anchor_sizes: tuple[tuple[int, ...], ...] = (
        (32, 64, 128, 256, 512),
        (32, 64, 128, 256, 512),
        (32, 64, 128, 256, 512),
    )
    roi_output_size: int = 7
    representation_size: int = 1024


@dataclass(frozen=True)
class FasterRCNNConfig:
    """Faster R-CNN settings; defaults are the paper's / TF Object Detection API's (COCO, 600).

    Input resizing (done inside the model): the shorter side becomes ``min_size`` unless the
    longer would exceed ``max_size``; the batch is padded to a multiple of ``size_divisible``.

    Attributes:
        min_size, max_size: resize targets in pixels (paper: shorter side 300 or 600).
        size_divisible: pad batched images to a multiple of this (16 = block 11's stride).
        rpn_feature: trunk stage the RPN runs on (paper: block 11, stride 16); the stages
            after it form the box head of :func:`build_faster_rcnn`.
        anchor_sizes: anchor sizes in pixels (TF API: scales 0.25, 0.5, 1, 2 of 256).
        aspect_ratios: anchor height / width ratios at every size (TF API: 0.5, 1, 2).
        rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test: proposals kept (per level) before NMS.
        rpn_post_nms_top_n_train, rpn_post_nms_top_n_test: proposals per image after NMS
            (paper and TF API: 300).
        rpn_nms_thresh: IoU threshold of the proposal NMS.
        rpn_fg_iou_thresh, rpn_bg_iou_thresh: anchor matching thresholds.
        rpn_batch_size_per_image, rpn_positive_fraction: anchors sampled for the RPN loss.
        roi_output_size: RoIAlign crop size of :func:`build_faster_rcnn` (paper: 14).
        roi_sampling_ratio: bilinear samples per RoIAlign bin side (0: adaptive).
        box_batch_size_per_image, box_positive_fraction: RoIs sampled for the box head loss
            (TF API: 64, 0.25).
        box_fg_iou_thresh, box_bg_iou_thresh: RoI matching thresholds.
        box_score_thresh: detections scoring below this are dropped.
        box_nms_thresh: per-class NMS of the final detections (TF API: 0.6).
        detections_per_img: detections kept per image (COCO evaluates at most 100).
        fpn: the FPN variant's settings.
    """

    min_size: int = 600
    max_size: int = 1024
    size_divisible: int = 16
    rpn_feature: str = "block11"
    anchor_sizes: tuple[int, ...] = (64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 300
    rpn_post_nms_top_n_test: int = 300
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    roi_output_size: int = 14
    roi_sampling_ratio: int = 2
    box_batch_size_per_image: int = 64
    box_positive_fraction: float = 0.25
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_score_thresh: float = 0.01
    box_nms_thresh: float = 0.6
    detections_per_img: int = 100
    fpn: FPNConfig = field(default_factory=FPNConfig)


# ------------------------------------------------------------------------------------------
# modules


class MobileNetV1RPNFeatures(nn.Module):
    """The trunk up to the RPN stage, returning ``OrderedDict{stage_name: Tensor[N, C, H/s, W/s]}``.

    Attributes:
        body: the trunk stages (``stem`` .. ``stage_name``), shared with the MobileNetV1.
        out_channels: ``C`` (``512 * alpha`` for block 11), as torchvision's detectors expect.
    """

    def __init__(self, body: nn.Sequential, stage_name: str, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.stage_name = stage_name
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return OrderedDict([(self.stage_name, self.body(x))])


class MobileNetV1BoxHead(nn.Module):
    """The paper's second stage: the trunk's remaining blocks applied to every RoI crop.

    ``forward(crops: Tensor[R, C, 14, 14]) -> Tensor[R, out_channels]``: block 12 (stride 2)
    takes the crops to 7x7, block 13 keeps 7x7, global average pooling flattens them.

    Attributes:
        body: blocks after the RPN stage (``block12``, ``block13``), shared with the MobileNetV1.
        out_channels: ``1024 * alpha``, the input width of the class / box predictors.
    """

    def __init__(self, body: nn.Sequential, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_channels = out_channels

    def forward(self, crops: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.body(crops)), 1)


# ------------------------------------------------------------------------------------------
# shared helpers


def _positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"faster_rcnn.{name} must be > 0, got {value!r}")


def _fraction(value: float, name: str) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"faster_rcnn.{name} must be in (0, 1], got {value!r}")


def _validate(cfg: FasterRCNNConfig, num_classes: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"num_classes counts the background too and must be >= 2, got {num_classes!r}"
        )
    for name in (
        "min_size", "max_size", "size_divisible", "rpn_pre_nms_top_n_train",
        "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test",
        "rpn_batch_size_per_image", "roi_output_size", "box_batch_size_per_image",
        "detections_per_img",
    ):  # fmt: skip
        _positive(getattr(cfg, name), name)
    if cfg.min_size > cfg.max_size:
        raise ValueError(
            f"faster_rcnn.min_size ({cfg.min_size}) must not exceed faster_rcnn.max_size ({cfg.max_size})"
        )
    for name in ("rpn_positive_fraction", "box_positive_fraction", "rpn_nms_thresh", "box_nms_thresh"):
        _fraction(getattr(cfg, name), name)
    if not cfg.anchor_sizes or not cfg.aspect_ratios:
        raise ValueError("faster_rcnn.anchor_sizes and faster_rcnn.aspect_ratios must not be empty")
    for value in (*cfg.anchor_sizes, *cfg.aspect_ratios):
        _positive(value, "anchor_sizes / aspect_ratios entries")
    if cfg.rpn_bg_iou_thresh > cfg.rpn_fg_iou_thresh:
        raise ValueError(
            f"faster_rcnn.rpn_bg_iou_thresh ({cfg.rpn_bg_iou_thresh}) must not exceed "
            f"rpn_fg_iou_thresh ({cfg.rpn_fg_iou_thresh})"
        )


def _common_kwargs(cfg: FasterRCNNConfig) -> dict[str, Any]:
    """FasterRCNN keyword arguments shared by both variants."""
    return dict(
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        image_mean=_IMAGE_MEAN,
        image_std=_IMAGE_STD,
        size_divisible=cfg.size_divisible,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_nms_thresh=cfg.rpn_nms_thresh,
        rpn_fg_iou_thresh=cfg.rpn_fg_iou_thresh,
        rpn_bg_iou_thresh=cfg.rpn_bg_iou_thresh,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        rpn_positive_fraction=cfg.rpn_positive_fraction,
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.detections_per_img,
        box_fg_iou_thresh=cfg.box_fg_iou_thresh,
        box_bg_iou_thresh=cfg.box_bg_iou_thresh,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_positive_fraction=cfg.box_positive_fraction,
    )


# ------------------------------------------------------------------------------------------
# builders


def build_faster_rcnn(
    cfg: FasterRCNNConfig | None = None,
    *,
    backbone_cfg: BackboneConfig | None = None,
    num_classes: int,
    weights_backbone: str | PathLike | dict[str, Any] | None = None,
) -> FasterRCNN:
    """The paper's Faster R-CNN with a MobileNetV1 trunk (TF Object Detection API layout).

    Args:
        cfg: head settings (defaults: the paper's 600 model).
        backbone_cfg: trunk settings (width, activation, ``frozen_bn``, ``trainable_stages``).
        num_classes: classes including the background (91 for COCO's category ids, K + 1
            for a dataset with K contiguous labels).
        weights_backbone: an mnapps checkpoint (any head or classifier) or state dict whose
            trunk initialises this one; the widths must match.

    Returns:
        A :class:`torchvision.models.detection.FasterRCNN`. Train mode:
        ``model(images, targets) -> {"loss_classifier", "loss_box_reg", "loss_objectness",
        "loss_rpn_box_reg"}`` with ``images: list[Tensor[3, H, W]]`` in [0, 1] and targets
        ``{"boxes": FloatTensor[N, 4] xyxy pixels, "labels": Int64Tensor[N]}`` (``N`` may be 0).
        Eval mode: ``model(images) -> list[{"boxes": [D, 4], "labels": [D], "scores": [D]}]``
        in the input images' pixel coordinates.
    """
    cfg = FasterRCNNConfig() if cfg is None else cfg
    backbone_cfg = BackboneConfig() if backbone_cfg is None else backbone_cfg
    _validate(cfg, num_classes)
    trunk, load_report = prepare_trunk(backbone_cfg, weights=weights_backbone)
    stages = trunk.stage_names
    if cfg.rpn_feature not in stages[:-1]:
        raise ValueError(
            f"faster_rcnn.rpn_feature={cfg.rpn_feature!r} must name a stage of this {trunk.variant} "
            f"MobileNetV1 that has stages after it for the box head; choose from {stages[:-1]} "
            f"(the paper: block11, the last stride-16 stage)"
        )
    rpn_info = trunk.feature_info([cfg.rpn_feature])[0]
    first_stage, second_stage = trunk.split_at(cfg.rpn_feature)

    backbone = MobileNetV1RPNFeatures(first_stage, rpn_info.name, rpn_info.channels)
    anchor_generator = AnchorGenerator(
        sizes=(tuple(cfg.anchor_sizes),), aspect_ratios=(tuple(cfg.aspect_ratios),)
    )
    # TF API's first-stage box predictor: one 3x3 conv at the feature depth (512 * alpha),
    # then 1x1 objectness / box-delta layers for the 12 anchors of each location.
    rpn_head = RPNHead(rpn_info.channels, anchor_generator.num_anchors_per_location()[0])
    box_roi_pool = MultiScaleRoIAlign(
        featmap_names=[rpn_info.name],
        output_size=cfg.roi_output_size,
        sampling_ratio=cfg.roi_sampling_ratio,
    )
    box_head = MobileNetV1BoxHead(second_stage, trunk.num_features)
    box_predictor = FastRCNNPredictor(trunk.num_features, num_classes)
    model = FasterRCNN(
        backbone,
        num_classes=None,  # the predictor is given
        rpn_anchor_generator=anchor_generator,
        rpn_head=rpn_head,
        box_roi_pool=box_roi_pool,
        box_head=box_head,
        box_predictor=box_predictor,
        **_common_kwargs(cfg),
    )
    model.backbone_load_report = load_report  # what weights_backbone brought; shown by tools
    return model


def build_faster_rcnn_fpn(
    cfg: FasterRCNNConfig | None = None,
    *,
    backbone_cfg: BackboneConfig | None = None,
    num_classes: int,
    weights_backbone: str | PathLike | dict[str, Any] | None = None,
) -> FasterRCNN:
    """Faster R-CNN with a feature pyramid over the MobileNetV1 trunk (``cfg.fpn``).

    The pyramid (torchvision's ``BackboneWithFPN``) takes ``cfg.fpn.features`` (blocks 11
    and 13 by default) to ``cfg.fpn.out_channels`` each, plus a max-pooled level; the RPN
    runs on every level with ``cfg.fpn.anchor_sizes[level]``; RoIAlign picks the level by
    box size; the box head is torchvision's ``TwoMLPHead``. Arguments and tensor contract as
    :func:`build_faster_rcnn` (``cfg.rpn_feature``, ``anchor_sizes`` and ``roi_output_size``
    are not used here).
    """
    cfg = FasterRCNNConfig() if cfg is None else cfg
    backbone_cfg = BackboneConfig() if backbone_cfg is None else backbone_cfg
    _validate(cfg, num_classes)
    fpn = cfg.fpn
    for name in ("out_channels", "roi_output_size", "representation_size"):
        if not isinstance(getattr(fpn, name), int) or getattr(fpn, name) <= 0:
            raise ValueError(f"faster_rcnn.fpn.{name} must be a positive integer, got {getattr(fpn, name)!r}")
    if not fpn.features:
        raise ValueError("faster_rcnn.fpn.features must name at least one trunk stage, e.g. [block11, block13]")
    trunk, load_report = prepare_trunk(backbone_cfg, weights=weights_backbone)
    infos = trunk.feature_info(fpn.features)
    strides = [info.stride for info in infos]
    if strides != sorted(set(strides)):
        raise ValueError(
            f"faster_rcnn.fpn.features must be distinct stages from shallow to deep, got "
            f"{list(fpn.features)} with strides {strides}"
        )
    num_levels = len(infos) + (1 if fpn.extra_pool else 0)
    if len(fpn.anchor_sizes) != num_levels:
        raise ValueError(
            f"faster_rcnn.fpn.anchor_sizes needs one list of sizes per pyramid level: "
            f"{num_levels} levels ({len(infos)} features{' + max-pool' if fpn.extra_pool else ''}), "
            f"got {len(fpn.anchor_sizes)}"
        )
    if len({len(sizes) for sizes in fpn.anchor_sizes}) != 1 or not fpn.anchor_sizes[0]:
        raise ValueError(
            f"faster_rcnn.fpn.anchor_sizes: every level needs the same (non-zero) number of "
            f"sizes, because one RPN head is shared by all levels; got {fpn.anchor_sizes}"
        )

    deepest = infos[-1].name
    backbone = BackboneWithFPN(
        trunk.stages(None, deepest),
        return_layers={info.name: info.name for info in infos},
        in_channels_list=[info.channels for info in infos],
        out_channels=fpn.out_channels,
        extra_blocks=LastLevelMaxPool() if fpn.extra_pool else None,
    )
    anchor_generator = AnchorGenerator(
        sizes=tuple(tuple(sizes) for sizes in fpn.anchor_sizes),
        aspect_ratios=(tuple(cfg.aspect_ratios),) * num_levels,
    )
    rpn_head = RPNHead(fpn.out_channels, anchor_generator.num_anchors_per_location()[0])
    # RoIs are pooled from the trunk levels only (torchvision's mobile FPNs do the same:
    # the max-pooled level exists for large anchors).
    box_roi_pool = MultiScaleRoIAlign(
        featmap_names=[info.name for info in infos],
        output_size=fpn.roi_output_size,
        sampling_ratio=cfg.roi_sampling_ratio,
    )
    box_head = TwoMLPHead(fpn.out_channels * fpn.roi_output_size**2, fpn.representation_size)
    box_predictor = FastRCNNPredictor(fpn.representation_size, num_classes)
    model = FasterRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchor_generator,
        rpn_head=rpn_head,
        box_roi_pool=box_roi_pool,
        box_head=box_head,
        box_predictor=box_predictor,
        **_common_kwargs(cfg),
    )
    model.backbone_load_report = load_report  # what weights_backbone brought; shown by tools
    return model
