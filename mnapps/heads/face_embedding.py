"""The face-embedding student: a MobileNetV1 trunk and an embedding layer trained to mimic FaceNet.

This module owns the student of the paper's face application (Sec. 4.7, Table 14): the
MobileNetV1 trunk (any width multiplier; input 128 or 160 as in the paper, any side >= 32
accepted), global average pooling, dropout, a linear layer to the teacher's dimension (512),
BatchNorm and L2 normalisation, as FaceNet's own embedding layer does. It takes mnapps images
in [0, 1] and applies MobileNet's [-1, 1] standardisation itself (the FaceNet teacher applies
its own ``(x * 255 - 127.5) / 128``), resizing to its input size when the crops differ, so a
batch of 160x160 crops feeds teacher and a 128-pixel student alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnapps.backbones import MobileNetV1, build_backbone
from mnapps.config import BackboneConfig, ConfigError, from_dict

__all__ = ["FaceModelConfig", "FaceEmbedder", "build_face_embedder", "load_face_embedder"]


@dataclass(frozen=True)
class FaceModelConfig:
    """The student's architecture.

    Attributes:
        backbone: the MobileNetV1 trunk (width multiplier, activation, BN settings, ...).
        input_size: side the trunk runs at (the paper: 160 or 128).
        embedding_dim: output dimension; must equal the teacher's (512 for FaceNet).
        dropout: dropout on the pooled features before the embedding layer.
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    input_size: int = 160
    embedding_dim: int = 512
    dropout: float = 0.0


class FaceEmbedder(nn.Module):
    """MobileNetV1 trunk -> average pool -> dropout -> Linear -> BatchNorm1d -> L2 normalisation.

    Args:
        trunk: a :class:`MobileNetV1` built with ``num_classes=0``; its ``forward`` returns the
            pooled (and, with its ``dropout`` argument, dropped-out) features ``[N, C]``.
        embedding_dim: output dimension (the teacher's: 512).
        input_size: side the trunk runs at; other inputs are resized (bilinear, antialiased).

    Forward:
        ``images: Tensor[N, 3, H, W]`` RGB in [0, 1] -> ``Tensor[N, embedding_dim]`` with unit
        L2 norm. Children: ``backbone`` (trunk keys ``backbone.stem.*``, ``backbone.blockN.*``,
        so :func:`mnapps.engine.checkpoint.load_backbone_weights` fills it), ``embedding``,
        ``bn``.
    """

    def __init__(self, trunk: MobileNetV1, *, embedding_dim: int = 512, input_size: int = 160) -> None:
        super().__init__()
        if trunk.num_classes != 0:
            raise ValueError(f"the face trunk must be built with num_classes=0, got {trunk.num_classes}")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if input_size < 32:
            raise ValueError(f"input_size must be >= 32 pixels (five stride-2 stages), got {input_size}")
        self.backbone = trunk
        self.input_size = int(input_size)
        self.embedding_dim = int(embedding_dim)
        # No bias: the BatchNorm right after it has its own shift (as in FaceNet's bottleneck).
        self.embedding = nn.Linear(trunk.num_features, embedding_dim, bias=False)
        self.bn = nn.BatchNorm1d(embedding_dim, eps=1e-3)
        nn.init.xavier_uniform_(self.embedding.weight)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FaceEmbedder expects images Tensor[N, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        features = self.backbone(images * 2.0 - 1.0)  # MobileNet standardisation: [0, 1] -> [-1, 1]
        return F.normalize(self.bn(self.embedding(features)), dim=1)


def build_face_embedder(
    cfg: FaceModelConfig, *, weights_backbone: str | os.PathLike | None = None
) -> FaceEmbedder:
    """Build the student described by ``cfg``.

    Args:
        cfg: architecture settings.
        weights_backbone: optional mnapps checkpoint (classification, detection or face) whose
            MobileNetV1 trunk initialises the student (e.g. the TF-slim ImageNet import).

    Returns:
        A :class:`FaceEmbedder` in train mode.
    """
    if cfg.dropout < 0 or cfg.dropout >= 1:
        raise ValueError(f"model.dropout must be in [0, 1), got {cfg.dropout}")
    trunk = build_backbone(cfg.backbone, num_classes=0)
    if cfg.dropout > 0:
        trunk.dropout = nn.Dropout(cfg.dropout)
    model = FaceEmbedder(trunk, embedding_dim=cfg.embedding_dim, input_size=cfg.input_size)
    if weights_backbone is not None:
        from mnapps.engine.checkpoint import load_backbone_weights

        report = load_backbone_weights(model, weights_backbone)
        if report.missing or report.shape_mismatch:
            raise ValueError(f"backbone weights {weights_backbone} do not fit the face student: {report}")
    return model


def load_face_embedder(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[FaceEmbedder, dict[str, Any]]:
    """Rebuild a trained student from its checkpoint (``best.pt``/``last.pt`` of distillation).

    Returns:
        ``(model in eval mode on device, checkpoint dict)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the checkpoint is not a face-embedding checkpoint.
    """
    from mnapps.engine.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    config = checkpoint.get("config") or {}
    if checkpoint.get("task") != "face" or "model" not in config:
        raise ValueError(
            f"{path} is not a face-embedding checkpoint (task={checkpoint.get('task')!r}); "
            f"pass the best.pt/last.pt written by tools/distill_face.py"
        )
    try:
        model_cfg = from_dict(FaceModelConfig, config["model"], "model")
    except ConfigError as exc:
        raise ValueError(f"{path}: its model config does not fit this version of mnapps: {exc}") from None
    model = build_face_embedder(model_cfg)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint
