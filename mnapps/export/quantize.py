"""Post-training static int8 quantization of exported graphs with ONNX Runtime's quantizer.

This module owns :func:`quantize_onnx` and the calibration inputs it needs. The recipe,
chosen for ONNX Runtime's CPU kernels:

* **static**: activation ranges are measured once on calibration images (a few dozen
  images of the deployment domain are enough for a MobileNet) instead of at run time;
* **QDQ format** (QuantizeLinear/DequantizeLinear pairs around each op): ONNX Runtime fuses
  them into its int8 kernels (QLinearConv, including the depthwise ones) and drops the
  ReLU6 ``Clip`` into the quantized range;
* **per-channel symmetric int8 weights**: a depthwise filter's 3x3 kernels have very
  different scales, one scale per output channel keeps each of them precise (per-tensor
  weights lose several top-1 points on MobileNets, cf. Krishnamoorthi 2018, arXiv 1806.08342);
* **uint8 asymmetric activations** (u8s8, the combination x86 VNNI/AVX-512 kernels run);
* **7-bit weights for dense convolutions on x86 CPUs without VNNI** (``reduce_range``; by
  default decided from the CPU this runs on, :func:`host_needs_reduced_range`): there ONNX
  Runtime's u8s8 GEMM multiplies with AVX2's ``vpmaddubsw``, which adds two u8*s8 products
  into a saturating int16, and 255*127*2 overflows it. Measured on an AVX2-only AMD EPYC with
  Google's ImageNet weights: full 8-bit weights give logits at cosine 0.78-0.86 of TF's (the
  same graph run without the int8 kernels: 0.998); 7-bit weights on the dense (1x1 and first)
  convolutions, 8-bit on the depthwise ones (their kernel accumulates in int32): 0.994-0.998.
  A graph meant for a VNNI or ARM device should be quantized with ``reduce_range=False``.
* the graph is first pre-processed (``quant_pre_process``: shape inference and folding) as
  ONNX Runtime recommends;
* **empirical bias correction** (:func:`int8_bias_correction`; Finkelstein et al. 2019,
  arXiv 1906.03193; Nagel et al. 2019, arXiv 1906.04721): rounding a layer's weights shifts
  the mean of its outputs, and MobileNet's first depthwise layers (edge filters whose taps
  nearly cancel) amplify that shift. Layer by layer, in forward order and on inputs that
  already went through the quantized layers before it, the shift is measured on the
  calibration images and subtracted from the bias. On the TF-slim ImageNet weights this
  takes the int8 logits' cosine to the float ones from 0.972 to 0.998;
* the layers that produce the graph outputs (the classifier, an SSD's box and class
  predictors, the embedding projection) stay float (:func:`output_layer_names`): their
  outputs are logits, box offsets and embeddings that int8 would coarsen, for ~1% of the
  multiply-adds.
"""

from __future__ import annotations

import copy
import os
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "CALIBRATION_METHODS",
    "quantize_onnx",
    "int8_bias_correction",
    "output_layer_names",
    "ArrayCalibrationReader",
    "graph_input_name",
    "host_needs_reduced_range",
    "resolve_reduce_range",
]

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def graph_input_name(path: str | os.PathLike) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"{path}: expected one graph input to calibrate, got {inputs}")
    return inputs[0]


def _calibration_reader_base():
    from onnxruntime.quantization import CalibrationDataReader

    return CalibrationDataReader


class ArrayCalibrationReader(_calibration_reader_base()):
    """Feeds ``batches`` (each ``[N, C, H, W]`` float32) to the quantizer's calibrator."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray | Tensor]) -> None:
        self.input_name = input_name
        self.batches = [
            np.ascontiguousarray(b.detach().cpu().numpy() if isinstance(b, Tensor) else b, dtype=np.float32)
            for b in batches
        ]
        if not self.batches:
            raise ValueError("calibration needs at least one batch of images")
        self._iterator = iter(self.batches)

    def get_next(self):
        batch = next(self._iterator, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._iterator = iter(self.batches)


_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def host_needs_reduced_range() -> bool:
    """True on an x86 CPU without VNNI, where ONNX Runtime's u8s8 GEMM can saturate.

    Reads the CPU flags from ``/proc/cpuinfo`` (Linux); elsewhere, or when they cannot be
    read, assumes a CPU that does not need it (ARM, recent x86).
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return False
    return not any(flag in flags for flag in _VNNI_FLAGS)


def resolve_reduce_range(reduce_range: bool | None) -> bool:
    """``reduce_range`` as given, or for ``None`` what :func:`host_needs_reduced_range` says."""
    return host_needs_reduced_range() if reduce_range is None else bool(reduce_range)


