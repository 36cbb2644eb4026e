"""Deployment: BN folding, the fast PyTorch predictor, ONNX export with parity checks, int8.

Submodules: :mod:`~mnapps.export.fuse` (BatchNorm folding), :mod:`~mnapps.export.predict`
(channels_last / inference-mode / ``torch.compile`` predictor), :mod:`~mnapps.export.postprocess`
and :mod:`~mnapps.export.detection` (an SSD split into its graph and the shared decoding + NMS),
:mod:`~mnapps.export.onnx` (export, ONNX Runtime sessions, parity checks),
:mod:`~mnapps.export.quantize` (static int8), :mod:`~mnapps.export.pipeline` (checkpoint ->
checked ONNX files, used by ``tools/export.py``) and :mod:`~lab.models` (used by
``tools/benchmark.py``). The ONNX modules need the ``export`` extra (onnx, onnxruntime,
onnxscript) and are not imported here.
"""

from .detection import SSDNetwork, split_ssd
from .fuse import count_batchnorms, fold_batchnorm
from .postprocess import SSDPostprocessParams, postprocess_ssd, preprocess_images
from .predict import Predictor, SSDPredictor

__all__ = [
    "SSDNetwork",
    "split_ssd",
    "count_batchnorms",
    "fold_batchnorm",
    "SSDPostprocessParams",
    "postprocess_ssd",
    "preprocess_images",
    "Predictor",
    "SSDPredictor",
]
