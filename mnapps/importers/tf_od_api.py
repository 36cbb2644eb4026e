"""TensorFlow Object Detection API ``ssd_mobilenet_v1`` weights as an mnapps SSD.

This module owns everything between a TF OD API SSD-MobileNetV1 (the COCO zoo model, models
fine-tuned from it, face-api.js's face detector) and :func:`mnapps.heads.ssd.build_ssd`:

* the weights, from a TensorFlow.js folder, a ``name -> array`` ``.npz`` or a TensorFlow
  checkpoint (:func:`read_tf_weights`), under either of two layouts: the TF OD API's own
  (``FeatureExtractor/MobilenetV1/...``, ``BoxPredictor_i/...``) and face-api.js's export
  (``MobilenetV1/...``, ``Prediction/Conv2d_j_pointwise``, BN folded into
  ``convolution_bn_offset`` on full and pointwise convs, loaded as conv + identity BN);
* the settings the tensors imply (:func:`infer_configs`: width, extra-layer depths, anchors
  per location, class count; TF "SAME" padding, ReLU6, BN epsilon 1e-3, box coder (10, 10, 5, 5));
* the layout differences, absorbed into the weights so that the stock mnapps SSD reproduces
  the source exactly: HWIO kernels, TF's box encoding order ``(ty, tx, th, tw)`` against
  torchvision's ``(dx, dy, dw, dh)``, and the position of the interpolated-scale anchor within
  a location (last since 2018; right after the square anchor in the API's first release, which
  face-api.js's model was trained with);
* the source's inference, recorded in the config for :func:`~mnapps.heads.ssd.build_ssd` to
  install: ``preprocess`` (TF's legacy bilinear resize to the square input, x/127.5 - 1; after
  zero-padding bottom/right to a square for face-api.js) and ``score_activation="sigmoid"``;
* :func:`decode_all_anchors`: every anchor's decoded box and scores, to compare with the source;
* :func:`keep_first_classes`: drop trailing classes a model never reports (face-api.js's third
  logit), exactly, since sigmoid scores are per class.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

import numpy as np
import torch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD

from mnapps.backbones.mobilenet_v1 import BLOCK_SETTINGS, make_divisible
from mnapps.importers.tf_checkpoint import read_tf_checkpoint
from mnapps.importers.tf_slim import BN_TF_TO_TORCH, NOT_WEIGHTS, conv_to_torch, stage_scopes
from mnapps.importers.tfjs import find_tfjs_manifest, read_tfjs_weights
from mnapps.config import BackboneConfig
from mnapps.heads.ssd import SigmoidSSD, SSDConfig, build_ssd, ssd_anchor_specs

__all__ = [
    "InterpolatedAnchor",
    "TFImportedSSD",
    "read_tf_weights",
    "canonical_tensors",
    "infer_configs",
    "source_anchor_permutation",
    "source_anchor_index",
    "tf_od_api_state_dict",
    "decode_all_anchors",
    "normalized_anchors",
    "import_tf_od_api_ssd",
    "keep_first_classes",
]

BN_EPS = 1e-3  # TF-slim's and the TF OD API's batch-norm epsilon
# TF encodes a box as (ty, tx, th, tw); torchvision's BoxCoder decodes (dx, dy, dw, dh).
TF_TO_TORCHVISION_BOX = (1, 0, 3, 2)
# Where the extra box of scale sqrt(s_k * s_k+1) sits among a location's anchors: "last" in the
# TF OD API since 2018 (and in mnapps), "after_square" in its first release (face-api.js).
InterpolatedAnchor = Literal["last", "after_square"]
# How each layout's source fed its network: the TF OD API's fixed_shape_resizer stretches the
# photo; face-api.js zero-pads it to a square first.
DEFAULT_PREPROCESS = {"tf_od_api": "tf_resize", "faceapi": "tf_pad_resize"}
# ssd_mobilenet_v1's pipeline configs write 1/3 as 0.3333; the anchors (and the trained box
# predictors) follow the written value, 5e-5 away from 1/3 in box width.
TF_ASPECT_RATIOS = (1.0, 2.0, 0.5, 3.0, 0.3333)

# Graph constants that face-api.js's export carries beside the weights (shapes, axes, anchors).
_FACEAPI_CONSTANTS = re.compile(
    r"^(Preprocessor|Postprocessor|Output)/|^concat(_\d+)?/|/stack(_\d+)?(/\d+)?$|/strided_slice"
)
_OD_API_EXTRA = re.compile(r"^MobilenetV1/Conv2d_13_pointwise_([12])_Conv2d_(\d+)_(?:1x1|3x3_s2)_\d+/(.+)$")
_FACEAPI_EXTRA = re.compile(r"^Prediction/Conv2d_(\d+)_pointwise/(.+)$")


@dataclass
class TFImportedSSD:
    """An imported detector (eval mode) and what a checkpoint of it must record.

    ``build_ssd(ssd, num_classes=num_classes, backbone_cfg=backbone)`` rebuilds the same
    model, into which ``model.state_dict()`` loads. ``layout``, ``interpolated_anchor`` (already
    absorbed into the weights) and ``skipped`` (tensors that are not weights) are for reports;
    ``class_names`` (foreground, in logit order) is filled by whoever names the classes.
    """

    model: SSD
    ssd: SSDConfig
    backbone: BackboneConfig
    num_classes: int
    layout: Literal["tf_od_api", "faceapi"]
    interpolated_anchor: InterpolatedAnchor
    skipped: list[str] = field(default_factory=list)
    class_names: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------
# sources and names


def read_tf_weights(source: str | os.PathLike) -> dict[str, np.ndarray]:
    """``name -> array`` from a TF.js folder or manifest, an ``.npz``, or a TF checkpoint prefix."""
    path = Path(source)
    if path.is_dir() or path.suffix == ".json":
        return read_tfjs_weights(find_tfjs_manifest(path))
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    return read_tf_checkpoint(path)


def canonical_tensors(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str, list[str]]:
    """Rename either layout to one: TF-slim trunk names, ``Extra_k/{reduce,expand}/...``, ``BoxPredictor_i/...``.

    Returns ``(renamed, layout, skipped)``; skipped are graph constants (face-api.js), training
    state (step counter, optimizer slots, moving averages) and the anchors ``Output/extra_dim``.
    """
    layout = "faceapi" if any(n.startswith("Prediction/") for n in tensors) else "tf_od_api"
    renamed: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    od_extras = sorted(
        {int(m.group(2)) for n in tensors if (m := _OD_API_EXTRA.match(n.removeprefix("FeatureExtractor/")))}
    )
    for name, array in tensors.items():
        if NOT_WEIGHTS.search(name) or (layout == "faceapi" and _FACEAPI_CONSTANTS.search(name)):
            skipped.append(name)
            continue
        new = name.removeprefix("FeatureExtractor/")
        if new.startswith("Prediction/BoxPredictor_"):
            new = new.removeprefix("Prediction/")
        if layout == "faceapi":
            new = new.replace("MobilenetV1/Conv2d_0_pointwise/", "MobilenetV1/Conv2d_0/")
            if m := _FACEAPI_EXTRA.match(new):
                index = int(m.group(1))
                new = f"Extra_{index // 2}/{'expand' if index % 2 else 'reduce'}/{m.group(2)}"
        elif m := _OD_API_EXTRA.match(new):
            part = "reduce" if m.group(1) == "1" else "expand"  # _1_Conv2d_n_1x1 / _2_Conv2d_n_3x3_s2
            new = f"Extra_{od_extras.index(int(m.group(2)))}/{part}/{m.group(3)}"
        renamed[new] = np.asarray(array)
    return renamed, layout, sorted(skipped)


# ------------------------------------------------------------------------------------------
# settings


def _count(tensors: Mapping[str, np.ndarray], pattern: str) -> int:
    return len({m.group(1) for n in tensors if (m := re.match(pattern, n))})


def infer_configs(
    tensors: Mapping[str, np.ndarray],
    *,
    size: int,
    score_activation: Literal["sigmoid", "softmax"] = "sigmoid",
    preprocess: Literal["resize", "tf_resize", "tf_pad_resize"] = "tf_resize",
) -> tuple[SSDConfig, BackboneConfig, int]:
    """``(SSDConfig, BackboneConfig, num_classes)`` of canonical tensors (see :func:`canonical_tensors`).

    Width, extra depths, anchors per location, predictor kernel and classes come from kernel
    shapes; anchor scales, aspect ratios and the box coder are the TF ``ssd_mobilenet_v1``
    defaults, which :func:`import_tf_od_api_ssd` checks against the file's anchors when it has them.
    """
    def kernel(scope: str) -> np.ndarray:
        for name in (f"{scope}/weights", f"{scope}/depthwise_weights"):
            if name in tensors:
                return tensors[name]
        raise ValueError(f"TF tensor {scope}/weights is missing; is this an ssd_mobilenet_v1 model?")

    width = kernel(f"MobilenetV1/Conv2d_{len(BLOCK_SETTINGS)}_pointwise").shape[-1] / BLOCK_SETTINGS[-1][0]
    num_extras = _count(tensors, r"^Extra_(\d+)/")
    num_maps = _count(tensors, r"^BoxPredictor_(\d+)/")
    if num_maps != 2 + num_extras:
        raise ValueError(f"{num_maps} box predictors for 2 trunk maps + {num_extras} extra layers; unsupported layout")
    extra_depths = tuple(int(round(kernel(f"Extra_{k}/expand").shape[-1] / width)) for k in range(num_extras))
    anchors = [kernel(f"BoxPredictor_{i}/BoxEncodingPredictor").shape[-1] // 4 for i in range(num_maps)]
    logits = kernel("BoxPredictor_0/ClassPredictor").shape[-1]
    ssd = SSDConfig(
        size=size,
        extra_depths=extra_depths,
        reduce_boxes_in_lowest_layer=anchors[0] == 3,
        aspect_ratios=TF_ASPECT_RATIOS,
        predictor_kernel_size=kernel("BoxPredictor_0/BoxEncodingPredictor").shape[0],
        score_activation=score_activation,
        preprocess=preprocess,
    )
    expected = [len(layer) for layer in ssd_anchor_specs(ssd)]
    if anchors != expected or logits % anchors[0]:
        raise ValueError(
            f"anchors per location {anchors} do not match TF's ssd_anchor_generator ({expected}) "
            f"or {logits} class logits are not a multiple of {anchors[0]}"
        )
    for k in range(num_extras):
        hidden = kernel(f"Extra_{k}/reduce").shape[-1]
        if hidden != make_divisible(extra_depths[k] / 2 * width, 8, min_value=ssd.min_depth):
            raise ValueError(f"extra layer {k} reduces to {hidden} channels, mnapps builds half of {extra_depths[k]}")
    backbone = BackboneConfig(width_mult=width, activation="relu6", bn_eps=BN_EPS, tf_padding=True)
    return ssd, backbone, logits // anchors[0]


def source_anchor_permutation(cfg: SSDConfig, interpolated_anchor: InterpolatedAnchor) -> list[list[int]]:
    """Per map, for each mnapps anchor slot, the index of the same anchor in the source's order."""
    perms = []
    for k, layer in enumerate(ssd_anchor_specs(cfg)):
        order = list(range(len(layer)))
        lowest = k == 0 and cfg.reduce_boxes_in_lowest_layer
        if interpolated_anchor == "after_square" and not lowest and cfg.interpolated_scale_aspect_ratio > 0:
            square = [s for s, (_, ratio) in enumerate(layer[:-1]) if ratio == 1.0][0]
            source = order[: square + 1] + [order[-1]] + order[square + 1 : -1]  # source slot -> mnapps slot
            order = [source.index(slot) for slot in range(len(layer))]
        perms.append(order)
    return perms


