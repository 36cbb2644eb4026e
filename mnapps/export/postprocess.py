"""SSD pre- and post-processing shared by the PyTorch fast path and the ONNX Runtime path.

An exported SSD graph holds only the network: it maps a batch of resized images in [0, 1]
to raw per-anchor box regressions and class logits (and the constant anchors). Everything
around it lives here, in plain PyTorch, so the PyTorch predictor and the ONNX Runtime
runner run *the same* code and cannot drift apart:

1. :func:`preprocess_images` - each image ``Tensor[3, H, W]`` in [0, 1] is resized to the
   network size ``(S_h, S_w)`` as the model's own transform does (``params.preprocess``):
   torchvision's bilinear interpolation (``align_corners=False``, as its
   ``GeneralizedRCNNTransform``), TF's legacy bilinear resize (models imported from the TF
   Object Detection API), or a bottom/right zero-pad to a square followed by TF's resize
   (face-api.js) - and stacked into ``Tensor[N, 3, S_h, S_w]``. Standardisation (mnapps: to
   [-1, 1]) is inside the graph.
2. the network (PyTorch or ONNX Runtime) -> ``bbox_regression Tensor[N, A, 4]``,
   ``cls_logits Tensor[N, A, C]`` (class 0 = background), ``anchors Tensor[A, 4]`` (xyxy,
   pixels of the resized image).
3. :func:`postprocess_ssd` - per image: decode the regressions against the anchors
   (``(dx, dy, dw, dh)`` scaled by the box-coder weights, 10/10/5/5 for SSD, with ``dw, dh``
   clamped at ``log(1000/16)`` before ``exp``), clip to the resized image, turn the logits
   into scores (softmax, or per-class sigmoid for models with ``score_activation="sigmoid"``),
   keep for every foreground class the ``topk_candidates`` best scores above
   ``score_thresh``, run class-aware NMS (``torchvision.ops.batched_nms``, IoU
   ``nms_thresh``), keep the ``detections_per_img`` best and scale the boxes back to the
   original image (for TF preprocessing: to the picture that was resized, the photo or its
   padded square, and clipped to it). This is the rule torchvision's ``SSD`` (and mnapps'
   ``SigmoidSSD`` with ``TFResizeTransform``) applies in eval mode, so the detections equal
   ``model.eval()(images)`` (tested).

:class:`SSDPostprocessParams` carries every setting; it is stored as JSON in the ONNX file's
metadata, so an exported model is self-describing.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

from mnapps.heads.ssd import tf_pad_resize, tf_resize_bilinear

__all__ = [
    "SSDPostprocessParams",
    "preprocess_images",
    "decode_boxes",
    "postprocess_ssd",
]

# torchvision's BoxCoder default: keeps exp() of a wild regression finite.
DEFAULT_BBOX_XFORM_CLIP = math.log(1000.0 / 16)
PREPROCESS_MODES = ("resize", "tf_resize", "tf_pad_resize")
SCORE_ACTIVATIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class SSDPostprocessParams:
    """Everything outside the network that an SSD needs to turn raw outputs into detections.

    Attributes:
        size: network input ``(height, width)`` in pixels.
        score_thresh: minimum score of a kept (anchor, class) pair.
        nms_thresh: IoU above which NMS drops the lower-scoring box of the same class.
        topk_candidates: at most this many candidates per class enter NMS.
        detections_per_img: at most this many detections are returned per image.
        box_coder_weights: ``(wx, wy, ww, wh)`` dividing the regressions (SSD: 10, 10, 5, 5).
        bbox_xform_clip: upper clamp of ``dw, dh`` before ``exp``.
        image_mean, image_std: the standardisation the graph applies to [0, 1] inputs
            (informational: it is inside the graph; mnapps uses 0.5/0.5, i.e. [-1, 1]).
        class_names: optional, index = label (``class_names[0]`` is the background).
        preprocess: how photos become the network input (``SSDConfig.preprocess``):
            ``"resize"`` (torchvision), ``"tf_resize"`` or ``"tf_pad_resize"``.
        score_activation: ``"softmax"`` over all logits or per-class ``"sigmoid"``.
    """

    size: tuple[int, int]
    score_thresh: float = 0.01
    nms_thresh: float = 0.45
    topk_candidates: int = 400
    detections_per_img: int = 200
    box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    class_names: tuple[str, ...] = field(default=())
    preprocess: str = "resize"
    score_activation: str = "softmax"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) <= 0:
            raise ValueError(f"size must be (height, width) > 0, got {self.size!r}")
        if not 0.0 <= self.nms_thresh <= 1.0:
            raise ValueError(f"nms_thresh must be in [0, 1], got {self.nms_thresh}")
        if self.topk_candidates <= 0 or self.detections_per_img <= 0:
            raise ValueError(
                f"topk_candidates and detections_per_img must be > 0, got "
                f"{self.topk_candidates} and {self.detections_per_img}"
            )
        if len(self.box_coder_weights) != 4:
            raise ValueError(f"box_coder_weights needs 4 values, got {self.box_coder_weights!r}")
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {list(PREPROCESS_MODES)}, got {self.preprocess!r}")
        if self.score_activation not in SCORE_ACTIVATIONS:
            raise ValueError(
                f"score_activation must be one of {list(SCORE_ACTIVATIONS)}, got {self.score_activation!r}"
            )
        if self.preprocess == "tf_pad_resize" and self.size[0] != self.size[1]:
            raise ValueError(f"preprocess tf_pad_resize needs a square input size, got {self.size!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SSDPostprocessParams":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"SSD post-processing metadata is not valid JSON: {exc}") from None
        for key in ("size", "box_coder_weights", "image_mean", "image_std", "class_names"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def _resize_one(image: Tensor, size: tuple[int, int], preprocess: str) -> Tensor:
    """One ``Tensor[3, H, W]`` in [0, 1] -> ``Tensor[3, S_h, S_w]`` float32, as the model's transform."""
    image = image.float()
    if preprocess == "tf_resize":
        return tf_resize_bilinear(image, tuple(size))
    if preprocess == "tf_pad_resize":
        return tf_pad_resize(image, size[0])[0]
    if tuple(image.shape[-2:]) == tuple(size):
        return image  # bilinear resize to the same size is the identity
    return F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def preprocess_images(
    images: Sequence[Tensor] | Tensor, size: tuple[int, int], preprocess: str = "resize"
) -> tuple[Tensor, list[tuple[int, int]]]:
    """Resize images to the network size and stack them.

    Args:
        images: a list of ``Tensor[3, H_i, W_i]`` in [0, 1] (sizes may differ), or one
            ``Tensor[N, 3, H, W]``.
        size: network input ``(S_h, S_w)``.
        preprocess: ``params.preprocess``: ``"resize"`` (torchvision's bilinear resize),
            ``"tf_resize"`` (TF's legacy bilinear resize) or ``"tf_pad_resize"`` (zero-pad
            bottom/right to a square, then TF's resize), exactly as the PyTorch model does.

    Returns:
        ``(batch Tensor[N, 3, S_h, S_w] float32 in [0, 1], original_sizes [(H_i, W_i)])``.
    """
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"preprocess must be one of {list(PREPROCESS_MODES)}, got {preprocess!r}")
    if isinstance(images, Tensor) and images.dim() == 4:
        images = list(images)
    if isinstance(images, Tensor) or len(images) == 0:
        raise ValueError("pass a non-empty list of Tensor[3, H, W] images (or a Tensor[N, 3, H, W])")
    resized, original_sizes = [], []
    for index, image in enumerate(images):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(
                f"image {index} has shape {tuple(image.shape)}; expected Tensor[3, H, W] RGB in [0, 1]"
            )
        original_sizes.append((int(image.shape[-2]), int(image.shape[-1])))
        resized.append(_resize_one(image, size, preprocess))
    return torch.stack(resized), original_sizes


