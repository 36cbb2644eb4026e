"""Global RNG state of a training process: seeding, and capture/restore for an exact resume.

This module owns the one way mnapps seeds a run (:func:`seed_everything`: python, numpy,
torch and every GPU) and turns every RNG state into tensors and plain values
(:func:`capture_rng_state`), so a checkpoint holding them loads with ``weights_only``.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["seed_everything", "capture_rng_state", "restore_rng_state"]


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and every GPU) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG state this process uses: torch, cuda (all GPUs), numpy, python.

    Only tensors and plain Python values, so a checkpoint holding it loads with
    ``torch.load(weights_only=True)``: numpy's MT19937 state becomes ``{"name", "keys":
    int64 tensor[624], "pos", "has_gauss", "cached_gaussian"}``; python's is already a tuple
    of ints.
    """
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(saved: Any) -> Any:
    """numpy's ``set_state`` tuple from :func:`capture_rng_state`'s dict (a tuple passes through)."""
    if not isinstance(saved, Mapping):
        return saved
    keys = np.asarray(saved["keys"].numpy() if isinstance(saved["keys"], torch.Tensor) else saved["keys"])
    return (saved["name"], keys.astype(np.uint32), saved["pos"], saved["has_gauss"], saved["cached_gaussian"])


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (a missing entry leaves that RNG untouched)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        np.random.set_state(_numpy_state(state["numpy"]))
    if "python" in state:
        random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn(
                f"checkpoint holds RNG states for {len(state['cuda'])} GPU(s) but {torch.cuda.device_count()} "
                f"are visible; CUDA RNGs were not restored",
                stacklevel=2,
            )
