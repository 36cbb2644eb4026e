"""Backbones: MobileNetV1 (the paper's network), the one trunk preparation every model uses, and
importers of Google's TF-slim weights."""

from .mobilenet_v1 import FeatureInfo, MobileNetV1, make_divisible, mobilenet_v1
from .trunk import BackboneLoadReport, build_backbone, freeze_stages, load_backbone_weights, prepare_trunk

__all__ = [
    "FeatureInfo",
    "MobileNetV1",
    "make_divisible",
    "mobilenet_v1",
    "BackboneLoadReport",
    "build_backbone",
    "freeze_stages",
    "load_backbone_weights",
    "prepare_trunk",
]
