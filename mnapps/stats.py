"""Parameter and multiply-add counts of a model, measured by running it.

This module owns the two figures every cost column in mnapps is made of: :func:`count_params`
(distinct parameters) and :func:`count_macs` (one forward pass under
:class:`torch.utils.flop_counter.FlopCounterMode`; MACs = FLOPs / 2, since the counter reports
2 FLOPs per multiply-add of convolutions and matrix products). Nothing here is a closed-form
formula. The paper's tables, measured with these, are a lab script: ``tools/model_stats.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs"]


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
