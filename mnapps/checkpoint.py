"""The one mnapps checkpoint format: written atomically, read without running code.

A checkpoint is a ``torch.save``d dict::

    {"format": "mnapps-checkpoint", "version": 1,
     "task": "classification" | "detection" | "face" | ...,
     "head": str | None,          # "ssd", "faster_rcnn", ... for detectors
     "config": dict,              # the resolved config (plain dict, see mnapps.config.to_dict)
     "model": state_dict,
     "epoch": int, "metrics": dict,
     # only in training checkpoints, for --resume:
     "optimizer", "scheduler", "scaler", "rng": ...}

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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnapps.files import atomic_write

FORMAT = "mnapps-checkpoint"
VERSION = 1

__all__ = ["save_checkpoint", "load_checkpoint", "safe_load", "to_plain"]

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
