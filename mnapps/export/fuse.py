"""Folding BatchNorm into the convolution before it, for inference and export.

In eval mode a BatchNorm is a fixed per-channel affine map ``y = gamma * (x - mean) /
sqrt(var + eps) + beta``; applied to a convolution's output it can be merged into the
convolution's weights and bias (``W' = W * s``, ``b' = (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``), removing one memory pass per layer. MobileNetV1 has 27
conv + BN pairs, each followed by a cheap ReLU6, so the folded network is mostly
convolutions: the form every fast path here (channels_last eager, ``torch.compile``, ONNX
Runtime, int8) starts from.

This module owns :func:`fold_batchnorm` (a folded *copy* of any model) and
:func:`count_batchnorms`. Pairs are folded only where the order of execution is certain:
consecutive children of an ``nn.Sequential`` (mnapps' ``ConvBNAct`` and torchvision's
``Conv2dNormActivation`` are both Sequentials), which covers the MobileNetV1 trunk and the
torchvision SSD / Faster R-CNN / face heads built on it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["fold_batchnorm", "fold_conv_bn", "count_batchnorms", "BATCHNORM_TYPES"]

BATCHNORM_TYPES = (nn.BatchNorm2d, FrozenBatchNorm2d)


def count_batchnorms(model: nn.Module) -> int:
    """Number of BatchNorm2d / FrozenBatchNorm2d modules left in ``model``."""
    return sum(isinstance(m, BATCHNORM_TYPES) for m in model.modules())


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> None:
    """Merge ``bn`` (eval-mode statistics) into ``conv`` in place; ``conv`` gains a bias.

    Args:
        conv: a Conv2d (any subclass, e.g. TF-"SAME" padding) with ``out_channels == C``.
        bn: a BatchNorm2d or FrozenBatchNorm2d over ``C`` channels.

    Raises:
        ValueError: channel counts differ, or the BatchNorm has no running statistics.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"cannot fold {type(bn).__name__} without running statistics "
            "(track_running_stats=False); it normalises with batch statistics even in eval mode"
        )
    if conv.out_channels != bn.running_mean.numel():
        raise ValueError(
            f"cannot fold a {bn.running_mean.numel()}-channel BatchNorm into a conv with "
            f"{conv.out_channels} output channels"
        )
    weight = conv.weight
    # Fold in float64: the result is then exact to the last float32 bit in almost every entry.
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(bn.running_var, dtype=torch.float64)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(bn.running_mean, dtype=torch.float64)
    scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    new_weight = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    new_bias = (bias - bn.running_mean.double()) * scale + beta
    conv.weight = nn.Parameter(new_weight.to(weight.dtype), requires_grad=weight.requires_grad)
    conv.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=weight.requires_grad)


def _fold_in_place(module: nn.Module) -> int:
    folded = 0
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, BATCHNORM_TYPES):
                fold_conv_bn(conv, bn)
                # Identity keeps the child's name, so state-dict keys of the rest do not move.
                module._modules[second] = nn.Identity()
                folded += 1
    for child in module.children():
        folded += _fold_in_place(child)
    return folded


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` in eval mode with every Conv2d -> BatchNorm pair folded.

    The result computes the same function as ``model.eval()`` (to float32 rounding, about
    1e-6 relative) with one layer fewer per pair. BatchNorms that do not directly follow a
    convolution inside an ``nn.Sequential`` are left as they are (still correct, just not
    faster); :func:`count_batchnorms` on the result tells how many remain.

    Args:
        model: any module; it is not modified unless ``inplace``.
        inplace: fold ``model`` itself instead of a deep copy (saves memory for big models).

    Returns:
        The folded model, in eval mode, with ``folded_batchnorms`` (int) set on it.
    """
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    target.folded_batchnorms = _fold_in_place(target)
    return target