def _grid_sizes(size: int, num_maps: int) -> list[int]:
    # Maps after block 11 (stride 16), block 13 (stride 32), then stride-2 "SAME" extra layers.
    cells = [math.ceil(size / 16), math.ceil(size / 32)]
    while len(cells) < num_maps:
        cells.append(math.ceil(cells[-1] / 2))
    return cells


def source_anchor_index(cfg: SSDConfig, interpolated_anchor: InterpolatedAnchor) -> np.ndarray:
    """For each anchor of the mnapps model, its index in the source's flat anchor list.

    ``source_outputs[source_anchor_index(...)]`` puts per-anchor outputs of the TF model (boxes,
    scores, the TF.js file's anchors) in the mnapps model's order.
    """
    perms = source_anchor_permutation(cfg, interpolated_anchor)
    index, offset = [], 0
    for perm, cells in zip(perms, _grid_sizes(cfg.size, len(perms))):
        for _ in range(cells * cells):
            index.extend(offset + i for i in perm)
            offset += len(perm)
    return np.array(index)


# ------------------------------------------------------------------------------------------
# weights


def _conv_bn(tensors: dict[str, np.ndarray], scope: str, prefix: str, state: dict[str, Tensor]) -> None:
    """One conv + BN: real BN statistics, or a folded offset loaded as an identity BN plus bias."""
    names = [f"{scope}/weights", f"{scope}/depthwise_weights"]
    name = next((n for n in names if n in tensors), None)
    if name is None:
        raise ValueError(f"TF tensor {names[0]} is missing; is this an ssd_mobilenet_v1 model?")
    kernel = tensors.pop(name).astype(np.float32)
    state[f"{prefix}.conv.weight"] = torch.from_numpy(np.ascontiguousarray(conv_to_torch(name, kernel)))
    channels = state[f"{prefix}.conv.weight"].shape[0]
    offset = tensors.pop(f"{scope}/convolution_bn_offset", None)
    if offset is not None:  # y = conv(x) + offset: BN with scale 1, mean 0 and var + eps == 1
        bn = {"gamma": np.ones(channels), "beta": offset, "moving_mean": np.zeros(channels),
              "moving_variance": np.full(channels, 1.0 - BN_EPS)}
    else:
        bn = {key: tensors.pop(f"{scope}/BatchNorm/{key}", None) for key in BN_TF_TO_TORCH}
        if bn["gamma"] is None:
            bn["gamma"] = np.ones(channels)  # TF OD API configs with batch_norm { scale: false }
        missing = [key for key, value in bn.items() if value is None]
        if missing:
            raise ValueError(f"TF tensors {[f'{scope}/BatchNorm/{k}' for k in missing]} are missing")
    for key, torch_key in BN_TF_TO_TORCH.items():
        state[f"{prefix}.bn.{torch_key}"] = torch.tensor(np.asarray(bn[key], dtype=np.float32))


