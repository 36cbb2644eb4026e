"""Import Google's TF-slim MobileNetV1 ImageNet weights into an mnapps classifier.

This module owns the name and layout mapping from TF-slim's MobileNetV1 variables
(``MobilenetV1/Conv2d_0/weights``, ``MobilenetV1/Conv2d_<i>_{depthwise,pointwise}/...``,
``MobilenetV1/Logits/Conv2d_1c_1x1/...``) to :class:`~mnapps.backbones.MobileNetV1` state
keys, and the conventions those weights were trained with: HWIO convolution kernels
(PyTorch wants OIHW), depthwise kernels stored ``[3, 3, C, 1]`` (PyTorch: ``[C, 1, 3, 3]``),
BatchNorm epsilon 1e-3, ReLU6, TF "SAME" padding and 1001 logits whose index 0 is a
"background" class (TF index ``i`` is the usual ImageNet index ``i - 1``). The source is a
plain ``name -> array`` mapping: an ``.npz`` holding the variables, or the official ``.ckpt``
read with TensorFlow when it is installed. Every source tensor must be mapped and every
model tensor filled; anything else is an error naming the tensors.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from mnapps.backbones.mobilenet_v1 import BLOCK_SETTINGS, MobileNetV1
from .tf_checkpoint import check_finite_tensors, read_tf_checkpoint

__all__ = [
    "TF_SCOPE",
    "TfSlimImport",
    "read_tf_slim_tensors",
    "tf_slim_to_state_dict",
    "build_from_tf_slim",
]

TF_SCOPE = "MobilenetV1"
# Tensors that are not model weights, skipped and reported: what a training checkpoint
# carries beside the model (the step counter, optimizer slots, the weights' moving averages:
# TF-slim's eval uses the plain variables unless told otherwise) and the shape constants of
# a frozen graph's reshape ops (``MobilenetV1/Predictions/Reshape/shape``, int32 [-1, 1001]).
NOT_WEIGHTS = re.compile(
    r"(^global_step$|^beta[12]_power|/(ExponentialMovingAverage|RMSProp(_1)?|Momentum|Adam(_1)?)$"
    r"|/Reshape(_\d+)?/shape$)"
)
BN_TF_TO_TORCH = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


@dataclass
class TfSlimImport:
    """What a conversion did: the model's settings and the tensors it skipped."""

    width_mult: float
    num_classes: int
    background_dropped: bool
    mapped: int = 0
    skipped: list[str] = field(default_factory=list)


