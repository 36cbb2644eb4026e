""":data:`TASKS`: the one table of mnapps tasks, beside :data:`mnapps.heads.HEADS`.

Each entry is a task's :class:`mnapps.tasks.task.Task` instance (its config class, training,
checkpoint loader, datasets, export plan and evaluator are its methods). A checkpoint's ``task``
selects its entry, so export and evaluation (:func:`evaluate_checkpoint`), and anything else
that takes "any checkpoint", dispatch through this table rather than on model classes.
"""

from __future__ import annotations

import os

from mnapps.checkpoint import Checkpoint, read_checkpoint

from .classification import ClassificationTask
from .detection import DetectionTask
from .face import FaceTask
from .spec import EvalRequest, Evaluation, ExportPlan
from .task import RunRequest, Task

__all__ = ["TASKS", "task_spec", "evaluate_checkpoint", "Task", "RunRequest", "ExportPlan", "EvalRequest", "Evaluation"]


TASKS: dict[str, Task] = {task.name: task for task in (ClassificationTask(), DetectionTask(), FaceTask())}


def task_spec(checkpoint: Checkpoint) -> Task:
    """The :data:`TASKS` entry of a checkpoint's task; any other is a ValueError naming the choices."""
    if checkpoint.task not in TASKS:
        raise ValueError(
            f"{checkpoint.origin}: a checkpoint with task={checkpoint.task!r}, which no mnapps task reads; expected "
            f"one of {sorted(TASKS)} (a checkpoint "
            "written by tools/train_cls.py, train_det.py, distill_face.py or import_weights.py)"
        )
    return TASKS[checkpoint.task]


def evaluate_checkpoint(checkpoint: str | os.PathLike | Checkpoint, request: EvalRequest) -> Evaluation:
    """Score a checkpoint with its task's evaluator (:meth:`mnapps.tasks.task.Task.evaluate`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an mnapps task checkpoint, a task scored by a tool of its own (named),
            or the evaluator's own errors (each named).
    """
    record = read_checkpoint(checkpoint)
    task = task_spec(record)
    if task.scored_by is not None:
        scored = ", ".join(sorted(name for name, entry in TASKS.items() if entry.scored_by is None))
        raise ValueError(
            f"{record.origin}: a {record.task} checkpoint; only {scored} checkpoints are scored here "
            f"({record.task} checkpoints: {task.scored_by})"
        )
    return task.evaluate(record, request)