def _predictor(
    tensors: dict[str, np.ndarray], scope: str, per_anchor: int, perm: list[int], channel_order: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    """A 1x1 predictor with output channels regrouped: mnapps anchor order, torchvision channel order."""
    kernel = tensors.pop(f"{scope}/weights").astype(np.float32)  # [kh, kw, C, A * per_anchor]
    bias = tensors.pop(f"{scope}/biases").astype(np.float32)
    index = np.array([[a * per_anchor + c for c in channel_order] for a in perm]).reshape(-1)
    weight = conv_to_torch(f"{scope}/weights", kernel[..., index])
    return torch.from_numpy(np.ascontiguousarray(weight)), torch.from_numpy(np.ascontiguousarray(bias[index]))


def tf_od_api_state_dict(
    tensors: Mapping[str, np.ndarray], cfg: SSDConfig, interpolated_anchor: InterpolatedAnchor
) -> dict[str, Tensor]:
    """The state dict of ``build_ssd(cfg, ...)`` from canonical tensors; every tensor must be used."""
    remaining = dict(tensors)
    state: dict[str, Tensor] = {}
    for scope, prefix in stage_scopes():
        _conv_bn(remaining, scope, f"backbone.trunk.{prefix}", state)
    for k in range(len(cfg.extra_depths)):
        for part in ("reduce", "expand"):
            _conv_bn(remaining, f"Extra_{k}/{part}", f"backbone.extras.{k}.{part}", state)
    for i, perm in enumerate(source_anchor_permutation(cfg, interpolated_anchor)):
        num_logits = remaining[f"BoxPredictor_{i}/ClassPredictor/biases"].shape[0] // len(perm)
        box = _predictor(remaining, f"BoxPredictor_{i}/BoxEncodingPredictor", 4, perm, TF_TO_TORCHVISION_BOX)
        cls = _predictor(remaining, f"BoxPredictor_{i}/ClassPredictor", num_logits, perm, tuple(range(num_logits)))
        for head, (weight, bias) in (("regression_head", box), ("classification_head", cls)):
            state[f"head.{head}.module_list.{i}.weight"] = weight
            state[f"head.{head}.module_list.{i}.bias"] = bias
    if remaining:
        names = sorted(remaining)
        more = " ..." if len(names) > 8 else ""
        raise ValueError(f"{len(names)} TF tensor(s) map to no SSD parameter: {names[:8]}{more}")
    return state


# ------------------------------------------------------------------------------------------
# per-anchor outputs


def normalized_anchors(model: SSD, size: int) -> Tensor:
    """Every anchor as ``(ymin, xmin, ymax, xmax)`` normalised to the input, in the model's order."""
    cells = _grid_sizes(size, len(model.anchor_generator.specs))
    xyxy = model.anchor_generator.grid_anchors([(c, c) for c in cells], (size, size), dtype=torch.float64) / size
    return xyxy[:, [1, 0, 3, 2]]


@torch.no_grad()
def decode_all_anchors(model: SSD, batch: Tensor) -> tuple[Tensor, Tensor]:
    """Decoded boxes and scores of every anchor, before any threshold or NMS.

    Args:
        model: an SSD whose backbone takes ``batch`` as is.
        batch: ``Tensor[N, 3, S, S]`` already preprocessed (for TF models: in [-1, 1]).

    Returns:
        ``boxes: [N, A, 4]`` as ``(ymin, xmin, ymax, xmax)`` normalised to the input (TF's
        convention) and ``scores: [N, A, num_classes]`` (sigmoid of the logits for a
        :class:`~mnapps.heads.ssd.SigmoidSSD`, else softmax).
    """
    features = list(model.backbone(batch).values())
    outputs = model.head(features)
    size = batch.shape[-1]
    anchors = model.anchor_generator(ImageList(batch, [tuple(batch.shape[-2:])] * len(batch)), features)
    boxes = torch.stack([model.box_coder.decode_single(d, a) for d, a in zip(outputs["bbox_regression"], anchors)])
    logits = outputs["cls_logits"]
    scores = torch.sigmoid(logits) if isinstance(model, SigmoidSSD) else torch.softmax(logits, dim=-1)
    return boxes[..., [1, 0, 3, 2]] / size, scores


# ------------------------------------------------------------------------------------------
# import


def _anchor_order_from_file(
    anchors: np.ndarray, cfg: SSDConfig, model: SSD, source: str
) -> InterpolatedAnchor:
    """Which anchor order reproduces the anchors stored in the file (TF.js exports keep them)."""
    ours = normalized_anchors(model, cfg.size).numpy()
    theirs = np.asarray(anchors, dtype=np.float64).reshape(-1, 4)
    errors = {}
    for order in ("last", "after_square"):
        index = source_anchor_index(cfg, order)
        errors[order] = np.abs(ours - theirs[index]).max() if len(theirs) == len(ours) else math.inf
        if errors[order] <= 1e-5:
            return order
    raise ValueError(
        f"the {len(theirs)} anchors stored in {source} do not match TF's ssd_anchor_generator for "
        f"size {cfg.size} (max error {min(errors.values()):.3g}); pass size= if the input size differs"
    )


def import_tf_od_api_ssd(
    source: str | os.PathLike | Mapping[str, np.ndarray],
    *,
    size: int | None = None,
    interpolated_anchor: InterpolatedAnchor | None = None,
    score_activation: Literal["sigmoid", "softmax"] = "sigmoid",
    preprocess: Literal["resize", "tf_resize", "tf_pad_resize"] | None = None,
) -> TFImportedSSD:
    """Build an mnapps SSD holding TF OD API ``ssd_mobilenet_v1`` weights (eval mode).

    Args:
        source: a TF.js folder/manifest, an ``.npz``, a TF checkpoint prefix, or a name -> array dict.
        size: input side; default the file's ``Preprocessor/ResizeImage/size`` (TF.js), else 300.
        interpolated_anchor: the source's anchor order (see :data:`InterpolatedAnchor`); default
            read from the file's anchors when it has them, else ``"last"``.
        score_activation: how the source turns logits into scores (TF OD API SSDs: sigmoid).
        preprocess: how the source resized photos (see ``SSDConfig.preprocess``); default
            ``"tf_pad_resize"`` for face-api.js's layout, ``"tf_resize"`` for the TF OD API's.

    Returns:
        the model (``model(list of Tensor[3, H, W] in [0, 1])`` preprocesses like TF and gives
        boxes in the photo's pixels) and the configs a checkpoint must record.

    Raises:
        ValueError: tensors that map to nothing, missing tensors, an unsupported architecture,
            or stored anchors that no TF ``ssd_anchor_generator`` order reproduces.
    """
    tensors = dict(source) if isinstance(source, Mapping) else read_tf_weights(source)
    where = "the given tensors" if isinstance(source, Mapping) else str(source)
    if size is None:
        stored = tensors.get("Preprocessor/ResizeImage/size")
        size = int(np.asarray(stored).ravel()[0]) if stored is not None else 300
    canonical, layout, skipped = canonical_tensors(tensors)
    ssd_cfg, backbone_cfg, num_classes = infer_configs(
        canonical, size=size, score_activation=score_activation, preprocess=preprocess or DEFAULT_PREPROCESS[layout]
    )
    model = build_ssd(ssd_cfg, num_classes=num_classes, backbone_cfg=backbone_cfg)
    if interpolated_anchor is None:
        stored = tensors.get("Output/extra_dim")
        interpolated_anchor = "last" if stored is None else _anchor_order_from_file(stored, ssd_cfg, model, where)
    state = tf_od_api_state_dict(canonical, ssd_cfg, interpolated_anchor)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    problems = [f"{k}: TF {tuple(state[k].shape)} vs model {tuple(v)}" for k, v in expected.items()
                if k in state and state[k].shape != v] + [f"{k}: unfilled" for k in expected if k not in state]
    if problems:
        raise ValueError(f"{where}: the TF tensors do not fit the SSD they describe: {problems[:4]}")
    model.load_state_dict(state, strict=False)  # num_batches_tracked keeps its default
    return TFImportedSSD(model.eval(), ssd_cfg, backbone_cfg, num_classes, layout, interpolated_anchor, skipped)


def keep_first_classes(imported: TFImportedSSD, keep: int) -> TFImportedSSD:
    """The same detector with only background and its first ``keep`` foreground classes.

    Exact for sigmoid scores (each class's score depends on its own logit only): the kept
    classes' scores and boxes are unchanged, the dropped classes are never reported. Each class
    predictor's output channels are ``anchor * num_classes + class``; the others are dropped.

    Raises:
        ValueError: softmax scores (dropping a class would change the others), or ``keep``
            not in ``1 .. num_classes - 1``.
    """
    if imported.ssd.score_activation != "sigmoid":
        raise ValueError("classes can be dropped exactly only from a model with sigmoid scores")
    if not 1 <= keep <= imported.num_classes - 1:
        raise ValueError(f"keep must be 1..{imported.num_classes - 1} foreground classes, got {keep}")
    state = imported.model.state_dict()
    for i, anchors in enumerate(imported.model.anchor_generator.num_anchors_per_location()):
        index = torch.tensor([a * imported.num_classes + c for a in range(anchors) for c in range(keep + 1)])
        for part in ("weight", "bias"):
            key = f"head.classification_head.module_list.{i}.{part}"
            state[key] = state[key][index].clone()
    model = build_ssd(imported.ssd, num_classes=keep + 1, backbone_cfg=imported.backbone)
    model.load_state_dict(state)
    return dataclasses.replace(imported, model=model.eval(), num_classes=keep + 1)
