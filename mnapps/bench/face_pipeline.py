"""Whole face pipelines for tools/face_pipeline_bench.py: a detector, the crops, an embedder.

This module owns the runtime side of that benchmark: the SSD face detector and the face
embedder run either as PyTorch modules or from the ONNX files ``tools/export.py`` writes (ONNX
Runtime, the exported graph's own pre- and post-processing), behind the same two calls:

* a *detector* is ``detect(image uint8[H, W, 3]) -> (boxes float32[N, 4], scores float32[N])``,
  what :class:`mnapps.data.box_crops.BoxFaceAligner` takes (:func:`ort_box_detector` for an
  exported SSD, :func:`mnapps.tasks.detection.box_detector` for a PyTorch one);
* an *embedder* is a module mapping ``[N, 3, S, S]`` images in [0, 1] to ``[N, D]`` embeddings
  (:class:`OrtEmbedder` for an exported one, which is what :func:`mnapps.eval.face.embed_faces`
  and :func:`mnapps.tasks.face.evaluate_face_verification` take), and :func:`embed_crops`
  embeds one photo's crops as the pipeline does, in one batch.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mnapps.data.transforms import sample_to_tensors
from mnapps.export.onnx import OrtModel, OrtSSD

__all__ = ["OrtEmbedder", "embed_crops", "ort_box_detector"]

_NO_BOXES = np.zeros((0, 4), dtype=np.float32)
_NO_LABELS = np.zeros((0,), dtype=np.int64)


class OrtEmbedder(nn.Module):
    """An exported face embedder (``embeddings`` output) run by ONNX Runtime, as a module."""

    def __init__(self, path: str | os.PathLike, *, threads: int = 1) -> None:
        super().__init__()
        self.ort = OrtModel(path, threads=threads)
        if "embeddings" not in self.ort.output_names:
            raise ValueError(f"{path} has no 'embeddings' output ({self.ort.output_names}): export a face "
                             f"embedder checkpoint with tools/export.py")

    def forward(self, images: Tensor) -> Tensor:
        return torch.from_numpy(self.ort(images)["embeddings"])


def ort_box_detector(path: str | os.PathLike, *, label: int = 1, threads: int = 1
                     ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``detect`` (see the module docstring) for an SSD exported by ``tools/export.py``: the same
    photo tensor as the PyTorch detector gets, the graph, then mnapps' shared decoding and NMS."""
    ssd = OrtSSD(path, threads=threads)

    def detect(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = ssd([sample_to_tensors(image, _NO_BOXES, _NO_LABELS)[0]])[0]
        keep = found["labels"] == label
        return found["boxes"][keep].float().numpy(), found["scores"][keep].float().numpy()

    return detect


@torch.inference_mode()
def embed_crops(model: nn.Module, crops: Sequence[np.ndarray]) -> Tensor:
    """One photo's ``uint8[S, S, 3]`` crops embedded in one batch (``[N, D]``, L2-normalised rows).

    The crops go in as :func:`mnapps.eval.face.embed_faces` feeds them: RGB scaled to [0, 1].
    """
    if not crops:
        return torch.zeros(0, 0)
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div_(255.0)
    return torch.nn.functional.normalize(model(batch).float(), dim=1)
