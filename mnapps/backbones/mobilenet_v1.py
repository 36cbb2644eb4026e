"""MobileNetV1 (Howard et al., 2017, arXiv 1704.04861) and its features API.

This module owns the backbone every mnapps head is built on: the paper's architecture
(Table 1), its two global hyper-parameters (the width multiplier ``width_mult``; the
resolution multiplier is simply the input size), the paper's ablation variants
(``conv``: Table 4's full-convolution MobileNet, ``shallow``: Table 5's network without
the five 14x14x512 separable blocks), TF-slim compatibility options (ReLU6, BN epsilon,
TF "SAME" padding) and the contract heads use: named feature outputs whose channel counts
and strides are known without running the model (:meth:`MobileNetV1.feature_info`,
:meth:`MobileNetV1.features_extractor`, :meth:`MobileNetV1.split_at`). Heads never index
the layer list themselves.

Tensor contract: ``forward(x)`` takes ``x: Tensor[N, 3, H, W]`` already standardised the
way the weights expect (TF-slim weights: RGB scaled to [-1, 1]) and returns class logits
``Tensor[N, num_classes]``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = [
    "MobileNetV1",
    "FeatureInfo",
    "make_divisible",
    "mobilenet_v1",
    "BLOCK_SETTINGS",
    "STEM_CHANNELS",
    "VARIANTS",
    "ACTIVATIONS",
]

# Paper Table 1: the stem is a full 3x3 stride-2 convolution to 32 channels ...
STEM_CHANNELS = 32
# ... then 13 depthwise-separable blocks, (output channels, depthwise stride) each.
BLOCK_SETTINGS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)
# Table 5's "Shallow MobileNet" removes the five 14x14x512 separable blocks (blocks 7..11).
SHALLOW_REMOVED_BLOCKS = frozenset({7, 8, 9, 10, 11})
VARIANTS = ("standard", "conv", "shallow")
ACTIVATIONS = ("relu", "relu6")
# Five stride-2 stages: the smallest input that keeps a non-empty final map is 32 pixels.
TOTAL_STRIDE = 32


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` without losing more than 10%.

    The TF-slim and timm convention for thinned networks; with the paper's widths
    (1.0, 0.75, 0.5, 0.25) every layer is already a multiple of 8, so counts are exact.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclass(frozen=True)
class FeatureInfo:
    """What a head needs to know about one named feature map, without running the model."""

    name: str
    channels: int
    stride: int


class Conv2dSame(nn.Conv2d):
    """A Conv2d that pads like TensorFlow's ``padding="SAME"``.

    TF pads ``max((ceil(in / s) - 1) * s + k - in, 0)`` pixels in total and puts the extra
    pixel at the bottom/right; on a stride-2 3x3 layer with an even input that is 0 top/left
    and 1 bottom/right. Ported TF-slim weights only reproduce TensorFlow's logits with this.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)

    @staticmethod
    def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
        effective_kernel = (kernel - 1) * dilation + 1
        total = max((math.ceil(size / stride) - 1) * stride + effective_kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        top, bottom = self._same_pad(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = self._same_pad(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _activation(name: str) -> nn.Module:
    return nn.ReLU6(inplace=True) if name == "relu6" else nn.ReLU(inplace=True)


class ConvBNAct(nn.Sequential):
    """conv -> BN -> activation; children are named ``conv``, ``bn``, ``act``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        *,
        groups: int = 1,
        activation: str,
        bn_eps: float,
        bn_momentum: float,
        tf_padding: bool,
    ) -> None:
        if tf_padding:
            conv: nn.Conv2d = Conv2dSame(
                in_channels, out_channels, kernel_size, stride, groups=groups, bias=False
            )
        else:
            conv = nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding=kernel_size // 2,
                groups=groups,
                bias=False,
            )
        super().__init__(
            OrderedDict(
                conv=conv,
                bn=nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum),
                act=_activation(activation),
            )
        )


class DepthwiseSeparable(nn.Sequential):
    """Paper Fig. 3 (right): 3x3 depthwise + BN + act, then 1x1 pointwise + BN + act."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, **layer_kwargs) -> None:
        super().__init__(
            OrderedDict(
                depthwise=ConvBNAct(
                    in_channels, in_channels, 3, stride, groups=in_channels, **layer_kwargs
                ),
                pointwise=ConvBNAct(in_channels, out_channels, 1, 1, **layer_kwargs),
            )
        )


class FullConvBlock(nn.Sequential):
    """Table 4's "Conv MobileNet": the separable block replaced by one full 3x3 convolution."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, **layer_kwargs) -> None:
        super().__init__(
            OrderedDict(conv=ConvBNAct(in_channels, out_channels, 3, stride, **layer_kwargs))
        )


class MobileNetV1(nn.Module):
    """MobileNetV1 classifier whose trunk doubles as the backbone of every mnapps head.

    Args:
        width_mult: the paper's alpha; every layer's channels become
            ``make_divisible(c * width_mult, 8)``. Must be > 0 (the paper uses 0.25..1).
        num_classes: classifier outputs (1000 for ImageNet, 1001 for TF-slim's with
            background). ``0`` builds a trunk without classifier.
        variant: ``"standard"``, ``"conv"`` (Table 4) or ``"shallow"`` (Table 5).
        activation: ``"relu"`` (the paper) or ``"relu6"`` (TF-slim and the TF Object
            Detection API; the default, because every released checkpoint uses it).
        bn_eps, bn_momentum: BatchNorm settings (TF-slim: eps 1e-3, decay 0.9997, i.e.
            PyTorch momentum 3e-4).
        tf_padding: pad like TF "SAME" (needed to reproduce TF-slim logits exactly).
        frozen_bn: replace every BatchNorm by :class:`torchvision.ops.misc.FrozenBatchNorm2d`
            (statistics and affine fixed), the usual choice when fine-tuning detectors with
            small per-device batches.
        dropout: dropout before the classifier (TF-slim trains with keep_prob 0.999).

    Children, in order, are ``stem``, ``block1`` .. ``block13`` (the shallow variant lacks
    7..11, the names of the others do not move), ``pool``, ``dropout``, ``classifier``.
    """

    def __init__(
        self,
        width_mult: float = 1.0,
        num_classes: int = 1000,
        *,
        variant: str = "standard",
        activation: str = "relu6",
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        tf_padding: bool = False,
        frozen_bn: bool = False,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not isinstance(width_mult, (int, float)) or not width_mult > 0:
            raise ValueError(f"width_mult must be > 0 (the paper uses 0.25..1.0), got {width_mult!r}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {list(ACTIVATIONS)}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        self.width_mult = float(width_mult)
        self.variant = variant
        self.activation = activation
        self.tf_padding = tf_padding
        self.in_channels = in_channels
        self.num_classes = num_classes
        layer_kwargs = dict(
            activation=activation, bn_eps=bn_eps, bn_momentum=bn_momentum, tf_padding=tf_padding
        )

        infos: list[FeatureInfo] = []
        channels = make_divisible(STEM_CHANNELS * width_mult)
        stride = 2
        self.stem = ConvBNAct(in_channels, channels, 3, 2, **layer_kwargs)
        infos.append(FeatureInfo("stem", channels, stride))
        block_cls = FullConvBlock if variant == "conv" else DepthwiseSeparable
        for index, (base_out, block_stride) in enumerate(BLOCK_SETTINGS, start=1):
            if variant == "shallow" and index in SHALLOW_REMOVED_BLOCKS:
                continue
            out_channels = make_divisible(base_out * width_mult)
            self.add_module(
                f"block{index}", block_cls(channels, out_channels, block_stride, **layer_kwargs)
            )
            channels = out_channels
            stride *= block_stride
            infos.append(FeatureInfo(f"block{index}", channels, stride))
        self._feature_info: dict[str, FeatureInfo] = {info.name: info for info in infos}
        self.num_features = channels

        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()

        self._init_weights()
        if frozen_bn:
            self.freeze_bn()

    # ----------------------------------------------------------------------------------
    # construction helpers
    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def freeze_bn(self) -> "MobileNetV1":
        """Replace every BatchNorm2d by a FrozenBatchNorm2d holding the same statistics."""
        replace_bn_with_frozen(self)
        return self

    # ----------------------------------------------------------------------------------
    # features API
    @property
    def stage_names(self) -> list[str]:
        """Names of the trunk stages in forward order (``stem``, ``block1``, ...)."""
        return list(self._feature_info)

    def feature_info(self, names: Iterable[str] | None = None) -> list[FeatureInfo]:
        """Channels and stride of the named stage outputs (all stages when ``names`` is None)."""
        if names is None:
            return list(self._feature_info.values())
        return [self._info(name) for name in names]

    def _info(self, name: str) -> FeatureInfo:
        try:
            return self._feature_info[name]
        except KeyError:
            raise ValueError(
                f"unknown feature {name!r} for a {self.variant} MobileNetV1; "
                f"choose from {self.stage_names}"
            ) from None

    def stages(self, first: str | None = None, last: str | None = None) -> nn.Sequential:
        """The stages from ``first`` to ``last`` inclusive, as a Sequential that *shares*
        their modules (no copy): training it trains the backbone."""
        names = self.stage_names
        start = names.index(self._info(first).name) if first else 0
        stop = names.index(self._info(last).name) + 1 if last else len(names)
        if start >= stop:
            raise ValueError(f"stage {first!r} comes after {last!r}")
        return nn.Sequential(OrderedDict((n, getattr(self, n)) for n in names[start:stop]))

    def split_at(self, name: str) -> tuple[nn.Sequential, nn.Sequential]:
        """Split the trunk after stage ``name``: ``(stem..name, rest)``, modules shared.

        Faster R-CNN (paper Sec. 4.6, TF Object Detection API) runs its RPN on the first part
        and uses the second as the per-RoI box head.
        """
        names = self.stage_names
        index = names.index(self._info(name).name)
        if index == len(names) - 1:
            raise ValueError(f"cannot split after the last stage {name!r}")
        return self.stages(None, name), self.stages(names[index + 1], None)

    def features_extractor(self, names: Sequence[str]) -> "FeatureExtractor":
        """A module returning ``OrderedDict[name -> Tensor]`` for the requested stages."""
        return FeatureExtractor(self, names)

    def forward_features(self, x: Tensor) -> Tensor:
        self._check_input(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(self.dropout(x))

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(
                f"MobileNetV1 expects a batch Tensor[N, C, H, W], got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"MobileNetV1 expects {self.in_channels} input channels, got {x.shape[1]} "
                f"(shape {tuple(x.shape)}); convert grayscale/RGBA images to RGB first"
            )
        if min(x.shape[-2:]) < TOTAL_STRIDE:
            raise ValueError(
                f"input {tuple(x.shape[-2:])} is too small: MobileNetV1 has five stride-2 "
                f"stages and needs at least {TOTAL_STRIDE}x{TOTAL_STRIDE} pixels"
            )


class FeatureExtractor(nn.Module):
    """Runs the trunk up to the deepest requested stage and returns the requested outputs.

    Attributes:
        out_channels: ``{name: channels}`` of each output, in request order.
        strides: ``{name: stride}`` of each output.
    """

    def __init__(self, backbone: MobileNetV1, names: Sequence[str]) -> None:
        super().__init__()
        if not names:
            raise ValueError("ask for at least one feature name")
        infos = backbone.feature_info(names)
        order = backbone.stage_names
        self.return_names = [info.name for info in infos]
        last = max(order.index(n) for n in self.return_names)
        self.body = backbone.stages(None, order[last])
        self.out_channels = {info.name: info.channels for info in infos}
        self.strides = {info.name: info.stride for info in infos}
        self._check_input = backbone._check_input

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        self._check_input(x)
        wanted = set(self.return_names)
        found: dict[str, Tensor] = {}
        for name, stage in self.body.named_children():
            x = stage(x)
            if name in wanted:
                found[name] = x
        return OrderedDict((name, found[name]) for name in self.return_names)


def replace_bn_with_frozen(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            replace_bn_with_frozen(child)


def mobilenet_v1(width_mult: float = 1.0, num_classes: int = 1000, **kwargs) -> MobileNetV1:
    """Build a MobileNetV1; keyword arguments as :class:`MobileNetV1`."""
    return MobileNetV1(width_mult, num_classes, **kwargs)
