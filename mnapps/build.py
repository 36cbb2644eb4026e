"""Explicit head dispatch: the one place where a head name becomes a detector.

This module owns :data:`HEADS` (head name -> builder function, a plain dict so grep finds every
call) and :func:`build_detector`, which hands each builder its own config section of a
:class:`mnapps.engine.detection.DetConfig` plus the shared backbone settings. Every builder has
the signature ``builder(head_cfg, *, backbone_cfg, num_classes, weights_backbone=None)`` and
returns a torchvision detector taking ``list[Tensor[3, H, W]]`` in [0, 1].
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from mnapps.heads.faster_rcnn import build_faster_rcnn, build_faster_rcnn_fpn
from mnapps.heads.ssd import build_ssd, build_ssdlite

if TYPE_CHECKING:
    from mnapps.engine.detection import DetConfig

__all__ = ["HEADS", "HEAD_CONFIG_SECTIONS", "build_detector", "check_head"]

HEADS: dict[str, Callable[..., nn.Module]] = {
    "ssd": build_ssd,
    "ssdlite": build_ssdlite,
    "faster_rcnn": build_faster_rcnn,
    "faster_rcnn_fpn": build_faster_rcnn_fpn,
}

# Which attribute of ``DetConfig.model`` holds each head's settings.
HEAD_CONFIG_SECTIONS: dict[str, str] = {
    "ssd": "ssd",
    "ssdlite": "ssd",
    "faster_rcnn": "faster_rcnn",
    "faster_rcnn_fpn": "faster_rcnn",
}


def check_head(head: str) -> str:
    """Return ``head`` if it is a known head name, else raise a ValueError listing them."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {sorted(HEADS)}")
    return head


def build_detector(
    cfg: "DetConfig",
    num_classes: int,
    weights_backbone: str | os.PathLike | dict[str, Any] | None = None,
) -> nn.Module:
    """Build the detector named by ``cfg.model.head``.

    Args:
        cfg: the detection config (``model.head``, ``model.backbone`` and the head's section).
        num_classes: classes including background (``dataset.num_classes``).
        weights_backbone: optional mnapps checkpoint whose MobileNetV1 trunk is loaded.

    Raises:
        ValueError: unknown head (the message lists the valid ones) or bad head settings.
    """
    head = check_head(cfg.model.head)
    section = getattr(cfg.model, HEAD_CONFIG_SECTIONS[head])
    return HEADS[head](
        section, backbone_cfg=cfg.model.backbone, num_classes=num_classes, weights_backbone=weights_backbone
    )
