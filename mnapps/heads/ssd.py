"""SSD and SSDLite detectors on the mnapps MobileNetV1 (paper Table 13, TF Object Detection API).

This module owns the single-shot detector head: :class:`SSDConfig` (its settings),
:class:`SSDAnchorGenerator` (the TF Object Detection API's ``ssd_anchor_generator``, which
torchvision's ``DefaultBoxGenerator`` cannot express because the lowest map carries only three
boxes), :class:`MobileNetV1SSDFeatures` (trunk maps after block 11 and block 13 plus four extra
stride-2 layers), the 1x1 box/class predictors, and the builders :func:`build_ssd` /
:func:`build_ssdlite`. The detector itself is a plain ``torchvision.models.detection.SSD``:
IoU-0.5 matching with every ground truth forced to its best anchor, hard negative mining, box
coding and NMS come from torchvision and are only configured here.

Tensor contract (torchvision's): ``images: list[Tensor[3, H, W]]`` in [0, 1] (any sizes; the
model resizes to ``size x size`` and standardises to [-1, 1] itself). Train mode takes
``targets: list[{"boxes": FloatTensor[N, 4] xyxy pixels, "labels": Int64Tensor[N]}]`` (labels
1..K, 0 is background; N may be 0) and returns ``{"bbox_regression", "classification"}`` losses.
Eval mode returns ``list[{"boxes": [M, 4] xyxy in original pixels, "labels": [M], "scores": [M]}]``.

Differences from the TF API, on purpose: by default classification uses torchvision's softmax
cross-entropy and softmax scores instead of TF's sigmoid, and images are stretched to the square
input by torchvision's bilinear resize; everything else (anchors, extra layers, predictor kernel,
box coder, matching, 3:1 mining) follows ``ssd_mobilenet_v1_coco.config``. Models imported from
TensorFlow (:mod:`mnapps.importers.tf_od_api`) set ``score_activation="sigmoid"`` (:class:`~mnapps.heads.ssd_tf.SigmoidSSD`)
and ``preprocess="tf_resize"`` or ``"tf_pad_resize"`` (:class:`~mnapps.heads.ssd_tf.TFResizeTransform`) to reproduce
their source.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.ssd import SSD, SSDScoringHead
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssdlite import SSDLiteHead

from mnapps.backbones import MobileNetV1, make_divisible, prepare_trunk
from mnapps.backbones.mobilenet_v1 import ConvBNAct
from mnapps.config import BackboneConfig

# The TF Object Detection API's input and score conventions, re-exported for their old import path.
from .ssd_tf import SigmoidSSD, TFResizeTransform, tf_pad_resize, tf_resize_bilinear

__all__ = [
    "SSDConfig",
    "SSDAnchorGenerator",
    "MobileNetV1SSDFeatures",
    "SSDPredictionHead",
    "ssd_anchor_specs",
    "tf_resize_bilinear",
    "tf_pad_resize",
    "TFResizeTransform",
    "SigmoidSSD",
    "build_ssd",
    "build_ssdlite",
]


@dataclass(frozen=True)
class SSDConfig:
    """Settings of the SSD head; the defaults are the TF API's ``ssd_mobilenet_v1_coco``.

    Attributes:
        size: square input side in pixels (the paper's resolution multiplier); images of any
            size are resized to ``size x size`` inside the model.
        lite: read only from configs and checkpoints written before the head alone chose
            SSDLite: ``head: ssd`` with ``lite: true`` is read as ``head: ssdlite`` (see
            :mod:`mnapps.tasks.detection.config`); the builders ignore it.
        feature_maps: trunk stages whose outputs feed predictors (stride 16 and 32).
        extra_depths: output depths of the extra layers appended after the last trunk map;
            each is a 1x1 conv to half depth then a 3x3 stride-2 conv (BN + activation each).
            Scaled by the backbone's width multiplier like the TF feature extractor does.
        min_depth: floor of every scaled extra-layer depth (TF ``min_depth``).
        min_scale, max_scale: anchor scales (fraction of the image side) of the first and
            last map, linearly interpolated in between.
        aspect_ratios: width/height ratios of the anchors on every map but the first.
        interpolated_scale_aspect_ratio: aspect ratio of the extra box at scale
            ``sqrt(s_k * s_k+1)`` (0 disables it).
        reduce_boxes_in_lowest_layer: the first map gets only three boxes:
            ``(lowest_layer_scale, 1)``, ``(min_scale, 2)``, ``(min_scale, 1/2)``.
        lowest_layer_scale: scale of the small square box of the reduced first map.
        box_coder_weights: ``(wx, wy, ww, wh)`` of the Faster R-CNN box coder.
        iou_threshold: anchors with IoU >= this to a ground truth are positives (and every
            ground truth is forced onto its best anchor).
        neg_pos_ratio: hard negative mining keeps this many negatives per positive.
        score_threshold, nms_threshold, detections_per_image, topk_candidates: inference
            post-processing (per-class score filter, top-k per class, class-wise NMS).
        predictor_kernel_size: kernel of the SSD head's box/class predictors (TF: 1); the
            ``ssdlite`` head's predictors are always 3x3 depthwise-separable and ignore it.
        score_activation: ``"softmax"`` over all logits (torchvision) or ``"sigmoid"`` per class
            (the TF OD API's SSDs; training then uses a per-class sigmoid loss).
        preprocess: ``"resize"`` stretches images to ``size x size`` with torchvision's
            transform; ``"tf_resize"`` stretches them with TF's legacy bilinear resize (the TF OD
            API's ``fixed_shape_resizer``); ``"tf_pad_resize"`` zero-pads bottom/right to a
            square first (face-api.js).
    """

    size: int = 300
    lite: bool = False
    feature_maps: tuple[str, ...] = ("block11", "block13")
    extra_depths: tuple[int, ...] = (512, 256, 256, 128)
    min_depth: int = 16
    min_scale: float = 0.2
    max_scale: float = 0.95
    aspect_ratios: tuple[float, ...] = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0)
    interpolated_scale_aspect_ratio: float = 1.0
    reduce_boxes_in_lowest_layer: bool = True
    lowest_layer_scale: float = 0.1
    box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    iou_threshold: float = 0.5
    neg_pos_ratio: float = 3.0
    score_threshold: float = 0.01
    nms_threshold: float = 0.6
    detections_per_image: int = 100
    topk_candidates: int = 400
    predictor_kernel_size: int = 1
    score_activation: Literal["softmax", "sigmoid"] = "softmax"
    preprocess: Literal["resize", "tf_resize", "tf_pad_resize"] = "resize"

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError(f"ssd.size must be >= 32 (five stride-2 stages), got {self.size}")
        if not self.feature_maps:
            raise ValueError("ssd.feature_maps must name at least one trunk stage, e.g. [block11, block13]")
        if any(d <= 0 for d in self.extra_depths):
            raise ValueError(f"ssd.extra_depths must be positive, got {list(self.extra_depths)}")
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(
                f"ssd.min_scale/max_scale must satisfy 0 < min <= max, got {self.min_scale}, {self.max_scale}"
            )
        if not self.aspect_ratios or any(r <= 0 for r in self.aspect_ratios):
            raise ValueError(f"ssd.aspect_ratios must be positive numbers, got {list(self.aspect_ratios)}")
        if not 0 < self.iou_threshold <= 1:
            raise ValueError(f"ssd.iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if self.neg_pos_ratio <= 0:
            raise ValueError(f"ssd.neg_pos_ratio must be > 0, got {self.neg_pos_ratio}")
        if any(w <= 0 for w in self.box_coder_weights):
            raise ValueError(f"ssd.box_coder_weights must be positive, got {list(self.box_coder_weights)}")
        if self.predictor_kernel_size not in (1, 3):
            raise ValueError(f"ssd.predictor_kernel_size must be 1 or 3, got {self.predictor_kernel_size}")
        if self.score_activation not in ("softmax", "sigmoid"):
            raise ValueError(f"ssd.score_activation must be softmax or sigmoid, got {self.score_activation!r}")
        if self.preprocess not in ("resize", "tf_resize", "tf_pad_resize"):
            raise ValueError(f"ssd.preprocess must be resize, tf_resize or tf_pad_resize, got {self.preprocess!r}")

    @property
    def num_maps(self) -> int:
        return len(self.feature_maps) + len(self.extra_depths)


# ------------------------------------------------------------------------------------------
# anchors


def ssd_anchor_specs(cfg: SSDConfig) -> list[list[tuple[float, float]]]:
    """``(scale, aspect_ratio)`` of every box per feature map, as TF's ``create_ssd_anchors``.

    Scales are ``s_k = min + (max - min) * k / (m - 1)`` for ``k = 0..m-1`` (SSD paper eq. 4
    with TF's indexing) and ``s_m = 1``. With the defaults this gives 3 boxes on the first map
    and 6 on the others.
    """
    m = cfg.num_maps
    if m == 1:
        scales = [cfg.min_scale]
    else:
        scales = [cfg.min_scale + (cfg.max_scale - cfg.min_scale) * k / (m - 1) for k in range(m)]
    scales.append(1.0)
    specs: list[list[tuple[float, float]]] = []
    for k in range(m):
        if k == 0 and cfg.reduce_boxes_in_lowest_layer:
            specs.append([(cfg.lowest_layer_scale, 1.0), (scales[0], 2.0), (scales[0], 0.5)])
            continue
        layer = [(scales[k], float(ratio)) for ratio in cfg.aspect_ratios]
        if cfg.interpolated_scale_aspect_ratio > 0:
            layer.append((math.sqrt(scales[k] * scales[k + 1]), cfg.interpolated_scale_aspect_ratio))
        specs.append(layer)
    return specs


class SSDAnchorGenerator(nn.Module):
    """Grid anchors of the TF Object Detection API's SSD, in torchvision's anchor interface.

    For map ``k`` with an ``h x w`` grid on an ``H x W`` (resized) image, the box of spec
    ``(s, a)`` at cell ``(i, j)`` is centred on ``((j + 0.5) W / w, (i + 0.5) H / h)`` with
    width ``s sqrt(a) min(H, W)`` and height ``s / sqrt(a) min(H, W)``. Boxes are not clipped
    to the image (as in TF). Order: map, then row, then column, then spec, which is the order
    in which torchvision's ``SSDScoringHead`` flattens predictions.

    Args:
        specs: per map, the ``(scale, aspect_ratio)`` list (see :func:`ssd_anchor_specs`).
    """

    def __init__(self, specs: Sequence[Sequence[tuple[float, float]]]) -> None:
        super().__init__()
        if not specs or any(len(layer) == 0 for layer in specs):
            raise ValueError("every feature map needs at least one anchor spec")
        self.specs = [list(layer) for layer in specs]
        # Unit-size (width, height) of each spec; multiplied by min(H, W) at forward time.
        self._unit_wh = [
            torch.tensor([[s * math.sqrt(a), s / math.sqrt(a)] for s, a in layer], dtype=torch.float64)
            for layer in self.specs
        ]

    def num_anchors_per_location(self) -> list[int]:
        return [len(layer) for layer in self.specs]

    def num_anchors(self, grid_sizes: Sequence[tuple[int, int]]) -> int:
        """Total anchors for feature maps of the given ``(h, w)`` sizes."""
        return sum(h * w * n for (h, w), n in zip(grid_sizes, self.num_anchors_per_location()))

    def grid_anchors(
        self,
        grid_sizes: Sequence[tuple[int, int]],
        image_size: tuple[int, int],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Anchors ``Tensor[A, 4]`` (xyxy pixels) for maps ``grid_sizes`` on an ``(H, W)`` image."""
        if len(grid_sizes) != len(self.specs):
            raise ValueError(
                f"got {len(grid_sizes)} feature maps but anchors are configured for {len(self.specs)}"
            )
        height, width = image_size
        base = min(height, width)
        boxes = []
        for (h, w), unit_wh in zip(grid_sizes, self._unit_wh):
            cy = (torch.arange(h, dtype=torch.float64) + 0.5) * (height / h)
            cx = (torch.arange(w, dtype=torch.float64) + 0.5) * (width / w)
            cy, cx = torch.meshgrid(cy, cx, indexing="ij")
            centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)  # [h*w, 1, 2]
            half = (unit_wh * base / 2).unsqueeze(0)  # [1, n, 2]
            boxes.append(torch.cat([centres - half, centres + half], dim=-1).reshape(-1, 4))
        return torch.cat(boxes).to(dtype=dtype, device=device)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        image_size = tuple(image_list.tensors.shape[-2:])
        anchors = self.grid_anchors(grid_sizes, image_size, feature_maps[0].dtype, feature_maps[0].device)
        return [anchors for _ in image_list.image_sizes]

    def __repr__(self) -> str:
        layers = ", ".join(str(len(layer)) for layer in self.specs)
        return f"{type(self).__name__}(boxes_per_map=[{layers}])"


# ------------------------------------------------------------------------------------------
# features: trunk maps + extra layers


def _init_tf_normal(module: nn.Module) -> None:
    # TF API's SSD hyper-parameters: truncated normal, stddev 0.03, for extras and predictors.
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.trunc_normal_(layer.weight, std=0.03, a=-0.06, b=0.06)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class MobileNetV1SSDFeatures(nn.Module):
    """MobileNetV1 trunk maps plus the SSD extra layers, as an ``OrderedDict`` of 6 maps.

    The trunk is held whole as ``self.trunk`` (so its keys are ``trunk.stem.*``,
    ``trunk.blockN.*`` and :func:`mnapps.backbones.trunk.load_backbone_weights` finds them);
    only the stages up to the deepest requested one are run.

    Attributes:
        out_channels: channels of each returned map, in order (torchvision's contract).
    """

    def __init__(
        self,
        trunk: MobileNetV1,
        cfg: SSDConfig,
        *,
        activation: str,
        bn_eps: float,
        bn_momentum: float,
        tf_padding: bool,
        lite: bool = False,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        infos = trunk.feature_info(cfg.feature_maps)  # ValueError listing valid stages
        stages = trunk.stage_names
        order = [stages.index(info.name) for info in infos]
        if order != sorted(order) or len(set(order)) != len(order):
            raise ValueError(f"ssd.feature_maps must be distinct trunk stages in forward order, got {list(cfg.feature_maps)}")
        self._run_stages = stages[: order[-1] + 1]
        self._return_stages = [info.name for info in infos]

        layer_kwargs = dict(activation=activation, bn_eps=bn_eps, bn_momentum=bn_momentum, tf_padding=tf_padding)
        alpha = trunk.width_mult

        def depth(d: float) -> int:
            return make_divisible(d * alpha, 8, min_value=cfg.min_depth)

        channels = infos[-1].channels
        self.out_channels = [info.channels for info in infos]
        extras = []
        for base_depth in cfg.extra_depths:
            hidden, out = depth(base_depth / 2), depth(base_depth)
            if lite:  # SSDLite: the 3x3 stride-2 conv made depthwise-separable
                block = nn.Sequential(
                    OrderedDict(
                        reduce=ConvBNAct(channels, hidden, 1, 1, **layer_kwargs),
                        depthwise=ConvBNAct(hidden, hidden, 3, 2, groups=hidden, **layer_kwargs),
                        expand=ConvBNAct(hidden, out, 1, 1, **layer_kwargs),
                    )
                )
            else:
                block = nn.Sequential(
                    OrderedDict(
                        reduce=ConvBNAct(channels, hidden, 1, 1, **layer_kwargs),
                        expand=ConvBNAct(hidden, out, 3, 2, **layer_kwargs),
                    )
                )
            extras.append(block)
            self.out_channels.append(out)
            channels = out
        self.extras = nn.ModuleList(extras)
        _init_tf_normal(self.extras)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        outputs: OrderedDict[str, Tensor] = OrderedDict()
        for name in self._run_stages:
            x = getattr(self.trunk, name)(x)
            if name in self._return_stages:
                outputs[name] = x
        for index, block in enumerate(self.extras):
            x = block(x)
            outputs[f"extra{index + 1}"] = x
        return outputs


# ------------------------------------------------------------------------------------------
# predictors


class SSDPredictionHead(nn.Module):
    """Plain convolutional box and class predictors (TF ``convolutional_box_predictor``).

    One conv per map (kernel 1 by default, with bias, no BN) producing ``A_k * num_classes``
    logits and ``A_k * 4`` box deltas; flattened by torchvision's ``SSDScoringHead`` into
    ``cls_logits: [N, A, num_classes]`` and ``bbox_regression: [N, A, 4]``.
    """

    def __init__(
        self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int, kernel_size: int = 1
    ) -> None:
        super().__init__()
        pad = kernel_size // 2
        cls_layers = nn.ModuleList(
            nn.Conv2d(c, a * num_classes, kernel_size, padding=pad) for c, a in zip(in_channels, num_anchors)
        )
        box_layers = nn.ModuleList(
            nn.Conv2d(c, a * 4, kernel_size, padding=pad) for c, a in zip(in_channels, num_anchors)
        )
        _init_tf_normal(cls_layers)
        _init_tf_normal(box_layers)
        self.classification_head = SSDScoringHead(cls_layers, num_classes)
        self.regression_head = SSDScoringHead(box_layers, 4)

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        return {"bbox_regression": self.regression_head(x), "cls_logits": self.classification_head(x)}


# ------------------------------------------------------------------------------------------
# builders


def build_ssd(
    cfg: SSDConfig,
    *,
    num_classes: int,
    backbone_cfg: BackboneConfig | None = None,
    weights_backbone: str | Path | None = None,
) -> SSD:
    """Build SSD on a MobileNetV1 trunk (the ``ssd`` head).

    Args:
        cfg: head settings.
        num_classes: classes including background (COCO: 91 in the TF API's label map).
        backbone_cfg: trunk settings (width multiplier, activation, BN, frozen stages);
            defaults to :class:`mnapps.config.BackboneConfig`.
        weights_backbone: an mnapps checkpoint (classification, e.g. the imported ImageNet
            weights, or any head's) whose trunk is loaded; None starts from scratch.

    Returns:
        a ``torchvision.models.detection.SSD`` (tensor contract in the module docstring).

    Example::

        >>> model = build_ssd(SSDConfig(size=128), num_classes=3,
        ...                   backbone_cfg=BackboneConfig(width_mult=0.25))
        >>> _ = model.eval()
        >>> out = model([torch.rand(3, 100, 120)])
        >>> sorted(out[0])
        ['boxes', 'labels', 'scores']
    """
    return _build(cfg, False, num_classes, backbone_cfg, weights_backbone)


def build_ssdlite(
    cfg: SSDConfig,
    *,
    num_classes: int,
    backbone_cfg: BackboneConfig | None = None,
    weights_backbone: str | Path | None = None,
) -> SSD:
    """Build SSDLite (the ``ssdlite`` head): :func:`build_ssd` with depthwise-separable extra
    layers and 3x3 depthwise-separable predictors (MobileNetV2 paper Sec. 6.2; TF
    ``ssdlite_mobilenet_v1_coco``); ``cfg.predictor_kernel_size`` does not apply."""
    return _build(cfg, True, num_classes, backbone_cfg, weights_backbone)


def _build(
    cfg: SSDConfig, lite: bool, num_classes: int, backbone_cfg: BackboneConfig | None, weights_backbone: str | Path | None
) -> SSD:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must count background plus at least one class (>= 2), got {num_classes!r}")
    backbone_cfg = backbone_cfg or BackboneConfig()
    trunk, load_report = prepare_trunk(backbone_cfg, weights=weights_backbone)
    features = MobileNetV1SSDFeatures(
        trunk,
        cfg,
        activation=backbone_cfg.activation,
        bn_eps=backbone_cfg.bn_eps,
        bn_momentum=backbone_cfg.bn_momentum,
        tf_padding=backbone_cfg.tf_padding,
        lite=lite,
    )
    anchor_generator = SSDAnchorGenerator(ssd_anchor_specs(cfg))
    if len(anchor_generator.specs) != len(features.out_channels):
        raise ValueError(
            f"{len(features.out_channels)} feature maps but {len(anchor_generator.specs)} anchor layers"
        )
    num_anchors = anchor_generator.num_anchors_per_location()
    if lite:
        norm = partial(nn.BatchNorm2d, eps=backbone_cfg.bn_eps, momentum=backbone_cfg.bn_momentum)
        head: nn.Module = SSDLiteHead(features.out_channels, num_anchors, num_classes, norm)
    else:
        head = SSDPredictionHead(features.out_channels, num_anchors, num_classes, cfg.predictor_kernel_size)

    model = (SigmoidSSD if cfg.score_activation == "sigmoid" else SSD)(
        features,
        anchor_generator,
        (cfg.size, cfg.size),
        num_classes,
        # [0, 1] -> [-1, 1], the TF-slim input convention of every mnapps backbone.
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        head=head,
        score_thresh=cfg.score_threshold,
        nms_thresh=cfg.nms_threshold,
        detections_per_img=cfg.detections_per_image,
        iou_thresh=cfg.iou_threshold,
        topk_candidates=cfg.topk_candidates,
    )
    # torchvision hard-codes these two; set them from the config.
    model.box_coder = det_utils.BoxCoder(weights=tuple(float(w) for w in cfg.box_coder_weights))
    model.neg_to_pos_ratio = float(cfg.neg_pos_ratio)
    if cfg.preprocess != "resize":
        model.transform = TFResizeTransform(cfg.size, pad_to_square=cfg.preprocess == "tf_pad_resize")
    model.backbone_load_report = load_report  # what weights_backbone brought; shown by tools
    return model

