"""The one mnapps checkpoint format: the typed record, written atomically, read without running code.

Every loader, :func:`mnapps.engine.loop.fit`'s resume and export read a checkpoint as a
:class:`Checkpoint` (:func:`read_checkpoint`) and write one with :meth:`Checkpoint.save`; no
other module knows the keys of the file. On disk a checkpoint is a ``torch.save``d dict::

    {"format": "mnapps-checkpoint", "version": 1,
     "task": "classification" | "detection" | "face" | ...,
     "head": str | None,          # "ssd", "faster_rcnn", ... for detectors
     "config": dict,              # the resolved config (plain dict, see mnapps.config.to_dict)
     "model": state_dict,
     "epoch": int, "metrics": dict,
     # only in training checkpoints, for --resume:
     "optimizer", "scheduler", "scaler", "rng": ...}

Reading migrates the one legacy layout (mnapps <= 0.1 kept the trunk settings flat in
``config.model``; they are nested into ``config.model.backbone``) and refuses a file of a newer
format version than this mnapps reads, naming both versions.

Every value is a tensor or a plain Python value (dict, list, tuple, str, number, bool, None):
:func:`save_checkpoint` turns numpy values into Python numbers or tensors and refuses anything
else, and :func:`load_checkpoint` reads with ``torch.load(weights_only=True)``, which builds
only those types. A pickle that would import and call arbitrary Python (a ``--checkpoint`` from
an untrusted source) is refused before any of it runs, with a one-line message and never the
advice to turn ``weights_only`` off. Writes go to a temporary file in the same folder followed
by ``os.replace`` so a run killed mid-write never leaves a truncated checkpoint behind. Moving a
trunk between two models is :mod:`mnapps.backbones.trunk`'s business; this module only knows
the file.
"""

from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from mnapps.config import ConfigError, from_dict
from mnapps.files import atomic_write

T = TypeVar("T")

FORMAT = "mnapps-checkpoint"
VERSION = 1

__all__ = [
    "Checkpoint",
    "TrainingState",
    "read_checkpoint",
    "read_task_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "safe_load",
    "to_plain",
    "FORMAT",
    "VERSION",
]

# Leaves that torch.load(weights_only=True) rebuilds. Exact types: a subclass (a str enum, a
# numpy float64, which is a float) pickles as its own class and would be refused on load.
_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.Size)


def to_plain(value: Any, where: str = "checkpoint") -> Any:
    """``value`` with numpy scalars made Python numbers and numpy arrays made tensors.

    Containers are rebuilt only when something inside changed, so a state dict keeps its
    ``_metadata`` (the module versions ``load_state_dict`` reads).

    Raises:
        TypeError: a value ``torch.load(weights_only=True)`` could not rebuild, naming where it is.
    """
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_LEAVES:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        items = {key: to_plain(item, f"{where}[{key!r}]") for key, item in value.items()}
        if type(value) in (dict, OrderedDict) and all(items[k] is value[k] for k in value):
            return value
        return OrderedDict(items) if isinstance(value, OrderedDict) else items
    if type(value) in (list, tuple):
        items = [to_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        if all(new is old for new, old in zip(items, value)):
            return value
        return type(value)(items)
    raise TypeError(
        f"{where} holds a {type(value).__module__}.{type(value).__qualname__}; a checkpoint may hold only "
        f"tensors, numpy values and plain Python values (dict, list, tuple, str, numbers, bool, None), so "
        f"that it loads without running code"
    )


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Atomically write ``payload`` (format/version keys are added) to ``path``.

    Raises:
        TypeError: the payload holds a value :func:`load_checkpoint` could not read back (see
            :func:`to_plain`); nothing is written then.
    """
    payload = to_plain({"format": FORMAT, "version": VERSION, **payload})
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def _refusal(path: Path, error: BaseException) -> str:
    """One line for a file that weights_only unpickling refused (PyTorch's advice left out)."""
    try:
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))  # reads, never runs
    except Exception:
        names = []
    names = names or re.findall(r"GLOBAL (\S+) was not an allowed global", str(error))
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        return (
            f"checkpoint {path} holds Python objects ({shown}) that weights_only loading refuses; mnapps never "
            f"loads those because they can run code"
        )
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(error))
    reason = detail.group(1).strip() if detail else type(error).__name__
    return f"checkpoint {path} could not be read: not a PyTorch checkpoint, or a damaged one ({reason})"


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with each refusal a one-line ValueError.

    For any ``.pt``/``.pth`` mnapps reads (checkpoints, teacher weights): the message names the
    file and, for a file that needs more than weights_only allows, the Python globals it would
    have imported; PyTorch's advice to turn weights_only off never reaches the user.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an ONNX model, an unreadable or damaged file, or one holding Python objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix.lower() == ".onnx":
        raise ValueError(
            f"{path} is an ONNX model (what tools/export.py writes), not a checkpoint; pass the .pt checkpoint "
            f"(best.pt or last.pt of the training run) instead"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(_refusal(path, exc)) from None
    except Exception as exc:  # truncated files, wrong archives, ...
        first_line = next((line for line in str(exc).splitlines() if line.strip()), "").split(". ")[0]
        raise ValueError(f"checkpoint {path} could not be read ({type(exc).__name__}: {first_line})") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or a bare state dict), running no code.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: as :func:`safe_load`, or a file that is neither a checkpoint nor a state dict.
    """
    path = Path(path)
    data = safe_load(path, map_location)
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return data
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {"format": "state_dict", "model": data, "config": None, "task": None, "head": None}
    raise ValueError(
        f"{path} is neither an mnapps checkpoint nor a state dict "
        f"(top-level keys: {sorted(data)[:8] if isinstance(data, dict) else type(data).__name__})"
    )


# ------------------------------------------------------------------------------------------
# the typed record


@dataclass
class TrainingState:
    """What an exact ``--resume`` needs beyond the weights (written by :func:`mnapps.engine.loop.fit`).

    Attributes:
        optimizer, scheduler, scaler: the ``state_dict()`` of each (``scaler`` may be empty).
        rng_per_rank: :func:`mnapps.engine.rng.capture_rng_state` of every rank.
        history: fit's per-epoch entries so far.
        best, best_metric, best_mode: the best value of ``best_metric`` (``"max"``/``"min"``).
        evaluation_pending: written after training an epoch but before its evaluation.
        train_config: the :class:`mnapps.config.TrainConfig` as a dict.
        steps_per_epoch, world_size: of the run that wrote it (a resume warns when they differ).
    """

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None = None
    rng_per_rank: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None
    best_metric: str | None = None
    best_mode: str = "max"
    evaluation_pending: bool = False
    train_config: dict[str, Any] | None = None
    steps_per_epoch: int | None = None
    world_size: int | None = None

    def rng_for(self, rank: int, world_size: int) -> dict[str, Any]:
        """The RNG states of ``rank``; rank 0's when the run had another number of processes."""
        states = self.rng_per_rank or [{}]
        return states[rank] if len(states) == world_size else states[0]


