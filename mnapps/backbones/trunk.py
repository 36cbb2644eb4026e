"""One way to prepare a MobileNetV1 trunk for any head: build it, load weights, freeze stages.

Every model in mnapps (SSD, SSDLite, both Faster R-CNNs, the face student, the classifier) gets
its trunk from :func:`prepare_trunk`, so a backbone config means the same thing everywhere:

* **weights**: any mnapps checkpoint (classifier, detector, face student) or state dict; only
  trunk tensors move, matched by the trunk's own stage names (``stem.conv.weight``,
  ``block7.pointwise.bn.running_mean``) whatever prefix the source model puts in front. A
  tensor that the source lacks, one it has in excess, or one of another shape is an error naming
  the first such tensor (and both shapes), unless ``backbone.strict_weights`` is false, in which
  case the mismatches are only listed in the :class:`BackboneLoadReport`.
* **trainable_stages** (torchvision's ``trainable_layers``): the number of trunk stages, counted
  from the deepest, that train. The others are frozen: ``requires_grad=False`` *and* their
  BatchNorms become :class:`~torchvision.ops.misc.FrozenBatchNorm2d`, because train mode would
  otherwise keep moving their running statistics away from what the frozen filters expect.
  ``None`` trains every stage; ``0`` freezes the whole trunk.
* **frozen_bn** freezes every BatchNorm of the trunk (statistics and affine), trainable stages
  included, as detection fine-tuning with small batches usually wants.

Weights are loaded before any freezing, so frozen BatchNorms keep the loaded statistics.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mnapps.checkpoint import read_checkpoint
from mnapps.config import BackboneConfig
from mnapps.weights import resolve_weights

from .mobilenet_v1 import MobileNetV1, replace_bn_with_frozen

__all__ = [
    "BackboneLoadReport",
    "extract_backbone_state",
    "load_backbone_weights",
    "freeze_stages",
    "build_backbone",
    "prepare_trunk",
]

WeightsSource = str | os.PathLike | dict[str, Any]

# A trunk parameter's canonical name starts at its stage: "stem.conv.weight",
# "block7.pointwise.bn.running_mean". Whatever comes before (backbone.body., features., ...)
# is the embedding model's business.
_TRUNK_KEY = re.compile(r"(?:^|\.)((?:stem|block\d+)\.(?:conv|bn|depthwise|pointwise)\..*)$")


def extract_backbone_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical-named MobileNetV1 trunk tensors found anywhere in ``state_dict``."""
    found: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _TRUNK_KEY.search(key)
        if match and match.group(1) not in found:
            found[match.group(1)] = value
    return found


@dataclass
class BackboneLoadReport:
    """What :func:`load_backbone_weights` did; ``str()`` is a readable summary."""

    source: str = ""
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # trunk tensors the source lacked
    unexpected: list[str] = field(default_factory=list)  # source trunk tensors with no target
    shape_mismatch: list[str] = field(default_factory=list)  # "name (source shape) vs (target shape)"

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def first_problem(self) -> str:
        """The first mismatch, in words (empty when the weights fit exactly)."""
        if self.shape_mismatch:
            return f"tensor {self.shape_mismatch[0]} (checkpoint vs model)"
        if self.missing:
            return f"tensor {self.missing[0]} is in the model but not in the checkpoint"
        if self.unexpected:
            return f"tensor {self.unexpected[0]} is in the checkpoint but not in the model"
        return ""

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} backbone tensors" + (f" from {self.source}" if self.source else "")]
        for label, keys in (
            ("missing in checkpoint", self.missing),
            ("unexpected in checkpoint", self.unexpected),
            ("shape mismatch", self.shape_mismatch),
        ):
            if keys:
                shown = ", ".join(keys[:6]) + (f", ... (+{len(keys) - 6})" if len(keys) > 6 else "")
                lines.append(f"{label}: {len(keys)} ({shown})")
        return "; ".join(lines)


def _source_state(path_or_state: WeightsSource) -> tuple[str, dict[str, torch.Tensor]]:
    if isinstance(path_or_state, (str, os.PathLike)):
        name, state = str(path_or_state), read_checkpoint(resolve_weights(path_or_state)).weights
    else:
        name, state = "the given state", read_checkpoint(path_or_state).weights
    source = extract_backbone_state(state)
    if not source:
        raise ValueError(
            f"{name} holds no MobileNetV1 trunk weights (no keys like 'stem.conv.weight' "
            f"or 'block1.depthwise.conv.weight'); is it an mnapps checkpoint?"
        )
    return name, {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}


