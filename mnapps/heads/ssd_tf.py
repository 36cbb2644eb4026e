"""The TF Object Detection API's conventions for an SSD: TF's bilinear resize and sigmoid scores.

This module owns what an SSD needs to reproduce a model trained in TensorFlow
(:mod:`mnapps.importers.tf_od_api` imports them): :func:`tf_resize_bilinear` (TF's legacy
``align_corners=False, half_pixel_centers=False`` resize), :func:`tf_pad_resize` (face-api.js:
pad to a square first), :class:`TFResizeTransform` (both as a torchvision detection transform)
and :class:`SigmoidSSD` (per-class sigmoid scores and loss). :func:`mnapps.heads.ssd.build_ssd`
selects them with ``SSDConfig.preprocess`` and ``SSDConfig.score_activation``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.ops import boxes as box_ops

__all__ = ["tf_resize_bilinear", "tf_pad_resize", "TFResizeTransform", "SigmoidSSD"]


# ------------------------------------------------------------------------------------------
# TF's preprocessing and sigmoid scores (models imported from the TF Object Detection API)


def _tf_source_coords(in_size: int, out_size: int) -> tuple[Tensor, Tensor, Tensor]:
    # TF's legacy resize (align_corners=False, half_pixel_centers=False): src = dst * in / out,
    # neighbours floor(src) and ceil(src) clamped to the image, weight src - floor(src).
    src = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    low = src.floor().clamp(min=0)
    high = src.ceil().clamp(max=in_size - 1)
    return low.long(), high.long(), src - low


def _tf_resize(images: Tensor, size: tuple[int, int], seen: tuple[int, int]) -> Tensor:
    """TF's legacy resize of the ``seen`` (height, width) picture whose top-left part is ``images``.

    Rows and columns of ``seen`` beyond ``images`` are zeros (the bottom/right padding), read
    without building the padded picture. Only the source rows and columns that the output
    samples are gathered (in the input dtype, then float64), so a large photo costs little.
    """
    height, width = images.shape[-2:]
    y0, y1, fy = _tf_source_coords(seen[0], size[0])
    x0, x1, fx = _tf_source_coords(seen[1], size[1])

    top_rows, bottom_rows = images[..., y0.clamp(max=height - 1), :], images[..., y1.clamp(max=height - 1), :]

    def gather(picked_rows: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        picked = picked_rows[..., cols.clamp(max=width - 1)].double()
        if seen == (height, width):
            return picked
        return picked * ((rows < height)[:, None] & (cols < width)[None, :])  # zeros in the padding

    top_left, bottom_left = gather(top_rows, y0, x0), gather(bottom_rows, y1, x0)
    top = top_left + (gather(top_rows, y0, x1) - top_left) * fx
    bottom = bottom_left + (gather(bottom_rows, y1, x1) - bottom_left) * fx
    return (top + (bottom - top) * fy[:, None]).to(images.dtype)


def tf_resize_bilinear(images: Tensor, size: tuple[int, int]) -> Tensor:
    """``tf.image.resize_bilinear(align_corners=False, half_pixel_centers=False)``, exactly.

    ``images: Tensor[..., H, W]`` -> ``Tensor[..., size[0], size[1]]`` of the same dtype,
    computed in float64: along x within the two source rows, then along y (TF's order).
    torch's ``interpolate`` has no such mode (its ``align_corners=False`` is half-pixel).
    """
    return _tf_resize(images, tuple(size), tuple(images.shape[-2:]))


def tf_pad_resize(image: Tensor, size: int) -> tuple[Tensor, int]:
    """``Tensor[C, H, W]`` zero-padded bottom/right to a square, then :func:`tf_resize_bilinear`.

    Returns the ``[C, size, size]`` image (same range and dtype) and the padded square's side:
    a box normalised to the network input is ``box * side`` in the photo's pixels.
    """
    side = max(image.shape[-2:])
    return _tf_resize(image, (size, size), (side, side)), side


class TFResizeTransform(nn.Module):
    """TF's input pipeline in the interface of torchvision's ``GeneralizedRCNNTransform``.

    ``images: list[Tensor[3, H, W]]`` in [0, 1] -> ``ImageList`` ``[N, 3, size, size]`` in [-1, 1]:
    :func:`tf_resize_bilinear` of the image (the TF OD API's ``fixed_shape_resizer``), or with
    ``pad_to_square`` of its bottom/right zero-padded square (:func:`tf_pad_resize`, face-api.js),
    then ``2x - 1``, i.e. ``x255 / 127.5 - 1``. Target boxes are scaled into the input, and
    detections back to the photo's pixels, clipped to what the network saw: the photo, or the
    padded square (as face-api.js does, so a box may reach into the padding).
    """

    # 2x - 1 written as torchvision's (x - mean) / std, for code that reads a transform's
    # standardisation (the ONNX export puts it inside the graph).
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)

    def __init__(self, size: int, *, pad_to_square: bool) -> None:
        super().__init__()
        self.size = size
        self.pad_to_square = pad_to_square

    @property
    def fixed_size(self) -> tuple[int, int]:
        """``(width, height)`` every image is resized to, as torchvision's transform stores it."""
        return self.size, self.size

    @property
    def preprocess(self) -> str:
        """The ``SSDConfig.preprocess`` value this transform implements."""
        return "tf_pad_resize" if self.pad_to_square else "tf_resize"

    def _seen(self, height: int, width: int) -> tuple[int, int]:
        # The (height, width) of the picture that was resized to size x size.
        side = max(height, width)
        return (side, side) if self.pad_to_square else (height, width)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        batch, scales = [], []
        for image in images:
            height, width = self._seen(*image.shape[-2:])
            if self.pad_to_square:
                resized, _ = tf_pad_resize(image, self.size)
            else:
                resized = tf_resize_bilinear(image, (self.size, self.size))
            batch.append(resized * 2 - 1)
            scales.append(torch.tensor([self.size / width, self.size / height] * 2))
        if targets is not None:
            targets = [{**target, "boxes": target["boxes"] * scale} for target, scale in zip(targets, scales)]
        return ImageList(torch.stack(batch), [(self.size, self.size)] * len(batch)), targets

    def postprocess(self, result, image_shapes, original_image_sizes):
        for detections, size in zip(result, original_image_sizes):
            height, width = self._seen(*size)
            scale = torch.tensor([width, height] * 2, dtype=detections["boxes"].dtype) / self.size
            detections["boxes"] = box_ops.clip_boxes_to_image(detections["boxes"] * scale, (height, width))
        return result


class SigmoidSSD(SSD):
    """torchvision's SSD with the TF OD API's sigmoid classification.

    Scores are ``sigmoid(logit)`` per class (logit 0 is background and never reported);
    thresholding, top-k, class-wise NMS and the box loss are torchvision's. The classification
    loss is binary cross-entropy summed over the classes of each anchor against its one-hot
    label (background included, like TF's ``weighted_sigmoid``), on the positives and the
    ``neg_to_pos_ratio`` hardest negatives per image, divided by the number of positives.
    """

    score_activation = "sigmoid"  # what export's post-processing applies (torchvision's SSD: softmax)

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)  # its box loss
        logits = head_outputs["cls_logits"]
        labels = torch.stack([
            torch.where(matched >= 0, target["labels"][matched.clamp(min=0)], 0) if target["labels"].numel()
            else torch.zeros_like(matched)
            for target, matched in zip(targets, matched_idxs)
        ])
        one_hot = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        per_anchor = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none").sum(-1)
        positive = labels > 0
        negative_loss = per_anchor.detach().masked_fill(positive, -math.inf)
        rank = negative_loss.argsort(dim=1, descending=True).argsort(dim=1)
        negative = (rank < self.neg_to_pos_ratio * positive.sum(dim=1, keepdim=True)) & ~positive
        losses["classification"] = (per_anchor[positive].sum() + per_anchor[negative].sum()) / max(1, positive.sum())
        return losses

    def postprocess_detections(self, head_outputs, image_anchors, image_shapes):
        detections = []
        all_scores = torch.sigmoid(head_outputs["cls_logits"])
        per_image = zip(head_outputs["bbox_regression"], all_scores, image_anchors, image_shapes)
        for deltas, scores, anchors, shape in per_image:
            boxes = box_ops.clip_boxes_to_image(self.box_coder.decode_single(deltas, anchors), shape)
            kept_boxes, kept_scores, kept_labels = [], [], []
            for label in range(1, scores.shape[-1]):
                candidates = torch.where(scores[:, label] > self.score_thresh)[0]
                score = scores[candidates, label]
                score, order = score.topk(det_utils._topk_min(score, self.topk_candidates, 0))
                kept_boxes.append(boxes[candidates[order]])
                kept_scores.append(score)
                kept_labels.append(torch.full_like(order, label))
            boxes, scores, labels = torch.cat(kept_boxes), torch.cat(kept_scores), torch.cat(kept_labels)
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections
