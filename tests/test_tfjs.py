"""The TensorFlow.js weights reader: a generated miniature file round-trips exactly; face-api.js's real one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mnapps.importers.tfjs import TfjsWeightsError, find_tfjs_manifest, read_tfjs_weights


def write_tfjs(folder: Path, entries: list[dict], shard_sizes: list[int] | None = None,
               manifest: str = "tiny-weights_manifest.json") -> Path:
    """Write ``entries`` (``name``, ``shape``, ``dtype``, raw ``data`` bytes, optional
    ``quantization``) as TensorFlow.js does: one buffer, cut into shards of ``shard_sizes``."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = b"".join(entry["data"] for entry in entries)
    sizes = shard_sizes or [len(buffer)]
    assert sum(sizes) == len(buffer)
    paths, start = [], 0
    for index, size in enumerate(sizes):
        paths.append(f"group1-shard{index + 1}of{len(sizes)}.bin")
        (folder / paths[-1]).write_bytes(buffer[start : start + size])
        start += size
    weights = [{k: v for k, v in entry.items() if k != "data"} for entry in entries]
    (folder / manifest).write_text(json.dumps([{"paths": paths, "weights": weights}]))
    return folder / manifest


def _miniature(rng: np.random.Generator) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Entries of every supported kind and the values a reader must return for each."""
    entries, expected = [], {}

    def add(name, shape, dtype, data, value, quantization=None):
        entry = {"name": name, "shape": list(shape), "dtype": dtype, "data": data}
        if quantization:
            entry["quantization"] = quantization
        entries.append(entry)
        expected[name] = value

    kernel = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)
    add("Net/conv/weights", kernel.shape, "float32", kernel.astype("<f4").tobytes(), kernel)
    # uint8 affine codes on an exactly representable grid: q * 0.25 - 8 (decoded without rounding).
    codes = rng.integers(0, 256, size=(5, 7), dtype=np.uint8)
    add("Net/quant8/weights", codes.shape, "float32", codes.tobytes(), codes.astype(np.float32) * 0.25 - 8,
        {"dtype": "uint8", "scale": 0.25, "min": -8.0})
    # A realistic scale/min as the tfjs converter writes them (float64 in JSON, value stored as float32).
    scale, low = 0.0026856216729856004, -0.34107395246917127
    codes = rng.integers(0, 256, size=(1, 1, 6, 9), dtype=np.uint8)
    add("Net/quant8b/weights", codes.shape, "float32", codes.tobytes(),
        (codes.astype(np.float64) * scale + low).astype(np.float32),
        {"dtype": "uint8", "scale": scale, "min": low})
    codes16 = rng.integers(0, 65536, size=11, dtype=np.uint16)
    add("Net/quant16/biases", codes16.shape, "float32", codes16.astype("<u2").tobytes(),
        codes16.astype(np.float32) / 1024 - 4, {"dtype": "uint16", "scale": 1 / 1024, "min": -4.0})
    halves = rng.normal(size=(2, 3)).astype(np.float16)
    add("Net/half/weights", halves.shape, "float32", halves.astype("<f2").tobytes(), halves.astype(np.float32),
        {"dtype": "float16"})
    ints = rng.integers(-(2**31), 2**31 - 1, size=4, dtype=np.int32)
    add("Net/shape", ints.shape, "int32", ints.astype("<i4").tobytes(), ints)
    # int32 from uint8 codes: tfjs rounds q * scale + min (255 / 255 -> 1, not 0.99999...).
    add("Net/slice/begin", (3,), "int32", bytes([0, 0, 255]), np.array([0, 0, 1], dtype=np.int32),
        {"dtype": "uint8", "scale": 1 / 255, "min": 0})
    add("Net/scalar", (), "float32", np.float32(-1.5).tobytes(), np.array(-1.5, dtype=np.float32))
    add("Net/flags", (2, 2), "bool", bytes([1, 0, 0, 1]), np.array([[True, False], [False, True]]))
    return entries, expected


def test_miniature_round_trips_exactly(tmp_path):
    entries, expected = _miniature(np.random.default_rng(0))
    total = sum(len(entry["data"]) for entry in entries)
    # Three shards cut mid-tensor, as the converter's 4 MB shards cut big kernels.
    manifest = write_tfjs(tmp_path, entries, [100, 37, total - 137])
    tensors = read_tfjs_weights(tmp_path)
    assert list(tensors) == list(expected)
    for name, value in expected.items():
        assert tensors[name].dtype == value.dtype, name
        np.testing.assert_array_equal(tensors[name], value, err_msg=name, strict=True)
    assert list(read_tfjs_weights(manifest)) == list(expected)  # the manifest path itself


def test_model_json_weights_manifest_is_read(tmp_path):
    entries, expected = _miniature(np.random.default_rng(1))
    manifest = write_tfjs(tmp_path, entries)
    groups = json.loads(manifest.read_text())
    manifest.unlink()
    (tmp_path / "model.json").write_text(json.dumps({"modelTopology": {}, "weightsManifest": groups}))
    tensors = read_tfjs_weights(tmp_path)
    np.testing.assert_array_equal(tensors["Net/quant8/weights"], expected["Net/quant8/weights"])


def test_shards_that_do_not_match_the_manifest_are_refused(tmp_path):
    entries, _ = _miniature(np.random.default_rng(2))
    write_tfjs(tmp_path, entries)
    shard = tmp_path / "group1-shard1of1.bin"
    data = shard.read_bytes()

    shard.write_bytes(data + b"\0")
    with pytest.raises(TfjsWeightsError, match=r"tiny-weights_manifest\.json.*use \d+ bytes but the shards hold"):
        read_tfjs_weights(tmp_path)

    shard.write_bytes(data[:-3])
    with pytest.raises(TfjsWeightsError, match=r"tensor 'Net/flags' needs bytes"):
        read_tfjs_weights(tmp_path)

    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"group1-shard1of1\.bin"):
        read_tfjs_weights(tmp_path)


def test_bad_manifests_are_named(tmp_path):
    entries, _ = _miniature(np.random.default_rng(3))
    entries[0]["dtype"] = "complex64"
    write_tfjs(tmp_path / "a", entries)
    with pytest.raises(TfjsWeightsError, match=r"Net/conv/weights.*complex64"):
        read_tfjs_weights(tmp_path / "a")

    entries, _ = _miniature(np.random.default_rng(3))
    entries[1]["quantization"]["dtype"] = "int4"
    write_tfjs(tmp_path / "b", entries)
    with pytest.raises(TfjsWeightsError, match=r"Net/quant8/weights.*int4"):
        read_tfjs_weights(tmp_path / "b")

    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match=r"exactly one \*weights_manifest\.json"):
        find_tfjs_manifest(tmp_path / "c")
    (tmp_path / "c" / "bad-weights_manifest.json").write_text("{not json")
    with pytest.raises(TfjsWeightsError, match=r"bad-weights_manifest\.json.*JSON"):
        read_tfjs_weights(tmp_path / "c")


def test_faceapi_file_is_consumed_exactly(shared_data):
    folder = shared_data / "faceapi_ssd_mobilenetv1"
    manifest = json.loads((folder / "ssd_mobilenetv1_model-weights_manifest.json").read_text())
    # Bytes the manifest describes, counted independently of the reader: 1 per uint8 code, 4 per float32.
    described = sum(
        int(np.prod(w["shape"])) * (1 if w.get("quantization") else 4) for g in manifest for w in g["weights"]
    )
    assert described == (folder / "ssd_mobilenetv1_model.bin").stat().st_size == 5_616_957
    tensors = read_tfjs_weights(folder)
    assert len(tensors) == 151
    assert tensors["Output/extra_dim"].shape == (1, 5118, 4) and tensors["Output/extra_dim"].dtype == np.float32
    assert tensors["Postprocessor/stack/1"] == 5118  # an int32 constant stored as a uint8 code + min
    np.testing.assert_array_equal(tensors["Preprocessor/ResizeImage/size"], [512, 512])
    np.testing.assert_array_equal(tensors["Postprocessor/Slice/begin"], [0, 0, 1])  # 255 * (1/255) rounds to 1
    kernel = tensors["MobilenetV1/Conv2d_13_pointwise/weights"]
    assert kernel.shape == (1, 1, 1024, 1024) and kernel.dtype == np.float32
    spec = next(w for g in manifest for w in g["weights"] if w["name"] == "MobilenetV1/Conv2d_13_pointwise/weights")
    q = spec["quantization"]
    # Every decoded value lies on the uint8 grid min + k * scale, k in 0..255.
    codes = (kernel.astype(np.float64) - q["min"]) / q["scale"]
    assert np.abs(codes - np.round(codes)).max() < 1e-3 and codes.min() > -0.5 and codes.max() < 255.5
