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

import torch.nn.functional as F
from torch import Tensor, nn

from mnapps.backbones import MobileNetV1, prepare_trunk
from mnapps.config import BackboneConfig

__all__ = ["FaceModelConfig", "FaceEmbedder", "PooledTrunkEmbedder", "build_face_embedder"]


@dataclass(frozen=True)
class FaceModelConfig:
    """The student's architecture.

    Attributes:
        backbone: the MobileNetV1 trunk (width multiplier, activation, BN settings, ...).
        input_size: side the trunk runs at (the paper: 160 or 128).
        embedding_dim: output dimension; must equal the teacher's (512 for FaceNet).
        dropout: dropout on the pooled features before the embedding layer.
        frozen_embedding_bn: the embedding BatchNorm normalises with its running statistics in
            training too and never updates them (its scale and shift still train). For a layer
            solved in closed form on clean crops (``warm_start``): batches of augmented or mixed
            views would otherwise pull its statistics away from what real faces need.
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    input_size: int = 160
    embedding_dim: int = 512
    dropout: float = 0.0
    frozen_embedding_bn: bool = False


class FaceEmbedder(nn.Module):
    """MobileNetV1 trunk -> average pool -> dropout -> Linear -> BatchNorm1d -> L2 normalisation.

    Args:
        trunk: a :class:`MobileNetV1` built with ``num_classes=0``; its ``forward`` returns the
            pooled (and, with its ``dropout`` argument, dropped-out) features ``[N, C]``.
        embedding_dim: output dimension (the teacher's: 512).
        input_size: side the trunk runs at; other inputs are resized (bilinear, antialiased).
        frozen_embedding_bn: normalise with the running statistics in training too (see
            :class:`FaceModelConfig`).

    Forward:
        ``images: Tensor[N, 3, H, W]`` RGB in [0, 1] -> ``Tensor[N, embedding_dim]`` with unit
        L2 norm. Children: ``backbone`` (trunk keys ``backbone.stem.*``, ``backbone.blockN.*``,
        so :func:`mnapps.backbones.load_backbone_weights` fills it), ``embedding``,
        ``bn``.
    """

    def __init__(self, trunk: MobileNetV1, *, embedding_dim: int = 512, input_size: int = 160,
                 frozen_embedding_bn: bool = False) -> None:
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
        self.frozen_embedding_bn = bool(frozen_embedding_bn)
        nn.init.xavier_uniform_(self.embedding.weight)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FaceEmbedder expects images Tensor[N, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        features = self.backbone(images * 2.0 - 1.0)  # MobileNet standardisation: [0, 1] -> [-1, 1]
        z = self.embedding(features)
        if self.frozen_embedding_bn:
            bn = self.bn
            z = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            z = self.bn(z)
        return F.normalize(z, dim=1)


class PooledTrunkEmbedder(nn.Module):
    """A trunk's L2-normalised pooled features used as a face embedding: the no-distillation baseline.

    What a MobileNetV1 trunk (e.g. the ImageNet one a student starts from) already tells apart
    before any distillation; evaluation scores it beside student and teacher so a student's
    figure has a floor to be read against.

    Args:
        trunk: a :class:`MobileNetV1` built with ``num_classes=0``.
        input_size: side the trunk runs at; other inputs are resized (bilinear, antialiased).

    Forward:
        ``images: Tensor[N, 3, H, W]`` RGB in [0, 1] -> ``Tensor[N, C]`` unit rows (``C`` the
        trunk's ``num_features``), with the same [-1, 1] standardisation as :class:`FaceEmbedder`.
    """

    def __init__(self, trunk: MobileNetV1, *, input_size: int = 160) -> None:
        super().__init__()
        if trunk.num_classes != 0:
            raise ValueError(f"the trunk must be built with num_classes=0, got {trunk.num_classes}")
        self.backbone = trunk
        self.input_size = int(input_size)

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return F.normalize(self.backbone(images * 2.0 - 1.0), dim=1)


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
    trunk, load_report = prepare_trunk(cfg.backbone, weights=weights_backbone)
    if cfg.dropout > 0:
        trunk.dropout = nn.Dropout(cfg.dropout)
    model = FaceEmbedder(trunk, embedding_dim=cfg.embedding_dim, input_size=cfg.input_size,
                         frozen_embedding_bn=cfg.frozen_embedding_bn)
    model.backbone_load_report = load_report  # what weights_backbone brought; shown by tools
    return model