def _dense_conv_weights(path: Path) -> list[str]:
    """Weight initializers of the Conv nodes with ``group == 1`` (not depthwise)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    names = []
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group == 1:
            names.append(node.input[1])
    return names


def quantize_onnx(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    calibration_batches: Sequence[np.ndarray | Tensor],
    *,
    method: str = "minmax",
    per_channel: bool = True,
    exclude: Sequence[str] | None = None,
    bias_corrections: Mapping[str, np.ndarray | Tensor] | None = None,
    reduce_range: bool | None = None,
) -> Path:
    """Write a QDQ int8 copy of ``fp32_path`` calibrated on ``calibration_batches``.

    Args:
        fp32_path: the float model (from :func:`mnapps.export.onnx.export_onnx`).
        int8_path: where to write the quantized model.
        calibration_batches: inputs in the graph's input contract, ``[N, C, H, W]`` each.
        method: activation-range estimator: ``"minmax"`` (default; ReLU6 bounds most ranges
            anyway), ``"percentile"`` (99.999th) or ``"entropy"``.
        per_channel: per-output-channel weight scales (default; see the module docstring).
        exclude: names of graph nodes to keep in float; default: the output layers
            (:func:`output_layer_names`).
        bias_corrections: ``{initializer name: new bias}`` from :func:`int8_bias_correction`,
            written into the graph before it is quantized; compute them with the same
            ``reduce_range``.
        reduce_range: 7-bit weights (range +-64) on dense convolutions, 8-bit on depthwise
            ones; ``None`` (default): :func:`host_needs_reduced_range` of this machine.

    Returns:
        ``int8_path`` as a :class:`~pathlib.Path`.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {list(CALIBRATION_METHODS)}")
    reduce_range = resolve_reduce_range(reduce_range)
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if not fp32_path.is_file():
        raise FileNotFoundError(f"float model {fp32_path} does not exist")
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    reader = ArrayCalibrationReader(graph_input_name(fp32_path), calibration_batches)
    calibrate = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]
    with tempfile.TemporaryDirectory(prefix="mnapps-quant-") as workdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the quantizer warns about its own defaults
        if exclude is None:
            exclude = output_layer_names(fp32_path)
        source = fp32_path
        if bias_corrections:
            source = Path(workdir) / "bias_corrected.onnx"
            _replace_initializers(fp32_path, source, _quantized_layers_only(fp32_path, bias_corrections, exclude))
        prepared = Path(workdir) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        extra_options: dict = {"WeightSymmetric": True, "ActivationSymmetric": False}
        if reduce_range:
            override = {"quant_type": QuantType.QInt8, "symmetric": True, "reduce_range": True, "axis": 0}
            extra_options["TensorQuantOverrides"] = {
                name: [dict(override)] for name in _dense_conv_weights(prepared)
            }
        quantize_static(
            str(prepared),
            str(int8_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate,
            nodes_to_exclude=list(exclude),
            extra_options=extra_options,
        )
    _copy_metadata(fp32_path, int8_path, reduce_range=reduce_range)
    return int8_path


def _quantized_layers_only(
    fp32_path: Path, bias_corrections: Mapping[str, np.ndarray | Tensor], exclude: Sequence[str]
) -> dict[str, np.ndarray | Tensor]:
    """The corrections of layers that are quantized: layers kept in float keep their float bias."""
    float_inputs = _node_inputs(fp32_path, exclude)
    float_layers = {name.rsplit(".", 1)[0] for name in float_inputs if name.endswith(".weight")}
    return {
        k: v for k, v in bias_corrections.items() if k not in float_inputs and k.rsplit(".", 1)[0] not in float_layers
    }


def _copy_metadata(source: Path, target: Path, reduce_range: bool = False) -> None:
    """The quantizer drops ``metadata_props``; put the ``mnapps.*`` entries back."""
    import onnx

    src = onnx.load(str(source), load_external_data=False)
    dst = onnx.load(str(target))
    present = {p.key for p in dst.metadata_props} | {"mnapps.precision", "mnapps.int8_dense_weight_bits"}
    for prop in src.metadata_props:
        if prop.key not in present:
            entry = dst.metadata_props.add()
            entry.key, entry.value = prop.key, prop.value
    entry = dst.metadata_props.add()
    entry.key, entry.value = "mnapps.precision", "int8"
    entry = dst.metadata_props.add()
    entry.key, entry.value = "mnapps.int8_dense_weight_bits", "7" if reduce_range else "8"
    onnx.save(dst, str(target))


# Ops that only move data: walking back from a graph output through them reaches the layer
# that computed the output.
_DATA_MOVEMENT_OPS = frozenset(
    {"Reshape", "Transpose", "Concat", "Flatten", "Identity", "Squeeze", "Unsqueeze", "Slice", "Split"}
)
# Where the walk stops: a convolution (kept float itself when it computes an output directly)
# or the activation closing a convolution block (its output is the trunk's quantized feature).
_STOP_OPS = frozenset({"Conv", "Clip", "Relu"})


def output_layer_names(path: str | os.PathLike) -> list[str]:
    """Names of the nodes that compute the graph outputs after the last convolution block.

    Walking back from each output through data-movement ops: a Conv reached directly is an
    output layer (an SSD's box and class predictors); other compute ops (Gemm, pooling,
    BatchNormalization, L2 normalisation) are output layers and the walk continues through
    them until a Conv or an activation (``Clip``/``Relu``) closes the trunk. For a classifier
    that is the global pooling and the final Gemm; for the face embedder pooling, Gemm, BN
    and the normalisation.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    found: list[str] = []
    stack = [o.name for o in graph.output]
    seen: set[str] = set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in _DATA_MOVEMENT_OPS:
            stack.extend(node.input)
        elif node.op_type == "Conv":
            found.append(node.name)
        elif node.op_type not in _STOP_OPS:
            found.append(node.name)
            stack.extend(node.input)
    return found


def _node_inputs(path: Path, node_names: Sequence[str]) -> set[str]:
    import onnx

    wanted = set(node_names)
    graph = onnx.load(str(path), load_external_data=False).graph
    return {name for node in graph.node if node.name in wanted for name in node.input}


def _replace_initializers(source: Path, target: Path, values: Mapping[str, np.ndarray | Tensor]) -> None:
    """Write corrected biases into a copy of the graph.

    A correction ``"<layer>.bias"`` goes to the Conv whose weight initializer is
    ``"<layer>.weight"``. The exporter's optimiser may have dropped an all-zero bias or merged
    equal ones into one shared initializer, so each corrected bias becomes its own initializer
    and the Conv's bias input is pointed at it.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    conv_by_weight = {node.input[1]: node for node in graph.node if node.op_type == "Conv" and len(node.input) > 1}
    initializers = {init.name: init for init in graph.initializer}
    applied, missing = 0, []
    for name, value in values.items():
        array = (value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)).astype(np.float32)
        node = conv_by_weight.get(name[: -len(".bias")] + ".weight") if name.endswith(".bias") else None
        if node is None:
            missing.append(name)
            continue
        tensor = numpy_helper.from_array(array, name)
        if name in initializers:
            initializers[name].CopyFrom(tensor)
        else:
            graph.initializer.append(tensor)
        if len(node.input) > 2:
            node.input[2] = name
        else:
            node.input.append(name)
        applied += 1
    if applied == 0:
        raise ValueError(
            f"{source}: none of the {len(values)} bias corrections matches a Conv of the graph; "
            "was it exported from the module the corrections were computed on?"
        )
    if missing:
        warnings.warn(f"{source}: {len(missing)} bias corrections not applied (no such Conv): {missing[:4]}")
    onnx.save(model, str(target))


