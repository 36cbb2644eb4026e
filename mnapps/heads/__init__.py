"""Detection heads on the MobileNetV1 trunk, and :data:`HEADS`: the one table ``--head`` reads.

Each entry of :data:`HEADS` says everything the rest of mnapps needs about a head: its builder
(``build(section_cfg, *, num_classes, backbone_cfg, weights_backbone)`` returning a torchvision
detector that takes ``list[Tensor[3, H, W]]`` in [0, 1]), the config section that holds its
settings (an attribute of :class:`mnapps.tasks.detection.DetModelConfig`) with that section's
dataclass, the config it trains with when ``tools/train_det.py`` is given no ``--config``, and
the fixed input size it resizes to (None when it keeps the aspect ratio). Adding a head is one
entry here plus its builder; ``--head`` choices, defaults and checks all derive from this table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from mnapps.config import BackboneConfig

from .faster_rcnn import FasterRCNNConfig, build_faster_rcnn, build_faster_rcnn_fpn
from .ssd import SSDConfig, build_ssd, build_ssdlite

__all__ = ["HeadSpec", "HEADS", "head_spec", "build_detector"]


@dataclass(frozen=True)
class HeadSpec:
    """What mnapps needs to know about one detection head (see the module docstring)."""

    build: Callable[..., nn.Module]
    section: str
    config_cls: type
    default_config: str  # a file name in configs/
    input_size: Callable[[Any], int | None]  # section config -> fixed square input side, or None
    # Fewest images a training step may see (SSD: 2, its 1x1 extra maps cannot batch-normalise one).
    min_batch_images: int = 1


HEADS: dict[str, HeadSpec] = {
    "ssd": HeadSpec(build_ssd, "ssd", SSDConfig, "ssd_mnv1_a050_r192_shapes.yaml", lambda c: c.size, 2),
    "ssdlite": HeadSpec(build_ssdlite, "ssd", SSDConfig, "ssdlite_mnv1_a050_r192_shapes.yaml", lambda c: c.size, 2),
    "faster_rcnn": HeadSpec(
        build_faster_rcnn, "faster_rcnn", FasterRCNNConfig, "faster_rcnn_mnv1_a025_r256_shapes.yaml", lambda c: None
    ),
    "faster_rcnn_fpn": HeadSpec(
        build_faster_rcnn_fpn, "faster_rcnn", FasterRCNNConfig, "faster_rcnn_fpn_mnv1_a025_r256_shapes.yaml",
        lambda c: None,
    ),
}


def head_spec(head: str) -> HeadSpec:
    """The :data:`HEADS` entry of ``head``; an unknown name is a ValueError listing the valid ones."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {sorted(HEADS)}")
    return HEADS[head]


def build_detector(
    head: str,
    section_cfg: Any,
    *,
    num_classes: int,
    backbone_cfg: BackboneConfig | None = None,
    weights_backbone: str | os.PathLike | dict[str, Any] | None = None,
) -> nn.Module:
    """Build the detector ``head`` from its config section.

    Args:
        head: a key of :data:`HEADS`.
        section_cfg: that head's settings (an instance of ``HEADS[head].config_cls``).
        num_classes: classes including background.
        backbone_cfg: trunk settings (see :func:`mnapps.backbones.prepare_trunk`).
        weights_backbone: an mnapps checkpoint or state dict whose MobileNetV1 trunk is loaded.
    """
    spec = head_spec(head)
    if not isinstance(section_cfg, spec.config_cls):
        raise TypeError(f"head {head!r} takes a {spec.config_cls.__name__}, got {type(section_cfg).__name__}")
    return spec.build(
        section_cfg, num_classes=num_classes, backbone_cfg=backbone_cfg, weights_backbone=weights_backbone
    )
