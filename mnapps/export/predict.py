"""The fast PyTorch inference path: BN folded, channels_last, inference mode, optional compile.

Training-mode models carry costs inference does not need: a BatchNorm pass after every
convolution, NCHW tensors (oneDNN's CPU convolutions, and cuDNN's with tensor cores, run
fastest on NHWC and otherwise convert at every layer), autograd bookkeeping, and Python
dispatch between ~90 small ops. This module owns :class:`Predictor`, which removes them for
any tensor-in/tensor-out mnapps model (the classifier, the face embedder, an SSD's
:class:`~mnapps.export.detection.SSDNetwork`):

1. :func:`mnapps.export.fuse.fold_batchnorm` (a copy; the training model is untouched),
2. weights converted to ``torch.channels_last`` and inputs likewise,
3. every call under ``torch.inference_mode()``,
4. optionally ``torch.compile`` (Inductor). On CPU Inductor's *freezing* is switched on:
   with weights known to be constants it pre-packs them into oneDNN's blocked layout once
   instead of at every call, which is most of compile's gain for convolutional nets.

:class:`SSDPredictor` runs an SSD end to end through the same pre/post-processing as the
ONNX Runtime path (:mod:`mnapps.export.postprocess`). Both give the training model's
eval-mode answers (tested to ~1e-4).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from .detection import split_ssd
from .fuse import fold_batchnorm
from .postprocess import postprocess_ssd, preprocess_images

__all__ = ["Predictor", "SSDPredictor", "DEFAULT_COMPILE_MODE"]

# "max-autotune-no-cudagraphs" also benchmarks GEMM templates (minutes of compile on a CPU,
# little gain for a network of convolutions); the default mode with freezing is the fast one.
DEFAULT_COMPILE_MODE = "default"


class Predictor:
    """Fast inference wrapper around a module that maps ``Tensor[N, C, H, W]`` to outputs.

    Args:
        model: the trained model (any mode; a folded copy is made, ``model`` is untouched).
        channels_last: NHWC weights and inputs (the fast layout for oneDNN and cuDNN).
        compile: wrap the folded model in ``torch.compile``; the first call compiles (tens of
            seconds on a CPU), later calls with the same input shape are fast.
        compile_mode: ``torch.compile`` mode; with ``"default"`` on CPU, Inductor's freezing is
            switched on for this model (other modes use the global Inductor config).
        device: where to run; default: where the model's parameters are.
        fold_bn: fold BatchNorm into the preceding convolutions (default).

    Calling ``predictor(x)`` returns exactly what ``model.eval()(x)`` returns, to float32
    rounding. ``predictor.module`` is the folded, converted (uncompiled) module.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        channels_last: bool = True,
        compile: bool = False,
        compile_mode: str = DEFAULT_COMPILE_MODE,
        device: torch.device | str | None = None,
        fold_bn: bool = True,
    ) -> None:
        module = fold_batchnorm(model) if fold_bn else _eval_copy(model)
        if device is None:
            first = next(module.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        module = module.to(self.device)
        self.channels_last = channels_last
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        module.requires_grad_(False)
        self.module = module
        self.compiled = compile
        if compile:
            if self.device.type == "cpu" and compile_mode == "default":
                # Inductor config for this model only (mode and options are exclusive).
                self._forward = torch.compile(module, dynamic=False, options={"freezing": True})
            else:
                self._forward = torch.compile(module, mode=compile_mode, dynamic=False)
        else:
            self._forward = module

    def prepare(self, x: Tensor) -> Tensor:
        """Move a batch to the device and layout the module runs in."""
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(
                f"Predictor expects a batch Tensor[N, C, H, W], got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.to(self.device, memory_format=memory_format)

    def __call__(self, x: Tensor):
        with torch.inference_mode():
            return self._forward(self.prepare(x))


def _eval_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


class SSDPredictor:
    """A torchvision SSD run through the fast path and the shared post-processing.

    ``detector(images: list[Tensor[3, H, W] in [0, 1]])`` returns the same
    ``list[{"boxes", "scores", "labels"}]`` as ``model.eval()(images)``; the network part
    (standardisation, backbone, head) runs through a :class:`Predictor`.

    Args:
        model: a torchvision ``SSD`` (e.g. from :func:`mnapps.heads.ssd.build_ssd`).
        **predictor_kwargs: passed to :class:`Predictor` (``channels_last``, ``compile``, ...).
    """

    def __init__(self, model: nn.Module, **predictor_kwargs) -> None:
        was_training = model.training
        model.eval()
        try:
            network, self.params = split_ssd(model)
            self.network = Predictor(network, **predictor_kwargs)
        finally:
            model.train(was_training)

    def raw(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``batch [N, 3, S_h, S_w]`` in [0, 1] -> (bbox_regression, cls_logits, anchors)."""
        return self.network(batch)

    def __call__(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        batch, sizes = preprocess_images(images, self.params.size, self.params.preprocess)
        with torch.inference_mode():
            regression, logits, anchors = self.raw(batch)
            detections = postprocess_ssd(regression.cpu(), logits.cpu(), anchors.cpu(), self.params, sizes)
        return detections
