"""The records a task hands the rest of mnapps: its :class:`ExportPlan` and the evaluation
contract (:class:`EvalRequest` in, :class:`Evaluation` out).

This module owns what :meth:`mnapps.tasks.task.Task.export` and :meth:`~mnapps.tasks.task.Task.evaluate`
return and take. Export (:mod:`mnapps.export.pipeline`) and evaluation
(:func:`mnapps.tasks.table.evaluate_checkpoint`) read them instead of testing model classes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from mnapps.graph_kind import GraphKind

__all__ = ["ExportPlan", "EvalRequest", "Evaluation"]


@dataclass(frozen=True)
class ExportPlan:
    """How a trained model of a task becomes an ONNX graph (read by :mod:`mnapps.export.pipeline`).

    Attributes:
        graph: the kind of graph (:class:`mnapps.graph_kind.GraphKind`: a batch in and one
            output out, an SSD's raw outputs, or a whole two-stage detector); a detection
            head's comes from its :class:`mnapps.heads.HeadSpec`. Export picks the class that
            owns that kind's export, parity check, int8 path and runtime
            (:mod:`mnapps.export.graphs`).
        metadata: ``mnapps.*`` metadata for the file (the graph adds its input/output words).
        input_size: side of a tensor graph's square input (None for detectors).
        output_names: the tensor graph's output names.
        to_input: image ``Tensor[3, H, W]`` in [0, 1] -> graph input; None resizes to ``input_size``.
        top1: parity also compares top-1 agreement (classifiers).
        accuracy: what :func:`mnapps.export.pipeline.evaluate_export` measures: ``"top1"``,
            ``"coco"`` or None (not measured there).
        own_data: False for an imported model that names no data of its own (its default
            parity/calibration images would be unlike what it sees).
    """

    graph: GraphKind
    metadata: dict[str, Any]
    input_size: int | None = None
    output_names: tuple[str, ...] = ()
    to_input: Callable[[Tensor], Tensor] | None = None
    top1: bool = False
    accuracy: str | None = None
    own_data: bool = True


@dataclass(frozen=True)
class EvalRequest:
    """What an evaluation of a checkpoint is asked for (``tools/eval_det.py --checkpoint``).

    Attributes:
        device: where the model runs.
        config: a YAML config to use instead of the one stored in the checkpoint.
        val_ann, val_images: validation annotations and images instead of the config's.
        batch_size: images per forward pass (None: the config's evaluation batch size).
        workers: data-loading processes (None: the config's ``train.num_workers``).
        max_images: score only the first N images (None: all).
        progress: show a progress bar.
        report_dir: where the task draws its pictures of the evaluation (detection:
            ``eval_pr_curves.png`` and ``eval_val_predictions.png``); None draws none.
    """

    device: str | torch.device = "cpu"
    config: str | os.PathLike | None = None
    val_ann: str | os.PathLike | None = None
    val_images: str | os.PathLike | None = None
    batch_size: int | None = None
    workers: int | None = None
    max_images: int | None = None
    progress: bool = True
    report_dir: str | os.PathLike | None = None


@dataclass(frozen=True)
class Evaluation:
    """What a task's evaluator measured.

    Attributes:
        metrics: the headline figures (detection: COCO's 12 numbers, ``AP`` ... ``ARl``).
        per_class: a figure per class name (detection: AP@[.5:.95]).
        summary: the evaluator's own text report (detection: COCOeval's 12 lines).
        extra: what was evaluated, for the metrics file (checkpoint, data, device).
    """

    metrics: dict[str, float]
    per_class: dict[str, float]
    summary: str
    extra: dict[str, Any]