def decode_boxes(
    rel_codes: Tensor,
    anchors: Tensor,
    weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
    bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP,
) -> Tensor:
    """Apply regressions ``Tensor[A, 4]`` (dx, dy, dw, dh) to anchors ``Tensor[A, 4]`` (xyxy).

    Returns:
        ``Tensor[A, 4]`` decoded boxes, xyxy in the anchors' pixel frame.
    """
    anchors = anchors.to(rel_codes.dtype)
    anchor_w = anchors[:, 2] - anchors[:, 0]
    anchor_h = anchors[:, 3] - anchors[:, 1]
    center_x = anchors[:, 0] + 0.5 * anchor_w
    center_y = anchors[:, 1] + 0.5 * anchor_h
    wx, wy, ww, wh = weights
    dx, dy = rel_codes[:, 0] / wx, rel_codes[:, 1] / wy
    dw = torch.clamp(rel_codes[:, 2] / ww, max=bbox_xform_clip)
    dh = torch.clamp(rel_codes[:, 3] / wh, max=bbox_xform_clip)
    box_cx = dx * anchor_w + center_x
    box_cy = dy * anchor_h + center_y
    half_w = 0.5 * (torch.exp(dw) * anchor_w)
    half_h = 0.5 * (torch.exp(dh) * anchor_h)
    return torch.stack((box_cx - half_w, box_cy - half_h, box_cx + half_w, box_cy + half_h), dim=1)


def _as_tensor(value: Tensor | np.ndarray) -> Tensor:
    return value if isinstance(value, Tensor) else torch.from_numpy(np.asarray(value))


