"""Smaller detectors made from a bigger one: the starting checkpoint of a distilled student.

This module owns turning a detection checkpoint (typically an imported TF OD API SSD such as
face-api.js's face detector) into the ``--weights`` a student starts from in ``train_det``:

* :func:`student_checkpoint` rebuilds the teacher at another input size (SSD anchors follow
  the feature-map grid, so only ``ssd.size`` changes) and, with ``width_mult`` < 1, keeps the
  strongest channels of every layer (:func:`slim_state_dict`: by the L1 norm of each output
  filter, the same channels carried through the depthwise convs, BatchNorms and the next
  layer's inputs), then recalibrates BatchNorm on the user's photos.
* :func:`reparametrize_batchnorm_keeping_output` is why a student can be trained at all: imported
  TF models carry BatchNorm folded into the convolutions (loaded as identity BatchNorms: mean 0, variance 1), so
  in train mode, where BatchNorm normalises by the batch's own statistics, the network computes
  something else than the teacher and fine-tuning starts from a broken model. Each BatchNorm is
  re-parametrised so that its running statistics are the measured mean and variance of its
  input on real photos while its eval-mode function stays exactly the same; train mode then
  starts close to the teacher.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from mnapps.checkpoint import Checkpoint, read_checkpoint
from mnapps.config import from_dict, to_dict
from mnapps.data.image_io import load_rgb
from mnapps.data.transforms import build_det_transforms
from mnapps.tasks.detection import DetConfig, build_model, load_detector

__all__ = ["reparametrize_batchnorm_keeping_output", "slim_state_dict", "student_checkpoint"]


@torch.no_grad()
def reparametrize_batchnorm_keeping_output(model: nn.Module, images: Iterable[Tensor]) -> int:
    """Re-parametrise every ``BatchNorm2d`` of ``model`` on the statistics of its real input.

    With ``m, v`` the measured per-channel mean and variance of a BatchNorm's input over
    ``images`` (eval-mode forward passes, one image ``[3, H, W]`` in [0, 1] each), its running
    statistics become ``m, v`` and its affine ``gamma, beta`` are changed so that
    ``gamma' (x - m) / sqrt(v + eps) + beta' == gamma (x - mean) / sqrt(var + eps) + beta`` for
    every ``x``: the model's eval-mode output does not change (to float rounding). (The face
    teacher's :func:`mnapps.tasks.face.distill.teacher.reestimate_batchnorm_statistics` is the
    opposite: it keeps the weights and so changes the output.)

    Returns:
        the number of BatchNorms re-parametrised.
    """
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    sums: dict[nn.Module, list[Tensor]] = {}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        x = inputs[0].detach().double()
        stats = [x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), torch.tensor(x.numel() / x.shape[1])]
        if module in sums:
            stats = [a + b for a, b in zip(sums[module], stats)]
        sums[module] = stats

    handles = [norm.register_forward_hook(hook) for norm in norms]
    was_training = model.training
    model.eval()
    try:
        for image in images:
            model([image])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for norm in norms:
        if norm not in sums:
            continue
        total, squares, count = sums[norm]
        mean = total / count
        var = (squares / count - mean * mean).clamp(min=0)
        old_std = (norm.running_var.double() + norm.eps).sqrt()
        new_std = (var + norm.eps).sqrt()
        gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(mean)
        beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(mean)
        new_beta = beta + gamma * (mean - norm.running_mean.double()) / old_std
        new_gamma = gamma * new_std / old_std
        norm.running_mean.copy_(mean.to(norm.running_mean.dtype))
        norm.running_var.copy_(var.to(norm.running_var.dtype))
        if norm.weight is not None and norm.bias is not None:
            norm.weight.copy_(new_gamma.to(norm.weight.dtype))
            norm.bias.copy_(new_beta.to(norm.bias.dtype))
    return len(sums)


def _kept_channels(weight: Tensor, count: int) -> Tensor:
    """The ``count`` output channels of a conv with the largest L1 filter norm, in order."""
    if count == weight.shape[0]:
        return torch.arange(count)
    return weight.abs().sum(dim=(1, 2, 3)).argsort(descending=True)[:count].sort().values


def slim_state_dict(
    teacher_state: dict[str, Tensor], student_state: dict[str, Tensor], feature_maps: Sequence[str]
) -> dict[str, Tensor]:
    """The teacher's tensors cut to a narrower student's shapes, keeping the strongest channels.

    The ``ConvBNAct`` layers (``<prefix>.conv`` + ``<prefix>.bn``) of the trunk and the extra
    layers form one chain in state-dict order (each reads the previous one's output). A dense
    conv keeps the output channels of largest L1 filter norm and the input channels its
    predecessor kept; a depthwise conv and every BatchNorm keep their input's channels. The
    predictors keep every output (anchors x classes, anchors x 4) and the channels of the map
    they read (``feature_maps``' last pointwise conv, then each extra layer's output).

    Returns:
        a state dict that loads into the student with ``strict=True``.
    """
    prefixes = [key[: -len(".conv.weight")] for key in teacher_state if key.endswith(".conv.weight")]
    out: dict[str, Tensor] = {}
    kept: dict[str, Tensor] = {}
    previous = torch.arange(3)  # RGB
    for prefix in prefixes:
        weight = teacher_state[f"{prefix}.conv.weight"]
        depthwise = weight.shape[1] == 1 and ".depthwise" in prefix
        channels = previous if depthwise else _kept_channels(weight, student_state[f"{prefix}.conv.weight"].shape[0])
        out[f"{prefix}.conv.weight"] = weight[channels] if depthwise else weight[channels][:, previous]
        for key in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.bn.{key}"] = teacher_state[f"{prefix}.bn.{key}"][channels]
        out[f"{prefix}.bn.num_batches_tracked"] = teacher_state[f"{prefix}.bn.num_batches_tracked"]
        kept[prefix] = previous = channels
    extras = sorted({p.split(".")[2] for p in prefixes if p.startswith("backbone.extras.")}, key=int)
    maps = [kept[f"backbone.trunk.{stage}.pointwise"] for stage in feature_maps]
    maps += [kept[f"backbone.extras.{index}.expand"] for index in extras]
    for key, value in teacher_state.items():
        if ".module_list." in key:
            index = int(key.split(".module_list.")[1].split(".")[0])
            out[key] = value[:, maps[index]] if value.ndim == 4 else value
    missing = sorted(set(student_state) - set(out))
    if missing:
        raise ValueError(f"cannot slim the teacher: no rule for {missing[:4]}")
    return out


def student_checkpoint(
    teacher: str | os.PathLike,
    output: str | os.PathLike,
    photos: Sequence[str | os.PathLike],
    *,
    size: int | None = None,
    width_mult: float | None = None,
    overwrite: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Write the starting checkpoint of a student of ``teacher`` (see the module docstring).

    Args:
        teacher: an mnapps detection checkpoint.
        output: the ``.pt`` to write; an existing one is refused unless ``overwrite``.
        photos: real photos to recalibrate BatchNorm on (the student's training photos).
        size: the student's input side (None: the teacher's).
        width_mult: the student's width multiplier (None: the teacher's).

    Returns:
        ``(path, report)`` with the student's config and how many BatchNorms were recalibrated.

    Raises:
        FileExistsError: ``output`` exists and not ``overwrite``.
        ValueError: not a detection checkpoint, or a width above the teacher's.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite=True or choose another output")
    record = read_checkpoint(teacher)  # read once: its config rebuilds the teacher, its tensors start the student
    _, teacher_cfg = load_detector(record)
    teacher_weights = record.weights
    model_cfg = teacher_cfg.model
    ssd = dataclasses.replace(model_cfg.head_settings, size=size or model_cfg.head_settings.size)
    backbone = model_cfg.backbone
    if width_mult is not None:
        if width_mult > backbone.width_mult:
            raise ValueError(f"width_mult {width_mult} is above the teacher's {backbone.width_mult}; a student is narrower")
        backbone = dataclasses.replace(backbone, width_mult=width_mult)
    cfg = dataclasses.replace(teacher_cfg, model=dataclasses.replace(model_cfg, head_settings=ssd, backbone=backbone))
    cfg = from_dict(DetConfig, to_dict(cfg))  # validated like any loaded config
    student = build_model(cfg, cfg.model.num_classes)
    if backbone.width_mult == model_cfg.backbone.width_mult:
        student.load_state_dict(teacher_weights)
    else:
        student.load_state_dict(slim_state_dict(teacher_weights, student.state_dict(), ssd.feature_maps))
    resize = build_det_transforms(False, ssd.size)
    empty_boxes, empty_labels = torch.zeros((0, 4)).numpy(), torch.zeros((0,), dtype=torch.int64).numpy()
    images = (resize(load_rgb(path), empty_boxes, empty_labels)[0] for path in photos)
    count = reparametrize_batchnorm_keeping_output(student, images)
    checkpoint = Checkpoint(
        task="detection", head=cfg.model.head, config=to_dict(cfg), weights=student.state_dict(),
        source=f"student of {Path(teacher).name}: size {ssd.size}, width {backbone.width_mult:g}, "
        f"BatchNorm recalibrated on {len(photos)} photos",
    )
    return checkpoint.save(output), {"config": cfg, "recalibrated": count}
