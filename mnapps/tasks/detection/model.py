"""Detector checkpoints: rebuilding a trained detector, and loading a whole one to fine-tune.

This module owns reading detection checkpoints (:class:`mnapps.checkpoint.Checkpoint`) into
models: :func:`load_detector` for evaluation/inference, and :func:`load_detector_weights`,
which keeps every tensor of a whole detector that fits and re-initialises the class predictors
when the class count changes (fine-tuning, ``train_det --weights``); and what export makes of a
detector (:func:`det_export_plan`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from mnapps.checkpoint import Checkpoint, read_checkpoint, read_task_checkpoint
from mnapps.config import load_config

from mnapps.heads import HEADS

from ..spec import ExportPlan
from .config import DetConfig, build_model

__all__ = ["load_detector", "load_detector_weights", "det_export_plan", "CLASS_PREDICTOR_PREFIXES"]

CLASS_PREDICTOR_PREFIXES = ("head.classification_head.", "roi_heads.box_predictor.")
_BN_COUNTER = "num_batches_tracked"


def load_detector(
    checkpoint: str | os.PathLike | dict[str, Any] | Checkpoint,
    device: str | torch.device = "cpu",
    config: DetConfig | str | os.PathLike | None = None,
) -> tuple[nn.Module, DetConfig]:
    """Rebuild a detector from an mnapps detection checkpoint, in eval mode on ``device``.

    Args:
        checkpoint: path of ``best.pt``/``last.pt`` (or the loaded dict).
        device: where the model goes.
        config: a :class:`DetConfig` or YAML path to use instead of the stored config (its
            class information is taken from the checkpoint when it has none).

    Returns:
        ``(model, cfg)``; ``cfg.model`` holds ``num_classes``, ``class_names`` and
        ``category_ids`` of the training data.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: not a detection checkpoint, or weights that do not fit the config.
    """
    record, stored_cfg = read_task_checkpoint(
        checkpoint, "detection", DetConfig, "pass the best.pt or last.pt written by tools/train_det.py"
    )
    source = record.origin
    if config is None:
        cfg = stored_cfg
    else:
        cfg = config if isinstance(config, DetConfig) else load_config(config, DetConfig)
        if cfg.model.num_classes is None:
            cfg = dataclasses.replace(
                cfg,
                model=dataclasses.replace(
                    cfg.model,
                    num_classes=stored_cfg.model.num_classes,
                    class_names=stored_cfg.model.class_names,
                    category_ids=stored_cfg.model.category_ids,
                ),
            )
    if cfg.model.num_classes is None:
        raise ValueError(f"{source}: the config does not say how many classes the model has (model.num_classes)")
    model = build_model(cfg, cfg.model.num_classes)
    try:
        model.load_state_dict(record.weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(f"{source}: the weights do not fit the {cfg.model.head} model of the config ({first})") from None
    return model.to(device).eval(), cfg


def _class_count(checkpoint: Checkpoint) -> Any:
    return checkpoint.model_config.get("num_classes", "?")


def load_detector_weights(
    model: nn.Module, weights: str | os.PathLike | dict[str, Any] | Checkpoint, num_classes: int | None = None
) -> list[str]:
    """Load a whole detector checkpoint into ``model``: every tensor that fits.

    Class-predictor tensors (:data:`CLASS_PREDICTOR_PREFIXES`) whose shape differs because
    the class count differs keep ``model``'s fresh initialisation; box predictors, extra
    layers and the trunk must fit. A BatchNorm ``num_batches_tracked`` counter that one side
    lacks is passed over, so a frozen-BN model (``backbone.frozen_bn``) starts from a detector
    trained with ordinary BatchNorm, and the other way round. ``num_classes`` (the model's,
    background included) is only for the report.

    Returns:
        Report lines: what was loaded and, when it happened, one line naming the
        re-initialised class predictors with both shapes.

    Raises:
        ValueError: not a detection checkpoint, or other tensors missing or of another shape
            (the architectures differ).
    """
    checkpoint = read_checkpoint(weights)
    source = checkpoint.origin
    checkpoint.require_task("detection", "pass a detector checkpoint (train_det's best.pt or an imported one)")
    stored, own = checkpoint.weights, model.state_dict()
    fitting, reinitialised, problems = {}, [], []
    for key, value in own.items():
        if key not in stored:
            if not key.endswith(_BN_COUNTER):
                problems.append(f"{key} missing")
        elif stored[key].shape == value.shape:
            fitting[key] = stored[key]
        elif key.startswith(CLASS_PREDICTOR_PREFIXES):
            reinitialised.append(f"{key} {list(stored[key].shape)} -> {list(value.shape)}")
        else:
            problems.append(f"{key} {list(stored[key].shape)} vs {list(value.shape)}")
    # BatchNorm's step counter is not a weight, and FrozenBatchNorm2d (backbone.frozen_bn) has none:
    # one side lacking it is no misfit, so a detector trained either way starts the other.
    problems += [f"{key} not in the model" for key in stored if key not in own and not key.endswith(_BN_COUNTER)]
    if problems:
        raise ValueError(
            f"{source} does not fit the configured {type(model).__name__}: {'; '.join(problems[:4])}"
            f"{' ...' if len(problems) > 4 else ''}; fine-tune with the checkpoint's own model settings"
        )
    model.load_state_dict(fitting, strict=False)
    lines = [f"loaded {len(fitting)} of {len(own)} tensors from {source}"]
    if reinitialised:
        kernels = [entry for entry in reinitialised if entry.split(" ")[0].endswith(".weight")]
        others = len(reinitialised) - len(kernels)
        lines.append(
            f"class predictors re-initialised ({_class_count(checkpoint)} classes in the checkpoint, "
            f"{num_classes or '?'} in the data, background included): {', '.join(kernels)}"
            + (f" (and {others} bias tensor(s))" if others else "")
        )
    return lines


def det_export_plan(checkpoint: Checkpoint, model: nn.Module, cfg: DetConfig) -> ExportPlan:
    """How export makes a graph of the detector: the kind its :class:`mnapps.heads.HeadSpec` names."""
    graph = HEADS[cfg.model.head].graph
    if graph is None:
        raise ValueError(f"{checkpoint.origin}: exporting the {cfg.model.head!r} head is not supported")
    metadata = {"task": "detection", "head": cfg.model.head, "class_names": list(cfg.model.class_names),
                "category_ids": list(cfg.model.category_ids)}
    return ExportPlan(graph, metadata, accuracy="coco", own_data=checkpoint.source is None)
