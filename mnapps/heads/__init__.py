"""Detection heads on the MobileNetV1 trunk, and :data:`HEADS`: the one table ``--head`` reads.

Each entry of :data:`HEADS` says everything the rest of mnapps needs about a head: its builder
(``build(settings, *, num_classes, backbone_cfg, weights_backbone)`` returning a torchvision
detector that takes ``list[Tensor[3, H, W]]`` in [0, 1]), the dataclass of its settings and the
``model`` key they are read from, the config it trains with when ``tools/train_det.py`` is given
no ``--config``, the fixed input size it resizes to (None when it keeps the aspect ratio), and
the kind of ONNX graph export makes of it. The names of the shipped heads come from the
torch-free :mod:`mnapps.choices`, which the command line reads too. Adding a head is one module
with its builder plus one entry here; a plug-in adds its entry at run time
(``HEADS["mine"] = HeadSpec(...)``), before or after the task layer is imported: configs,
checkpoints and export look the head up when they meet its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from mnapps.choices import FASTER_RCNN, FASTER_RCNN_FPN, SSD, SSDLITE
from mnapps.graph_kind import GraphKind

from .faster_rcnn import FasterRCNNConfig, build_faster_rcnn, build_faster_rcnn_fpn
from .ssd import SSDConfig, build_ssd, build_ssdlite

__all__ = ["HeadSpec", "HEADS", "head_spec"]


@dataclass(frozen=True)
class HeadSpec:
    """What mnapps needs to know about one detection head (see the module docstring).

    Attributes:
        build: ``build(settings, *, num_classes, backbone_cfg, weights_backbone) -> nn.Module``.
        settings_cls: the frozen dataclass of the head's settings (``model.<section>`` in a
            config); :class:`mnapps.tasks.detection.DetModelConfig` holds an instance of it.
        section: the key under ``model`` its settings are read from (heads may share one:
            ``ssd`` and ``ssdlite`` both read ``model.ssd``).
        default_config: a file name in ``configs/``.
        input_size: settings -> the fixed square input side, or None (the head keeps the
            aspect ratio).
        min_batch_images: the fewest images a training step may see (SSD: 2, its 1x1 extra maps
            cannot batch-normalise one).
        graph: the ONNX graph export makes of it; None: not exportable.
    """

    build: Callable[..., nn.Module]
    settings_cls: type
    section: str
    default_config: str
    input_size: Callable[[Any], int | None]
    min_batch_images: int = 1
    graph: GraphKind | None = None


def _ssd_size(settings: SSDConfig) -> int:
    return settings.size


def _keeps_aspect_ratio(settings: FasterRCNNConfig) -> None:
    return None


HEADS: dict[str, HeadSpec] = {
    SSD.name: HeadSpec(build_ssd, SSDConfig, "ssd", SSD.default_config, _ssd_size, 2, GraphKind.SSD),
    SSDLITE.name: HeadSpec(build_ssdlite, SSDConfig, "ssd", SSDLITE.default_config, _ssd_size, 2, GraphKind.SSD),
    FASTER_RCNN.name: HeadSpec(
        build_faster_rcnn, FasterRCNNConfig, "faster_rcnn", FASTER_RCNN.default_config, _keeps_aspect_ratio,
        graph=GraphKind.DETECTOR,
    ),
    FASTER_RCNN_FPN.name: HeadSpec(
        build_faster_rcnn_fpn, FasterRCNNConfig, "faster_rcnn", FASTER_RCNN_FPN.default_config, _keeps_aspect_ratio,
        graph=GraphKind.DETECTOR,
    ),
}


def head_spec(head: str) -> HeadSpec:
    """The :data:`HEADS` entry of ``head``; an unknown name is a ValueError listing the valid ones."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {sorted(HEADS)}")
    return HEADS[head]

