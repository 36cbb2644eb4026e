"""Detectors trained elsewhere: TF Object Detection API ``ssd_mobilenet_v1`` weights as an mnapps checkpoint.

This module owns :func:`import_tf_od_api_ssd_checkpoint`, which turns the weights read by
:mod:`mnapps.importers.tf_od_api` into a detection :class:`mnapps.checkpoint.Checkpoint` recording a
full :class:`DetConfig`, so every loader, ``train_det --weights`` and export rebuild the source
model from it.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path
from typing import Sequence

from mnapps.importers.tf_checkpoint import check_finite_tensors
from mnapps.checkpoint import Checkpoint
from mnapps.config import to_dict
from mnapps.importers.tf_od_api import InterpolatedAnchor, TFImportedSSD, import_tf_od_api_ssd, keep_first_classes

from .config import DetConfig, DetModelConfig

__all__ = ["import_tf_od_api_ssd_checkpoint"]


def _imported_class_names(imported: TFImportedSSD, class_names: Sequence[str] | None) -> tuple[str, ...]:
    """The foreground class names to keep, checked against the logits (fewer keep the first ones)."""
    if class_names is None:
        # face-api.js reports only logit 1 (its face score); any other source keeps every class.
        if imported.layout == "faceapi":
            return ("face",)
        return tuple(f"class_{i}" for i in range(1, imported.num_classes))
    names = tuple(str(name).strip() for name in class_names)
    if not names or not all(names) or len(names) > imported.num_classes - 1:
        raise ValueError(
            f"the model has {imported.num_classes - 1} foreground classes ({imported.num_classes} logits per "
            f"anchor, the first is background) but the class names given are {list(names)}; pass 1 to "
            f"{imported.num_classes - 1} non-empty names (fewer keep only the first classes)"
        )
    return names


def import_tf_od_api_ssd_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    size: int | None = None,
    interpolated_anchor: InterpolatedAnchor | None = None,
    class_names: Sequence[str] | None = None,
    score_threshold: float | None = None,
    nms_threshold: float | None = None,
) -> tuple[Path, TFImportedSSD]:
    """Convert TF Object Detection API ``ssd_mobilenet_v1`` weights into an mnapps detection checkpoint.

    The checkpoint (``task="detection"``, ``head="ssd"``) records a full :class:`DetConfig`:
    the backbone settings the weights need (TF padding, ReLU6, BN eps 1e-3), input size,
    anchors, ``preprocess``, sigmoid scores, class names and count, so ``load_detector`` (and
    ``infer_det``, ``eval_det``, ``export``, ``train_det --weights``) rebuild the source model.

    Args:
        source: a TF.js weights folder (or its manifest), an ``.npz`` of TF names, or a TF
            checkpoint prefix (see :func:`mnapps.importers.tf_od_api.import_tf_od_api_ssd`).
        output: the ``.pt`` to write (atomically).
        size: input side; default the file's own (TF.js), else 300.
        interpolated_anchor: the source's anchor order; default read from the file's anchors
            when it has them, else ``"last"`` (the TF OD API since 2018).
        class_names: the foreground classes, in logit order. Fewer names than classes keep only
            the first ones (exact: scores are per-class sigmoids, see
            :func:`mnapps.importers.tf_od_api.keep_first_classes`). Default: ``face`` alone for
            face-api.js's layout (it reports only that logit), ``class_1, ...`` (all) otherwise.
        score_threshold, nms_threshold: inference settings to record; default the SSD's
            (0.01) and, for NMS, 0.5 for face-api.js's layout (its own) or 0.6 (the TF OD API's).

    Returns:
        ``(path, info)``: ``info`` is the import (:class:`~mnapps.importers.tf_od_api.TFImportedSSD`)
        with the recorded ``ssd`` settings and ``class_names``.

    Raises:
        FileNotFoundError: no such source.
        ValueError: an unreadable source, tensors that do not describe an ``ssd_mobilenet_v1``,
            or class names that do not match the logits (each message names the fix).
    """
    try:
        imported = import_tf_od_api_ssd(source, size=size, interpolated_anchor=interpolated_anchor)
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{source} could not be read as TF weights ({type(exc).__name__}: {exc})") from None
    names = _imported_class_names(imported, class_names)
    if len(names) < imported.num_classes - 1:
        imported = keep_first_classes(imported, len(names))
    changes: dict[str, float] = {"nms_threshold": 0.5 if imported.layout == "faceapi" else 0.6}
    if score_threshold is not None:
        changes["score_threshold"] = score_threshold
    if nms_threshold is not None:
        changes["nms_threshold"] = nms_threshold
    ssd_cfg = dataclasses.replace(imported.ssd, **changes)
    model_cfg = DetModelConfig(
        head="ssd", backbone=imported.backbone, head_settings=ssd_cfg, num_classes=imported.num_classes,
        class_names=("__background__",) + names,
    )
    weights = imported.model.state_dict()
    check_finite_tensors(weights, str(source))  # NaN/inf weights: an error naming the tensor
    checkpoint = Checkpoint(
        task="detection", head="ssd", config=to_dict(DetConfig(model=model_cfg)), weights=weights,
        source=f"TF OD API SSD {Path(source).name} ({imported.layout} layout)",
    )
    return checkpoint.save(output), dataclasses.replace(imported, ssd=ssd_cfg, class_names=names)