def load_backbone_weights(
    model: nn.Module, path_or_state: WeightsSource, *, strict: bool = False
) -> BackboneLoadReport:
    """Copy the MobileNetV1 trunk from a checkpoint into ``model``'s MobileNetV1.

    ``model`` may be a bare trunk or any model holding one (a stage shared by two submodules,
    e.g. Faster R-CNN's box head reusing blocks 12-13, is filled in both places).
    ``path_or_state`` may be any mnapps checkpoint, a bare state dict, or a loaded checkpoint
    dict. With ``strict=True`` a missing, unexpected or mis-shaped trunk tensor is a
    ValueError naming the first one; otherwise the mismatches are listed in the report.
    """
    source_name, source = _source_state(path_or_state)
    # canonical trunk name -> every full key of ``model`` holding it
    targets: dict[str, list[str]] = {}
    model_state = model.state_dict()
    for full_key in model_state:
        match = _TRUNK_KEY.search(full_key)
        if match and not full_key.endswith("num_batches_tracked"):
            targets.setdefault(match.group(1), []).append(full_key)
    if not targets:
        raise ValueError(f"{type(model).__name__} contains no MobileNetV1 trunk to load weights into")
    report = BackboneLoadReport(source=source_name)
    to_load = {}
    for key, full_keys in sorted(targets.items()):
        expected = model_state[full_keys[0]]
        if key not in source:
            report.missing.append(key)
        elif source[key].shape != expected.shape:
            report.shape_mismatch.append(f"{key} {tuple(source[key].shape)} vs {tuple(expected.shape)}")
        else:
            to_load.update({full_key: source[key] for full_key in full_keys})
    report.unexpected = sorted(set(source) - set(targets))
    if strict and not report.complete:
        problems = len(report.missing) + len(report.unexpected) + len(report.shape_mismatch)
        raise ValueError(
            f"backbone weights from {source_name} do not fit this MobileNetV1: {report.first_problem()}"
            f"{f' (and {problems - 1} more)' if problems > 1 else ''}. Use the backbone width_mult/variant the "
            f"checkpoint was trained with, or set model.backbone.strict_weights=false to load what fits"
        )
    model.load_state_dict(to_load, strict=False)
    report.loaded = len({_TRUNK_KEY.search(k).group(1) for k in to_load})
    return report


def freeze_stages(trunk: MobileNetV1, trainable_stages: int | None) -> list[str]:
    """Freeze all but the deepest ``trainable_stages`` stages (see the module docstring).

    Returns:
        the names of the frozen stages, shallowest first.
    """
    names = trunk.stage_names
    if trainable_stages is None:
        return []
    if isinstance(trainable_stages, bool) or not isinstance(trainable_stages, int) or not 0 <= trainable_stages <= len(names):
        raise ValueError(
            f"backbone.trainable_stages must be an integer in [0, {len(names)}] (the trunk has "
            f"stages {names[0]}..{names[-1]}) or null for all, got {trainable_stages!r}"
        )
    frozen = names[: len(names) - trainable_stages]
    for name in frozen:
        stage = getattr(trunk, name)
        stage.requires_grad_(False)
        replace_bn_with_frozen(stage)
    return frozen


def build_backbone(cfg: BackboneConfig, num_classes: int = 0, *, dropout: float = 0.0) -> MobileNetV1:
    """The bare MobileNetV1 that ``cfg`` describes (no weights, nothing frozen); ``dropout``
    before its classifier."""
    return MobileNetV1(
        cfg.width_mult,
        num_classes,
        dropout=dropout,
        variant=cfg.variant,
        activation=cfg.activation,
        bn_eps=cfg.bn_eps,
        bn_momentum=cfg.bn_momentum,
        tf_padding=cfg.tf_padding,
        frozen_bn=False,
    )


def prepare_trunk(
    cfg: BackboneConfig, *, num_classes: int = 0, weights: WeightsSource | None = None, dropout: float = 0.0
) -> tuple[MobileNetV1, BackboneLoadReport | None]:
    """Build the trunk ``cfg`` describes, load ``weights`` into it, then freeze what ``cfg`` asks.

    Args:
        cfg: backbone settings (``strict_weights``, ``trainable_stages``, ``frozen_bn`` as in
            the module docstring).
        num_classes: size of the trunk's own classifier (0: none, as every head wants).
        weights: an mnapps checkpoint path or state dict whose trunk initialises this one.
        dropout: dropout before the trunk's own classifier.

    Returns:
        ``(trunk, report)``; ``report`` is None when no weights were given.
    """
    trunk = build_backbone(cfg, num_classes, dropout=dropout)
    report = None
    if weights is not None:
        report = load_backbone_weights(trunk, weights, strict=cfg.strict_weights)
    if cfg.frozen_bn:
        trunk.freeze_bn()
    freeze_stages(trunk, cfg.trainable_stages)
    return trunk, report