def _fake_quantize_weight(weight: Tensor, levels: int = 127) -> Tensor:
    """Symmetric per-output-channel int8 rounding, as ONNX Runtime's quantizer does it
    (scale ``max|w| / levels``, values in [-levels, levels], round half to even; ``levels``
    is 127, or 64 for its reduced range)."""
    reduce_dims = tuple(range(1, weight.dim()))
    scale = weight.abs().amax(dim=reduce_dims, keepdim=True) / float(levels)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(weight / scale), -levels, levels) * scale


@torch.no_grad()
def int8_bias_correction(
    module: nn.Module, calibration_input: Tensor, *, skip: Sequence[str] = (), reduce_range: bool | None = None
) -> dict[str, Tensor]:
    """Biases that cancel the mean output shift int8 weight rounding causes, per conv layer.

    One forward pass over ``calibration_input``: every ``Conv2d`` (except the ``skip``
    module names) computes its output with float and with int8-rounded weights on the input
    it actually receives (already disturbed by the quantized layers before it), the
    per-channel mean difference is subtracted from its bias, and the quantized, corrected
    output is passed on.

    Args:
        module: the (BN-folded) float module that will be exported; not modified.
        calibration_input: ``Tensor[N, C, H, W]``, the whole calibration set in one batch
            (the corrections are sequential, so they are computed over all of it at once;
            32 images are plenty).
        skip: module names (as in ``named_modules``) left uncorrected, e.g. the layers kept
            in float.
        reduce_range: as in :func:`quantize_onnx` (dense convolutions rounded to 7 bits).

    Returns:
        ``{"<module>.bias": Tensor}`` for each corrected layer: names match the state dict of
        ``module`` and the initializers of its ONNX export.
    """
    work = copy.deepcopy(module).eval()
    dense_levels = 64 if resolve_reduce_range(reduce_range) else 127
    corrections: dict[str, Tensor] = {}
    busy = False

    def hook(name: str):
        def correct(layer: nn.Conv2d, inputs, output):
            nonlocal busy
            if busy:  # the re-run below with rounded weights
                return None
            busy = True
            try:
                float_weight = layer.weight.data
                levels = dense_levels if layer.groups == 1 else 127
                layer.weight.data = _fake_quantize_weight(float_weight, levels)
                quantized = layer(*inputs)
                layer.weight.data = float_weight
            finally:
                busy = False
            shift = (quantized - output).double().mean(dim=(0, 2, 3)).float()
            bias = layer.bias.data if layer.bias is not None else torch.zeros_like(shift)
            corrections[f"{name}.bias"] = bias - shift
            return quantized - shift.view(1, -1, 1, 1)

        return correct

    handles = [
        layer.register_forward_hook(hook(name))
        for name, layer in work.named_modules()
        if isinstance(layer, nn.Conv2d) and name not in skip and layer.bias is not None
    ]
    try:
        work(calibration_input)
    finally:
        for handle in handles:
            handle.remove()
    return corrections
