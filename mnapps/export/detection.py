"""Splitting a torchvision SSD into its exportable network and its post-processing settings.

A torchvision ``SSD`` in eval mode does four things: resize + standardise the images, run
backbone and head, generate anchors, and decode + NMS. Only the second is worth putting in
an ONNX graph (NMS and data-dependent shapes export badly and run no faster there), and the
anchors are constant for a fixed input size. This module owns :class:`SSDNetwork` (the
standardisation + backbone + head, returning raw outputs and the constant anchors) and
:func:`split_ssd`, which also reads every pre- and post-processing setting off the model into
an :class:`mnapps.export.postprocess.SSDPostprocessParams` (the resize its transform does -
torchvision's, or TF's for models imported from the TF Object Detection API - and softmax or
sigmoid scores). ``preprocess_images`` ->
``SSDNetwork`` -> ``postprocess_ssd`` reproduces ``model.eval()(images)`` (tested).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD

from .postprocess import SSDPostprocessParams

__all__ = ["SSDNetwork", "split_ssd", "ssd_input_size"]


def ssd_input_size(model: SSD) -> tuple[int, int]:
    """The ``(height, width)`` a torchvision SSD resizes every image to."""
    fixed = getattr(model.transform, "fixed_size", None)
    if fixed is None:
        raise ValueError(
            f"{type(model).__name__} has no fixed input size (transform.fixed_size is None); "
            "only fixed-size SSDs can be split for export"
        )
    # torchvision stores fixed_size as (width, height) and resizes to (fixed[1], fixed[0]).
    return int(fixed[1]), int(fixed[0])


class SSDNetwork(nn.Module):
    """The exportable part of a torchvision SSD: standardisation, backbone and head.

    ``forward(images: Tensor[N, 3, S_h, S_w] in [0, 1])`` returns
    ``(bbox_regression Tensor[N, A, 4], cls_logits Tensor[N, A, C], anchors Tensor[A, 4])``;
    the anchors (xyxy, input pixels) are a constant buffer, returned so that an exported
    graph carries them. Backbone and head modules are shared with the SSD, not copied.
    """

    def __init__(self, model: SSD) -> None:
        super().__init__()
        if not isinstance(model, SSD):
            raise ValueError(f"expected a torchvision SSD, got {type(model).__name__}")
        self.backbone = model.backbone
        self.head = model.head
        self.size = ssd_input_size(model)
        self.register_buffer("mean", torch.tensor(model.transform.image_mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(model.transform.image_std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("anchors", self._make_anchors(model))

    def _features(self, images: Tensor) -> list[Tensor]:
        features = self.backbone((images - self.mean) / self.std)
        if isinstance(features, Tensor):
            return [features]
        return list(features.values()) if isinstance(features, (dict, OrderedDict)) else list(features)

    @torch.no_grad()
    def _make_anchors(self, model: SSD) -> Tensor:
        # Anchors depend only on the input size and the feature-map sizes: run the backbone once
        # on a blank image (in eval mode, so BatchNorm statistics are left alone).
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            dummy = torch.zeros(1, 3, *self.size, device=self.mean.device)
            features = self._features(dummy)
        finally:
            self.backbone.train(was_training)
        anchors = model.anchor_generator(ImageList(dummy, [self.size]), features)[0]
        return anchors.float().contiguous()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        outputs = self.head(self._features(images))
        return outputs["bbox_regression"], outputs["cls_logits"], self.anchors


def split_ssd(model: SSD, class_names: tuple[str, ...] = ()) -> tuple[SSDNetwork, SSDPostprocessParams]:
    """``(network, params)`` such that ``postprocess_ssd(*network(batch), params, sizes)``
    equals ``model.eval()(images)`` for ``batch, sizes = preprocess_images(images, params.size,
    params.preprocess)``.
    """
    network = SSDNetwork(model)
    coder = model.box_coder
    params = SSDPostprocessParams(
        size=network.size,
        score_thresh=float(model.score_thresh),
        nms_thresh=float(model.nms_thresh),
        topk_candidates=int(model.topk_candidates),
        detections_per_img=int(model.detections_per_img),
        box_coder_weights=tuple(float(w) for w in coder.weights),
        bbox_xform_clip=float(coder.bbox_xform_clip),
        image_mean=tuple(float(v) for v in model.transform.image_mean),
        image_std=tuple(float(v) for v in model.transform.image_std),
        class_names=tuple(class_names),
        preprocess=getattr(model.transform, "preprocess", "resize"),
        score_activation=getattr(model, "score_activation", "softmax"),
    )
    return network, params
