"""The one mnapps checkpoint format, written atomically, and backbone transfer between heads.

A checkpoint is a ``torch.save``d dict::

    {"format": "mnapps-checkpoint", "version": 1,
     "task": "classification" | "detection" | "face" | ...,
     "head": str | None,          # "ssd", "faster_rcnn", ... for detectors
     "config": dict,              # the resolved config (plain dict, see mnapps.config.to_dict)
     "model": state_dict,
     "epoch": int, "metrics": dict,
     # only in training checkpoints, for --resume:
     "optimizer", "scheduler", "scaler", "rng": ...}

Writes go to a temporary file in the same folder followed by ``os.replace`` so a run killed
mid-write never leaves a truncated checkpoint behind. :func:`load_backbone_weights` moves the
MobileNetV1 trunk between any two mnapps models (classifier -> SSD, SSD -> Faster R-CNN, ...)
by matching the trunk's own stage names, whatever prefix each model puts in front of them.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "mnapps-checkpoint"
VERSION = 1

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "load_backbone_weights",
    "BackboneLoadReport",
    "extract_backbone_state",
]


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Atomically write ``payload`` (format/version keys are added) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or a bare state dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # pickle errors, truncated files, ...
        raise ValueError(f"checkpoint {path} could not be read ({type(exc).__name__}: {exc})") from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return data
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {"format": "state_dict", "model": data, "config": None, "task": None, "head": None}
    raise ValueError(
        f"{path} is neither an mnapps checkpoint nor a state dict "
        f"(top-level keys: {sorted(data)[:8] if isinstance(data, dict) else type(data).__name__})"
    )


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

    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # trunk tensors the source lacked
    unexpected: list[str] = field(default_factory=list)  # source trunk tensors with no target
    shape_mismatch: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} backbone tensors"]
        for label, keys in (
            ("missing in checkpoint", self.missing),
            ("unexpected in checkpoint", self.unexpected),
            ("shape mismatch", self.shape_mismatch),
        ):
            if keys:
                shown = ", ".join(keys[:6]) + (f", ... (+{len(keys) - 6})" if len(keys) > 6 else "")
                lines.append(f"{label}: {len(keys)} ({shown})")
        return "; ".join(lines)


def load_backbone_weights(
    model: nn.Module, path_or_state: str | os.PathLike | dict[str, Any], *, strict: bool = False
) -> BackboneLoadReport:
    """Copy the MobileNetV1 trunk from a checkpoint into ``model``'s MobileNetV1.

    ``path_or_state`` may be any mnapps checkpoint (classification, detection, face), a bare
    state dict, or an already-loaded checkpoint dict. Only trunk tensors move (the classifier
    and head layers never do). With ``strict=True`` any missing, unexpected or mis-shaped
    trunk tensor is an error; otherwise they are listed in the returned report.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        source_name = str(path_or_state)
        checkpoint = load_checkpoint(path_or_state)
    else:
        source_name = "the given state"
        checkpoint = path_or_state
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    source = extract_backbone_state(state)
    if not source:
        raise ValueError(
            f"{source_name} holds no MobileNetV1 trunk weights (no keys like 'stem.conv.weight' "
            f"or 'block1.depthwise.conv.weight'); is it an mnapps checkpoint?"
        )
    # canonical trunk name -> every full key of ``model`` holding it (a stage shared by two
    # submodules, e.g. Faster R-CNN's box head reusing blocks 12-13, appears twice).
    targets: dict[str, list[str]] = {}
    model_state = model.state_dict()
    for full_key in model_state:
        match = _TRUNK_KEY.search(full_key)
        if match and not full_key.endswith("num_batches_tracked"):
            targets.setdefault(match.group(1), []).append(full_key)
    if not targets:
        raise ValueError(f"{type(model).__name__} contains no MobileNetV1 trunk to load weights into")
    source = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    report = BackboneLoadReport()
    to_load = {}
    for key, full_keys in sorted(targets.items()):
        expected = model_state[full_keys[0]]
        if key not in source:
            report.missing.append(key)
        elif source[key].shape != expected.shape:
            report.shape_mismatch.append(f"{key} {tuple(source[key].shape)} vs {tuple(expected.shape)}")
        else:
            for full_key in full_keys:
                to_load[full_key] = source[key]
    report.unexpected = sorted(set(source) - set(targets))
    if strict and (report.missing or report.unexpected or report.shape_mismatch):
        raise ValueError(f"backbone weights from {source_name} do not fit: {report}")
    model.load_state_dict(to_load, strict=False)
    report.loaded = len(to_load) and len({_TRUNK_KEY.search(k).group(1) for k in to_load})
    return report