def read_tf_slim_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``name -> array`` mapping from an ``.npz`` file or a TensorFlow checkpoint.

    Args:
        path: an ``.npz`` (e.g. ``mobilenet_v1_1.0_224_tfslim.npz``) or the official
            checkpoint prefix ``mobilenet_v1_1.0_224.ckpt`` (the ``.index``/``.data-*``
            files beside it, read by :func:`mnapps.importers.tf_checkpoint.read_tf_checkpoint`
            without TensorFlow).

    Raises:
        ValueError: a weight (not a graph constant) holding NaN or infinity, named.
    """
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"TF-slim weights file {path} does not exist")
        with np.load(path, allow_pickle=False) as data:
            return _finite_weights({name: data[name] for name in data.files}, path)
    # A TF checkpoint is named by its prefix; accept the .index/.data-* file too.
    prefix = re.sub(r"\.(index|meta|data-\d+-of-\d+)$", "", str(path))
    if not Path(prefix + ".index").is_file():
        raise FileNotFoundError(
            f"{path} is neither an .npz file nor a TensorFlow checkpoint (no {prefix}.index); "
            "pass the .npz of TF-slim tensors or the .ckpt prefix of the official release"
        )
    return _finite_weights(read_tf_checkpoint(prefix), Path(prefix))


def _finite_weights(tensors: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    # Only the weights: graph constants (a reshape target stored as float bits) may hold anything.
    check_finite_tensors({k: v for k, v in tensors.items() if not NOT_WEIGHTS.search(k)}, str(path))
    return tensors


def stage_scopes(num_blocks: int = len(BLOCK_SETTINGS)) -> list[tuple[str, str]]:
    """(TF scope, mnapps module prefix) for every conv+BN of the trunk, in forward order."""
    scopes = [(f"{TF_SCOPE}/Conv2d_0", "stem")]
    for index in range(1, num_blocks + 1):
        scopes.append((f"{TF_SCOPE}/Conv2d_{index}_depthwise", f"block{index}.depthwise"))
        scopes.append((f"{TF_SCOPE}/Conv2d_{index}_pointwise", f"block{index}.pointwise"))
    return scopes


def conv_to_torch(name: str, array: np.ndarray) -> np.ndarray:
    if array.ndim != 4:
        raise ValueError(f"TF tensor {name} should be a 4-d kernel, got shape {array.shape}")
    if name.endswith("depthwise_weights"):
        # [kh, kw, C, multiplier=1] -> [C * multiplier, 1, kh, kw]
        kh, kw, channels, multiplier = array.shape
        return array.transpose(2, 3, 0, 1).reshape(channels * multiplier, 1, kh, kw)
    return array.transpose(3, 2, 0, 1)  # HWIO -> OIHW


def tf_slim_to_state_dict(
    tensors: Mapping[str, np.ndarray], *, keep_background: bool = False
) -> tuple[dict[str, torch.Tensor], TfSlimImport]:
    """Convert TF-slim MobileNetV1 tensors to a :class:`MobileNetV1` state dict.

    Args:
        tensors: TF-slim variable name -> array (see :func:`read_tf_slim_tensors`).
        keep_background: keep TF's 1001 logits (index 0 = background). By default index 0
            is dropped and the classifier has the usual 1000 ImageNet classes.

    Returns:
        ``(state_dict, info)``; ``info.width_mult`` is inferred from the last block's width
        (1024 * alpha), which holds for all of Google's releases (0.25, 0.5, 0.75, 1.0).

    Raises:
        ValueError: a tensor that maps to nothing, a missing tensor, or a wrong shape.
    """
    remaining = dict(tensors)
    skipped = sorted(name for name in remaining if NOT_WEIGHTS.search(name))
    for name in skipped:
        del remaining[name]

    def take(name: str) -> np.ndarray:
        if name not in remaining:
            raise ValueError(
                f"TF-slim tensor {name!r} is missing from the source; is it a MobileNetV1 "
                f"(scope {TF_SCOPE!r}) checkpoint of the standard architecture?"
            )
        return np.asarray(remaining.pop(name), dtype=np.float32)

    state: dict[str, torch.Tensor] = {}
    for tf_scope, prefix in stage_scopes():
        kernel_name = f"{tf_scope}/{'depthwise_weights' if 'depthwise' in tf_scope else 'weights'}"
        state[f"{prefix}.conv.weight"] = torch.from_numpy(conv_to_torch(kernel_name, take(kernel_name)).copy())
        for tf_bn, torch_bn in BN_TF_TO_TORCH.items():
            state[f"{prefix}.bn.{torch_bn}"] = torch.from_numpy(take(f"{tf_scope}/BatchNorm/{tf_bn}").copy())

    logits_w = take(f"{TF_SCOPE}/Logits/Conv2d_1c_1x1/weights")  # [1, 1, C, classes]
    logits_b = take(f"{TF_SCOPE}/Logits/Conv2d_1c_1x1/biases")
    if logits_w.ndim != 4 or logits_w.shape[:2] != (1, 1):
        raise ValueError(f"TF logits kernel should be [1, 1, C, classes], got {logits_w.shape}")
    weight = logits_w[0, 0].T  # [classes, C]
    has_background = weight.shape[0] == 1001
    if has_background and not keep_background:
        weight, logits_b = weight[1:], logits_b[1:]
    state["classifier.weight"] = torch.from_numpy(np.ascontiguousarray(weight))
    state["classifier.bias"] = torch.from_numpy(np.ascontiguousarray(logits_b))

    if remaining:
        names = sorted(remaining)
        raise ValueError(
            f"{len(names)} TF tensor(s) map to no MobileNetV1 parameter: {names[:8]}"
            f"{' ...' if len(names) > 8 else ''}; only the standard TF-slim MobileNetV1 is supported"
        )
    final_channels = state[f"block{len(BLOCK_SETTINGS)}.pointwise.conv.weight"].shape[0]
    info = TfSlimImport(
        width_mult=final_channels / BLOCK_SETTINGS[-1][0],
        num_classes=int(state["classifier.weight"].shape[0]),
        background_dropped=has_background and not keep_background,
        mapped=len(tensors) - len(skipped),
        skipped=skipped,
    )
    return state, info


def build_from_tf_slim(
    tensors: Mapping[str, np.ndarray], *, keep_background: bool = False
) -> tuple[MobileNetV1, TfSlimImport]:
    """A :class:`MobileNetV1` (eval mode, TF padding, ReLU6, eps 1e-3) holding the weights.

    Every tensor shape is checked against the model the inferred width builds.
    """
    state, info = tf_slim_to_state_dict(tensors, keep_background=keep_background)
    model = MobileNetV1(
        info.width_mult, info.num_classes, activation="relu6", bn_eps=1e-3, tf_padding=True
    )
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    problems = [
        f"{key}: TF {tuple(state[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    missing = sorted(set(expected) - set(state))
    if problems or missing:
        raise ValueError(
            f"TF-slim tensors do not fit MobileNetV1(width_mult={info.width_mult}): "
            f"shape mismatches {problems[:4]}, unfilled {missing[:4]}"
        )
    model.load_state_dict(state, strict=False)  # num_batches_tracked stays at its default
    return model.eval(), info

