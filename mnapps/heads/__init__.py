"""Detection heads on the MobileNetV1 trunk, and :data:`HEADS`: the one table ``--head`` reads.

Each entry of :data:`HEADS` says everything the rest of mnapps needs about a head: its builder
(``build(section_cfg, *, num_classes, backbone_cfg, weights_backbone)`` returning a torchvision
detector that takes ``list[Tensor[3, H, W]]`` in [0, 1]), the config section that holds its
settings with that section's dataclass (:class:`mnapps.tasks.detection.DetModelConfig` gets one
field per section of this table), the config it trains with when ``tools/train_det.py`` is given
no ``--config``, the fixed input size it resizes to (None when it keeps the aspect ratio), and
the kind of ONNX graph export makes of it. Adding a head is one module with its builder plus one
entry here; ``--head`` choices, config sections, defaults, checks and export derive from this
table (an entry added before :mod:`mnapps.tasks.detection` is imported is seen everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from torch import nn

from .faster_rcnn import FasterRCNNConfig, build_faster_rcnn, build_faster_rcnn_fpn
from .ssd import SSDConfig, build_ssd, build_ssdlite

__all__ = ["HeadSpec", "HEADS", "head_spec"]


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
    # The ONNX graph export makes: "ssd" (raw box/class outputs and anchors, post-processing
    # shared outside the graph), "detector" (the whole model, NMS included, one image per run)
    # or None (not exportable).
    export_graph: Literal["ssd", "detector"] | None = None


HEADS: dict[str, HeadSpec] = {
    "ssd": HeadSpec(build_ssd, "ssd", SSDConfig, "ssd_mnv1_a050_r192_shapes.yaml", lambda c: c.size, 2, "ssd"),
    "ssdlite": HeadSpec(
        build_ssdlite, "ssd", SSDConfig, "ssdlite_mnv1_a050_r192_shapes.yaml", lambda c: c.size, 2, "ssd"
    ),
    "faster_rcnn": HeadSpec(
        build_faster_rcnn, "faster_rcnn", FasterRCNNConfig, "faster_rcnn_mnv1_a025_r256_shapes.yaml", lambda c: None,
        export_graph="detector",
    ),
    "faster_rcnn_fpn": HeadSpec(
        build_faster_rcnn_fpn, "faster_rcnn", FasterRCNNConfig, "faster_rcnn_fpn_mnv1_a025_r256_shapes.yaml",
        lambda c: None, export_graph="detector",
    ),
}


def head_spec(head: str) -> HeadSpec:
    """The :data:`HEADS` entry of ``head``; an unknown name is a ValueError listing the valid ones."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {sorted(HEADS)}")
    return HEADS[head]

