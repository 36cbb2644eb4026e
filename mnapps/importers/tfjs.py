"""Read TensorFlow.js weight files (a ``weights_manifest.json`` + binary shards) without TensorFlow.

This module owns the TensorFlow.js weights format: a manifest lists groups, each with the
shard files (``paths``) whose bytes are concatenated, and the tensors (``weights``: ``name``,
``shape``, ``dtype``, optional ``quantization``) stored back to back in that buffer, with no
padding. Plain tensors are little-endian ``float32``/``int32``/``bool``; quantized ones store
``uint8`` or ``uint16`` codes ``q`` that decode to ``q * scale + min`` (rounded for ``int32``
tensors, as tfjs does) or ``float16`` values. The manifest may be a ``*weights_manifest.json``
file or the ``weightsManifest`` of a ``model.json``. Every byte of every shard must be used, so a
manifest that does not describe its shards is an error naming the file, not silently wrong weights.

A manifest is data from elsewhere: its shard ``paths`` must name files inside the manifest's own
folder (an absolute path or ``../`` would read any file of the machine into a weight tensor)
unless ``MNAPPS_ALLOW_OUTSIDE_PATHS=1`` is set (:func:`mnapps.files.inside_folder`); every
field is type-checked with a message naming the manifest, the tensor and the field. (NaN or
infinite weights are refused where tensors become model parameters, see
:func:`mnapps.importers.tf_checkpoint.check_finite_tensors`; graph constants may hold anything.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mnapps.files import inside_folder

__all__ = ["TfjsWeightsError", "find_tfjs_manifest", "read_tfjs_weights"]

_PLAIN_DTYPES = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4"), "bool": np.dtype("?")}
_QUANTIZED_DTYPES = {"uint8": np.dtype("u1"), "uint16": np.dtype("<u2"), "float16": np.dtype("<f2")}


class TfjsWeightsError(ValueError):
    """A TensorFlow.js manifest or shard that is malformed or does not match its manifest."""


def find_tfjs_manifest(folder_or_manifest: str | os.PathLike) -> Path:
    """The manifest file: the path itself, or the one ``*weights_manifest.json``/``model.json`` in a folder."""
    path = Path(folder_or_manifest)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"TensorFlow.js weights {path} do not exist (pass the folder or its manifest .json)")
    candidates = sorted(path.glob("*weights_manifest.json")) or sorted(path.glob("model.json"))
    if len(candidates) != 1:
        found = [p.name for p in candidates]
        raise FileNotFoundError(
            f"{path} should hold exactly one *weights_manifest.json (or model.json), found {found or 'none'}; "
            "pass the manifest file itself"
        )
    return candidates[0]


def _manifest_groups(manifest: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TfjsWeightsError(f"{manifest}: not a readable JSON manifest ({exc})") from None
    if isinstance(data, dict) and "weightsManifest" in data:
        data = data["weightsManifest"]  # a model.json
    if not isinstance(data, list) or not all(
        isinstance(g, dict) and isinstance(g.get("paths"), list) and isinstance(g.get("weights"), list) for g in data
    ):
        raise TfjsWeightsError(f"{manifest}: expected a list of {{'paths': [...], 'weights': [...]}} groups")
    for g, group in enumerate(data):
        for k, name in enumerate(group["paths"]):
            if not isinstance(name, str) or not name:
                raise TfjsWeightsError(f"{manifest}: weightsManifest[{g}].paths[{k}] is {name!r}; each path is the "
                                       "file name of a shard beside the manifest, a string")
            problem = inside_folder(name, source=str(manifest), field=f"weightsManifest[{g}].paths[{k}]")
            if problem:
                raise TfjsWeightsError(problem)
    return data


def _shape(spec: dict[str, Any], where: str) -> list[int]:
    shape = spec.get("shape")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise TfjsWeightsError(f"{where}: tensor {spec.get('name')!r} has shape {shape!r}; a shape is a list of "
                               "whole numbers >= 0, e.g. [3, 3, 3, 32]")
    return shape


def _decode(spec: dict[str, Any], buffer: memoryview, pos: int, where: str) -> tuple[np.ndarray, int]:
    """One tensor from ``buffer`` at ``pos``; returns it and the position after it."""
    if not isinstance(spec, dict):
        raise TfjsWeightsError(f"{where}: a weights entry is {spec!r}, not an object {{'name', 'shape', 'dtype'}}")
    name, dtype = spec.get("name"), spec.get("dtype")
    if not isinstance(name, str):
        raise TfjsWeightsError(f"{where}: a weights entry lacks its 'name': {spec}")
    shape = _shape(spec, where)
    if not isinstance(dtype, str) or dtype not in _PLAIN_DTYPES:
        raise TfjsWeightsError(f"{where}: tensor {name!r} has dtype {dtype!r}; supported: {sorted(_PLAIN_DTYPES)}")
    count = int(np.prod(shape, dtype=np.int64))
    quant = spec.get("quantization")
    if quant is not None and not isinstance(quant, dict):
        raise TfjsWeightsError(f"{where}: tensor {name!r} has quantization {quant!r}; it is an object such as "
                               "{'dtype': 'uint8', 'scale': 0.01, 'min': -1.0}, or left out")
    qdtype = None if quant is None else quant.get("dtype")
    stored = _PLAIN_DTYPES[dtype] if quant is None else _QUANTIZED_DTYPES.get(qdtype if isinstance(qdtype, str) else "")
    if stored is None:
        raise TfjsWeightsError(
            f"{where}: tensor {name!r} has quantization dtype {qdtype!r}; supported: "
            f"{sorted(_QUANTIZED_DTYPES)}"
        )
    end = pos + count * stored.itemsize
    if end > len(buffer):
        raise TfjsWeightsError(f"{where}: tensor {name!r} needs bytes {pos}..{end} but the shards hold {len(buffer)}")
    raw = np.frombuffer(buffer[pos:end], dtype=stored).reshape(shape)
    if quant is None:
        return raw.astype(stored.newbyteorder("="), copy=True), end
    if dtype == "bool" or (stored.kind == "f" and dtype != "float32"):
        raise TfjsWeightsError(f"{where}: tensor {name!r} is {dtype} with {quant['dtype']} quantization, which tfjs refuses")
    if stored.kind == "f":  # float16 "quantization": the values themselves in half precision
        return raw.astype(np.float32), end
    if not all(isinstance(quant.get(k), (int, float)) for k in ("scale", "min")):
        raise TfjsWeightsError(f"{where}: tensor {name!r} is {quant['dtype']}-quantized without numeric scale/min")
    values = raw.astype(np.float64) * quant["scale"] + quant["min"]
    if dtype == "int32":
        return np.floor(values + 0.5).astype(np.int32), end  # JavaScript's Math.round
    return values.astype(_PLAIN_DTYPES[dtype]), end


def read_tfjs_weights(folder_or_manifest: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a TensorFlow.js weights folder as ``name -> numpy array``.

    Args:
        folder_or_manifest: the folder holding one ``*weights_manifest.json`` (or ``model.json``)
            and its shards, or the manifest file itself.

    Returns:
        name -> array in manifest order: ``float32``, ``int32`` or ``bool``, as the manifest's
        ``dtype`` says (quantized tensors decoded as ``q * scale + min``, in float64 then cast).

    Raises:
        FileNotFoundError: the manifest or a shard is missing (the message names it).
        TfjsWeightsError: unknown dtypes, malformed fields, duplicate names, shard paths outside
            the manifest's folder, or shards whose size does not match
            the manifest (too short, or bytes left over).
    """
    manifest = find_tfjs_manifest(folder_or_manifest)
    tensors: dict[str, np.ndarray] = {}
    for group in _manifest_groups(manifest):
        shards = [manifest.parent / p for p in group["paths"]]
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{manifest} names shard(s) that do not exist: {missing}")
        buffer = memoryview(b"".join(p.read_bytes() for p in shards))
        where = f"{manifest} (shards {group['paths']})"
        pos = 0
        for spec in group["weights"]:
            array, pos = _decode(spec, buffer, pos, where)
            if spec["name"] in tensors:
                raise TfjsWeightsError(f"{where}: tensor {spec['name']!r} appears twice")
            tensors[spec["name"]] = array
        if pos != len(buffer):
            raise TfjsWeightsError(
                f"{where}: the manifest's tensors use {pos} bytes but the shards hold {len(buffer)}; "
                "the manifest does not describe these shards"
            )
    return tensors