def _to_original(boxes: Tensor, original: tuple[int, int], params: SSDPostprocessParams) -> Tensor:
    """Boxes in network-input pixels -> pixels of the original image, as the model's transform."""
    network_h, network_w = params.size
    height, width = original
    if params.preprocess == "resize":
        # Same float32 ratios as torchvision's transform.postprocess (no clipping there).
        ratio_h = torch.tensor(height, dtype=torch.float32) / torch.tensor(network_h, dtype=torch.float32)
        ratio_w = torch.tensor(width, dtype=torch.float32) / torch.tensor(network_w, dtype=torch.float32)
        return boxes * torch.stack((ratio_w, ratio_h, ratio_w, ratio_h))
    # TFResizeTransform.postprocess: back to the picture that was resized (the photo, or its
    # zero-padded square), clipped to it.
    if params.preprocess == "tf_pad_resize":
        height = width = max(height, width)
    scale = torch.tensor([width, height] * 2, dtype=boxes.dtype) / torch.tensor(
        [network_w, network_h] * 2, dtype=boxes.dtype
    )
    return clip_boxes_to_image(boxes * scale, (height, width))


def _scores(cls_logits: Tensor, activation: str) -> Tensor:
    logits = cls_logits.float()
    return torch.sigmoid(logits) if activation == "sigmoid" else F.softmax(logits, dim=-1)


def postprocess_ssd(
    bbox_regression: Tensor | np.ndarray,
    cls_logits: Tensor | np.ndarray,
    anchors: Tensor | np.ndarray,
    params: SSDPostprocessParams,
    original_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[dict[str, Tensor]]:
    """Raw SSD outputs -> torchvision-style detections (see the module docstring for the rule).

    Args:
        bbox_regression: ``[N, A, 4]`` raw regressions (Tensor or numpy array from ORT).
        cls_logits: ``[N, A, C]`` raw class logits, class 0 = background.
        anchors: ``[A, 4]`` xyxy anchors in pixels of the ``params.size`` input.
        params: post-processing settings.
        original_sizes: ``(H, W)`` of each image before :func:`preprocess_images`; boxes are
            scaled back to it. ``None`` leaves them in network-input pixels.

    Returns:
        One dict per image: ``boxes`` float ``[D, 4]`` xyxy pixels, ``scores`` float ``[D]``
        sorted descending, ``labels`` int64 ``[D]`` in ``1..C-1``.
    """
    bbox_regression, cls_logits, anchors = map(_as_tensor, (bbox_regression, cls_logits, anchors))
    if bbox_regression.dim() != 3 or cls_logits.dim() != 3 or anchors.dim() != 2:
        raise ValueError(
            f"expected bbox_regression [N, A, 4], cls_logits [N, A, C], anchors [A, 4]; got "
            f"{tuple(bbox_regression.shape)}, {tuple(cls_logits.shape)}, {tuple(anchors.shape)}"
        )
    num_images, num_anchors = bbox_regression.shape[:2]
    if cls_logits.shape[:2] != (num_images, num_anchors) or anchors.shape[0] != num_anchors:
        raise ValueError(
            f"anchor counts disagree: bbox_regression {tuple(bbox_regression.shape)}, "
            f"cls_logits {tuple(cls_logits.shape)}, anchors {tuple(anchors.shape)}"
        )
    if original_sizes is not None and len(original_sizes) != num_images:
        raise ValueError(f"got {len(original_sizes)} original sizes for {num_images} images")
    scores_all = _scores(cls_logits, params.score_activation)
    num_foreground = scores_all.shape[-1] - 1
    candidates = min(params.topk_candidates, num_anchors)
    detections = []
    for index in range(num_images):
        boxes = decode_boxes(
            bbox_regression[index].float(), anchors, params.box_coder_weights, params.bbox_xform_clip
        )
        boxes = clip_boxes_to_image(boxes, tuple(params.size))
        # Class by class, in the order torchvision uses, so that score ties (common in an
        # untrained network) are broken identically and the detections match exactly.
        class_scores = scores_all[index, :, 1:].T  # [C-1, A]
        kept_boxes, kept_scores, kept_labels = [], [], []
        for label in range(1, num_foreground + 1):
            score = class_scores[label - 1]
            above = score > params.score_thresh
            score, box = score[above], boxes[above]
            score, order = score.topk(min(candidates, score.numel()))
            kept_boxes.append(box[order])
            kept_scores.append(score)
            kept_labels.append(torch.full_like(order, label))
        candidate_boxes = torch.cat(kept_boxes)
        scores = torch.cat(kept_scores)
        labels = torch.cat(kept_labels)
        kept = batched_nms(candidate_boxes, scores, labels, params.nms_thresh)[: params.detections_per_img]
        result_boxes = candidate_boxes[kept]
        if original_sizes is not None:
            result_boxes = _to_original(result_boxes, original_sizes[index], params)
        detections.append({"boxes": result_boxes, "scores": scores[kept], "labels": labels[kept]})
    return detections
