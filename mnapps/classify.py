"""Classify photos with an mnapps classification checkpoint (top-k labels with probabilities).

This module owns inference for classifiers: rebuilding the model a checkpoint describes
(its config records width, TF padding, resolution and class names), preparing an image the
way the TF-slim reference inputs were made (upright RGB, PIL bilinear resize of the whole
image to the model's resolution, scaled to [-1, 1]) and turning logits into named top-k
predictions. The 1000 ImageNet class names ship in ``mnapps/resources/imagenet_classes.txt``
(torchvision's list, index = the usual ImageNet class index).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from mnapps.classification import ClsConfig, build_classifier
from mnapps.config import ConfigError, from_dict
from mnapps.data.imagefolder import load_rgb
from mnapps.engine.checkpoint import load_checkpoint

__all__ = [
    "Prediction",
    "imagenet_class_names",
    "class_names_for",
    "load_classifier",
    "preprocess_image",
    "classify_images",
    "default_imagenet_checkpoint",
]


@dataclass(frozen=True)
class Prediction:
    """One ranked label: class index, its name and softmax probability."""

    index: int
    label: str
    probability: float


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index = the usual (torchvision) class index."""
    text = resources.files("mnapps.resources").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != 1000:
        raise ValueError(f"mnapps/resources/imagenet_classes.txt should list 1000 classes, found {len(names)}")
    return names


def class_names_for(num_classes: int, recorded: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Names for a classifier's outputs.

    The checkpoint's own names when it recorded them; ImageNet's for 1000 outputs, and for
    1001 (TF-slim's layout, index 0 = background) with "background" first; otherwise
    ``class_<i>``.
    """
    if recorded:
        if len(recorded) != num_classes:
            raise ValueError(f"the checkpoint lists {len(recorded)} class names for {num_classes} outputs")
        return list(recorded)
    if num_classes == 1000:
        return list(imagenet_class_names())
    if num_classes == 1001:
        return ["background", *imagenet_class_names()]
    return [f"class_{i}" for i in range(num_classes)]


def load_classifier(
    checkpoint: str | os.PathLike | dict, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ClsConfig, list[str]]:
    """Rebuild the classifier stored in an mnapps classification checkpoint.

    Returns:
        ``(model in eval mode on device, its ClsConfig, class names)``.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: not a classification checkpoint, or weights that do not fit its config.
    """
    name = str(checkpoint) if not isinstance(checkpoint, dict) else "the given checkpoint"
    data = load_checkpoint(checkpoint) if not isinstance(checkpoint, dict) else checkpoint
    if data.get("task") != "classification":
        raise ValueError(
            f"{name} is a {data.get('task') or 'plain state-dict'} checkpoint, not a classification one; "
            "use tools/import_weights.py or tools/train_cls.py to make one"
        )
    try:
        cfg = from_dict(ClsConfig, data.get("config") or {})
    except ConfigError as exc:
        raise ValueError(f"{name}: its config does not fit this version of mnapps ({exc})") from None
    state = data["model"]
    num_classes = cfg.model.num_classes or int(state["classifier.weight"].shape[0])
    model = build_classifier(cfg.model, num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{name}: weights do not fit the model its config describes: {exc}") from None
    return model.to(device).eval(), cfg, class_names_for(num_classes, cfg.model.class_names)


def preprocess_image(image: Image.Image | str | os.PathLike, resolution: int) -> Tensor:
    """Image (or path) -> ``Tensor[3, resolution, resolution]`` in [-1, 1].

    The whole image is resized with PIL bilinear (no crop) and scaled as ``x / 127.5 - 1``:
    exactly how the TF reference inputs in ``reference_tf_outputs.npz`` were made.
    """
    if not isinstance(image, Image.Image):
        image = load_rgb(image)
    elif image.mode != "RGB":
        image = image.convert("RGB")
    resized = image.resize((resolution, resolution), Image.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@torch.no_grad()
def classify_images(
    model: nn.Module,
    images: list[Image.Image | str | os.PathLike],
    class_names: list[str],
    *,
    resolution: int,
    topk: int = 5,
    device: str | torch.device = "cpu",
) -> list[list[Prediction]]:
    """Top-``topk`` predictions (highest first) for each image.

    Probabilities are the softmax over the model's outputs (for a 1001-way TF-slim model
    that includes the background class).
    """
    if not images:
        raise ValueError("give at least one image")
    batch = torch.stack([preprocess_image(image, resolution) for image in images]).to(device)
    probabilities = model(batch).softmax(dim=1).cpu()
    k = min(topk, probabilities.shape[1])
    values, indices = probabilities.topk(k, dim=1)
    return [
        [Prediction(int(i), class_names[int(i)], float(p)) for p, i in zip(row_values, row_indices)]
        for row_values, row_indices in zip(values, indices)
    ]


def default_imagenet_checkpoint(root: str | os.PathLike | None = None) -> Path:
    """Where ``tools/import_weights.py`` writes the ImageNet classifier by default."""
    base = Path(root) if root is not None else Path.cwd()
    return base / "runs" / "weights" / "mobilenet_v1_1.0_224_imagenet.pt"