@dataclass
class Checkpoint:
    """One mnapps checkpoint: what it is (task, head, config), its weights and, for a training
    checkpoint, the state a resume restores.

    Attributes:
        task: ``"detection"``, ``"classification"``, ``"face"`` (a key of
            :data:`mnapps.tasks.TASKS`), or None for a bare state dict.
        head: the detector head (a key of :data:`mnapps.heads.HEADS`), ``"face_embedding"`` or None.
        config: the resolved config as a plain dict (the task turns it into its dataclass).
        weights: the model's state dict.
        epoch: epochs trained; metrics: the last evaluation's.
        training: what ``--resume`` needs (None: an inference-only checkpoint, e.g. an import).
        source: where imported weights came from (None for trained ones).
        version: the format version the file was written with.
        origin: the file it was read from, for messages (``"the given checkpoint"`` otherwise).
    """

    task: str | None
    head: str | None
    config: dict[str, Any] | None
    weights: dict[str, Any]
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    training: TrainingState | None = None
    source: str | None = None
    version: int = VERSION
    origin: str = "the given checkpoint"

    @property
    def model_config(self) -> dict[str, Any]:
        """``config["model"]`` (empty when the checkpoint records none)."""
        model = (self.config or {}).get("model")
        return dict(model) if isinstance(model, Mapping) else {}

    @property
    def backbone_config(self) -> dict[str, Any]:
        """The trunk settings, ``config["model"]["backbone"]`` (empty when none are recorded)."""
        backbone = self.model_config.get("backbone")
        return dict(backbone) if isinstance(backbone, Mapping) else {}

    def identity(self) -> dict[str, Any]:
        """What the checkpoint trains: task, head and backbone width (compared by ``--resume``)."""
        return {"task": self.task, "head": self.head, "backbone width": self.backbone_config.get("width_mult")}

    def require_task(self, task: str, fix: str) -> None:
        """Raise a one-line ValueError unless this is a ``task`` checkpoint with a config; ``fix``
        says what to pass instead."""
        if self.task != task or not isinstance(self.config, Mapping):
            kind = f"task={self.task!r}" if self.task else "a plain state dict"
            raise ValueError(f"{self.origin} is not an mnapps {task} checkpoint ({kind}); {fix}")

    def typed_config(self, cls: type[T]) -> T:
        """The stored config as the task's dataclass ``cls``; one that no longer fits this
        version of mnapps is a one-line ValueError naming the file."""
        try:
            return from_dict(cls, self.config)
        except ConfigError as exc:
            raise ValueError(f"{self.origin}: its config does not fit this version of mnapps: {exc}") from None

    def to_payload(self) -> dict[str, Any]:
        """The dict written to disk (see the module docstring)."""
        payload: dict[str, Any] = {
            "task": self.task, "head": self.head, "config": self.config, "model": self.weights,
            "epoch": self.epoch, "metrics": dict(self.metrics),
        }
        if self.source is not None:
            payload["source"] = self.source
        state = self.training
        if state is not None:
            payload.update(
                optimizer=state.optimizer, scheduler=state.scheduler, scaler=state.scaler,
                rng=(state.rng_per_rank or [{}])[0], rng_per_rank=state.rng_per_rank, history=state.history,
                best=state.best, best_metric=state.best_metric, best_mode=state.best_mode,
                evaluation_pending=state.evaluation_pending, train_config=state.train_config,
                steps_per_epoch=state.steps_per_epoch, world_size=state.world_size,
            )
        return payload

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically write the checkpoint to ``path`` (see :func:`save_checkpoint`)."""
        return save_checkpoint(self.to_payload(), path)


def _migrate_config(config: Any) -> Any:
    """The one legacy layout: mnapps <= 0.1 kept the trunk keys flat in ``model`` (and the trunk
    checkpoint as ``weights_backbone``); nest them into ``model.backbone``."""
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        return config
    model = dict(config["model"])
    if "width_mult" not in model:
        return config
    trunk_keys = ("width_mult", "variant", "activation", "bn_eps", "bn_momentum", "tf_padding", "frozen_bn",
                  "trainable_stages", "strict_weights")
    backbone = {key: model.pop(key) for key in trunk_keys if key in model}
    backbone["weights"] = model.pop("weights_backbone", None)
    return {**config, "model": {**model, "backbone": backbone}}


def _training_state(data: Mapping[str, Any]) -> TrainingState | None:
    if not all(key in data for key in ("optimizer", "scheduler")):
        return None
    per_rank = data.get("rng_per_rank") or [data.get("rng") or {}]
    return TrainingState(
        optimizer=data["optimizer"], scheduler=data["scheduler"], scaler=data.get("scaler"),
        rng_per_rank=list(per_rank), history=list(data.get("history") or []), best=data.get("best"),
        best_metric=data.get("best_metric"), best_mode=data.get("best_mode", "max"),
        evaluation_pending=bool(data.get("evaluation_pending")), train_config=data.get("train_config"),
        steps_per_epoch=data.get("steps_per_epoch"), world_size=data.get("world_size"),
    )


def _record(data: Mapping[str, Any], origin: str) -> Checkpoint:
    """The record of a loaded checkpoint dict (or bare state dict); a newer format is refused."""
    if data.get("format") == "state_dict":  # what load_checkpoint makes of a bare state dict
        return Checkpoint(task=None, head=None, config=None, weights=data["model"], origin=origin)
    version = data.get("version", VERSION)
    if not isinstance(version, int) or version > VERSION:
        raise ValueError(
            f"{origin} is an mnapps checkpoint of format version {version}, newer than version {VERSION} that this "
            f"mnapps reads; upgrade mnapps to load it"
        )
    weights = data.get("model")
    if not isinstance(weights, Mapping):
        raise ValueError(f"{origin} holds no model weights (no state dict under 'model'); is it an mnapps checkpoint?")
    return Checkpoint(
        task=data.get("task"), head=data.get("head"), config=_migrate_config(data.get("config")), weights=weights,
        epoch=int(data.get("epoch") or 0), metrics=dict(data.get("metrics") or {}), training=_training_state(data),
        source=data.get("source"), version=version, origin=origin,
    )


def read_checkpoint(
    source: str | os.PathLike | Mapping[str, Any] | Checkpoint, map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """The :class:`Checkpoint` in a file (or an already loaded checkpoint dict), running no code.

    A bare state dict becomes a record with only ``weights``; the legacy flat trunk keys are
    nested (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: as :func:`load_checkpoint`, or a checkpoint of a newer format version (both
            versions named).
    """
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Mapping):
        if source.get("format") in (FORMAT, "state_dict"):
            return _record(source, "the given checkpoint")
        if source and all(isinstance(v, torch.Tensor) for v in source.values()):
            return Checkpoint(task=None, head=None, config=None, weights=dict(source))
        return _record(source, "the given checkpoint")
    return _record(load_checkpoint(source, map_location), str(source))


def read_task_checkpoint(
    source: str | os.PathLike | Mapping[str, Any] | Checkpoint, task: str, config_cls: type[T], fix: str
) -> tuple[Checkpoint, T]:
    """What every task loader starts with: the record, checked to be a ``task`` checkpoint (else a
    ValueError ending with ``fix``), and its config as ``config_cls``."""
    record = read_checkpoint(source)
    record.require_task(task, fix)
    return record, record.typed_config(config_cls)
