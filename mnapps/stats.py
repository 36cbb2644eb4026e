"""Parameter and multiply-add counts measured on the real models, beside the paper's figures.

Counts come from running each model once under :class:`torch.utils.flop_counter.FlopCounterMode`
(MACs = FLOPs / 2: the counter reports 2 FLOPs per multiply-add of convolutions and matrix
products) and from summing the model's parameters; nothing here is a closed-form formula.
Each :class:`StatsRow` names a model, knows how to build it and its input, and carries the
paper's value where the paper has one (Tables 1-14 of arXiv 1704.04861). Heads add their own
rows to :data:`ROWS` (one block per head, marked with a comment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["StatsRow", "ROWS", "count_params", "count_macs", "measure", "measure_all"]


@dataclass(frozen=True)
class StatsRow:
    """One line of the stats table.

    ``build`` returns ``(model, example_input)``; the model is run once in eval mode on the
    input (a Tensor, or a list of Tensors for torchvision detectors). ``paper_macs`` and
    ``paper_params`` are in units (not millions); ``macs_tolerance`` is relative,
    ``params_tolerance`` absolute (the paper rounds to 0.1 M).
    """

    name: str
    build: Callable[[], tuple[nn.Module, Any]]
    paper_macs: float | None = None
    paper_params: float | None = None
    macs_tolerance: float = 0.01
    params_tolerance: float = 0.05e6
    note: str = ""


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (shared modules are counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def count_macs(model: nn.Module, example: Any) -> int:
    """Multiply-adds of one forward pass of ``model`` on ``example`` (run, not estimated)."""
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(example)
    return int(counter.get_total_flops() // 2)


def measure(row: StatsRow) -> dict[str, Any]:
    model, example = row.build()
    return {"name": row.name, "params": count_params(model), "macs": count_macs(model, example)}


def measure_all(names: list[str] | None = None) -> list[dict[str, Any]]:
    rows = ROWS if not names else [r for r in ROWS if r.name in names]
    return [measure(r) for r in rows]


# ------------------------------------------------------------------------------------------
# Backbone rows: paper Tables 4-7 (1000 classes).


def _classifier(width_mult: float, resolution: int, variant: str = "standard"):
    def build() -> tuple[nn.Module, torch.Tensor]:
        from mnapps.backbones import MobileNetV1

        model = MobileNetV1(width_mult, 1000, variant=variant)
        return model, torch.zeros(1, 3, resolution, resolution)

    return build


ROWS: list[StatsRow] = [
    StatsRow("mobilenet_v1_1.0_224", _classifier(1.0, 224), 569e6, 4.2e6),
    StatsRow("mobilenet_v1_0.75_224", _classifier(0.75, 224), 325e6, 2.6e6),
    StatsRow("mobilenet_v1_0.5_224", _classifier(0.5, 224), 149e6, 1.3e6),
    StatsRow("mobilenet_v1_0.25_224", _classifier(0.25, 224), 41e6, 0.5e6),
    StatsRow("mobilenet_v1_1.0_192", _classifier(1.0, 192), 418e6, 4.2e6),
    StatsRow("mobilenet_v1_1.0_160", _classifier(1.0, 160), 290e6, 4.2e6),
    StatsRow("mobilenet_v1_1.0_128", _classifier(1.0, 128), 186e6, 4.2e6),
    StatsRow("conv_mobilenet_224", _classifier(1.0, 224, "conv"), 4866e6, 29.3e6),
    StatsRow("shallow_mobilenet_224", _classifier(1.0, 224, "shallow"), 307e6, 2.9e6),
]

# ---- SSD rows (mnapps.heads.ssd) --------------------------------------------------------

# ---- Faster R-CNN rows (mnapps.heads.faster_rcnn) ---------------------------------------

# ---- Face rows (mnapps.heads.face_embedding, facenet teacher) ----------------------------
