"""Face checkpoints as models: a distilled student, any checkpoint's trunk, and the export plan.

This module owns reading checkpoints (:class:`mnapps.checkpoint.Checkpoint`) into face
embedders: :func:`load_face_embedder` (a distilled student), :func:`load_trunk_embedder` (any
mnapps checkpoint's trunk as pooled features: the no-distillation baseline),
:func:`load_face_task` (the task table's loader: the model and its typed config) and
:func:`face_export_plan` (what export makes of a student).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from mnapps.backbones import prepare_trunk
from mnapps.checkpoint import Checkpoint, read_checkpoint
from mnapps.config import BackboneConfig, ConfigError, from_dict
from mnapps.heads.face_embedding import FaceEmbedder, FaceModelConfig, PooledTrunkEmbedder, build_face_embedder
from mnapps.graph_kind import GraphKind

from ..spec import ExportPlan
from .config import FaceDistillConfig

__all__ = ["load_face_embedder", "load_trunk_embedder", "load_face_task", "face_export_plan"]


def load_face_embedder(path: str | os.PathLike | Checkpoint, device: str | torch.device = "cpu") -> tuple[FaceEmbedder, Checkpoint]:
    """Rebuild a trained student from its checkpoint (``best.pt``/``last.pt`` of distillation).

    Returns:
        ``(model in eval mode on device, the checkpoint record)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the checkpoint is not a face-embedding checkpoint, or does not fit.
    """
    checkpoint = read_checkpoint(path)
    checkpoint.require_task("face", "pass the best.pt/last.pt written by tools/distill_face.py")
    try:
        model_cfg = from_dict(FaceModelConfig, checkpoint.model_config, "model")
    except ConfigError as exc:
        raise ValueError(f"{checkpoint.origin}: its model config does not fit this version of mnapps: {exc}") from None
    model = build_face_embedder(model_cfg)  # weights come from the checkpoint, not backbone.weights
    try:
        model.load_state_dict(checkpoint.weights)
    except RuntimeError as exc:
        raise ValueError(f"{checkpoint.origin}: weights do not fit the model its config describes: "
                         f"{str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), checkpoint


def _checkpoint_backbone(checkpoint: Checkpoint) -> BackboneConfig:
    """The trunk settings recorded in any mnapps checkpoint (``model.backbone``; legacy flat keys
    are nested by :func:`mnapps.checkpoint.read_checkpoint`)."""
    try:
        return from_dict(BackboneConfig, checkpoint.backbone_config, "model.backbone")
    except ConfigError as exc:
        raise ValueError(f"{checkpoint.origin}: its backbone config does not fit this version of mnapps: {exc}") from None


def load_trunk_embedder(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                        input_size: int = 160) -> PooledTrunkEmbedder:
    """The MobileNetV1 trunk of any mnapps checkpoint as a face embedder (pooled features).

    The baseline a distilled student must beat: e.g. the imported ImageNet classifier
    (``tools/import_weights.py``), which is where the few-face recipe starts. The trunk is built
    from the checkpoint's own ``model.backbone`` settings (so TF padding and ReLU6 of the TF-slim
    import are kept) and loaded strictly.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the checkpoint holds no MobileNetV1 trunk that fits its recorded settings.
    """
    checkpoint = read_checkpoint(path)
    backbone = _checkpoint_backbone(checkpoint)
    plain = BackboneConfig(width_mult=backbone.width_mult, variant=backbone.variant, activation=backbone.activation,
                           bn_eps=backbone.bn_eps, tf_padding=backbone.tf_padding)
    trunk, _ = prepare_trunk(plain, weights=checkpoint.weights)
    return PooledTrunkEmbedder(trunk, input_size=input_size).to(device).eval()


def load_face_task(checkpoint: Checkpoint) -> tuple[nn.Module, FaceDistillConfig]:
    """:func:`load_face_embedder` as the task table's loader: the student and its typed config."""
    model, record = load_face_embedder(checkpoint)
    return model, record.typed_config(FaceDistillConfig)


def face_export_plan(checkpoint: Checkpoint, model: nn.Module, cfg: FaceDistillConfig) -> ExportPlan:
    """How export makes a graph of the student: aligned crops in, unit embeddings out."""
    size = model.input_size
    metadata = {
        "task": "face",
        "input": f"images [N, 3, {size}, {size}] RGB in [0, 1] (aligned face crops)",
        "output": "embeddings [N, D], unit L2 norm",
    }
    return ExportPlan(GraphKind.TENSOR, metadata, input_size=size, output_names=("embeddings",))
