"""Backbones: MobileNetV1 (the paper's network) and its TF-slim weight importer."""

from .mobilenet_v1 import FeatureInfo, MobileNetV1, make_divisible, mobilenet_v1

__all__ = ["FeatureInfo", "MobileNetV1", "make_divisible", "mobilenet_v1", "build_backbone"]


def build_backbone(cfg, num_classes: int = 0) -> MobileNetV1:
    """Build the MobileNetV1 trunk described by a :class:`mnapps.config.BackboneConfig`."""
    return MobileNetV1(
        cfg.width_mult,
        num_classes,
        variant=cfg.variant,
        activation=cfg.activation,
        bn_eps=cfg.bn_eps,
        bn_momentum=cfg.bn_momentum,
        tf_padding=cfg.tf_padding,
        frozen_bn=cfg.frozen_bn,
    )
