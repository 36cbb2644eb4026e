"""The TensorFlow checkpoint reader against checkpoints TensorFlow itself wrote (no TensorFlow here).

The fixtures in tests/fixtures/tf_checkpoint/ and their expected values were made by
tests/fixtures/make_tf_checkpoint.py with real TensorFlow (``SaveV2`` + ``MergeV2Checkpoints``,
expected values from ``tf.train.load_checkpoint``).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mnapps.importers import tf_checkpoint
from mnapps.importers.tf_checkpoint import (
    TFCheckpointError,
    crc32c,
    read_tf_checkpoint,
    read_tf_checkpoint_entries,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tf_checkpoint"
SMALL = FIXTURES / "small"
# numpy dtype each TensorFlow dtype must come back as (bfloat16 widened exactly to float32).
TF_TO_NUMPY = {
    "float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.float32,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64, "uint8": np.uint8,
    "bool": np.bool_, "string": np.object_,
}


def test_small_two_shard_checkpoint_equals_tensorflows_reader():
    ours = read_tf_checkpoint(SMALL)
    with np.load(FIXTURES / "small_expected.npz") as data:
        expected = {name: data[name] for name in data.files}
    tf_dtypes = json.loads(str(expected.pop("__tf_dtypes__")))
    assert sorted(ours) == sorted(expected) == sorted(tf_dtypes)
    assert set(tf_dtypes.values()) == set(TF_TO_NUMPY)  # every dtype the fixture was made to cover
    for name, want in expected.items():
        got = ours[name]
        assert got.dtype == TF_TO_NUMPY[tf_dtypes[name]], name
        assert got.shape == want.shape, name
        if tf_dtypes[name] == "string":
            assert [bytes(item) for item in got.ravel()] == want.ravel().tolist(), name
        else:
            np.testing.assert_array_equal(got, want, err_msg=name, strict=True)
    num_shards, entries = read_tf_checkpoint_entries(SMALL)
    assert num_shards == 2
    assert {entry.shard_id for entry in entries.values()} == {0, 1}


def test_index_and_data_file_paths_name_the_same_checkpoint():
    by_prefix = read_tf_checkpoint(SMALL)
    for path in (f"{SMALL}.index", f"{SMALL}.data-00001-of-00002"):
        other = read_tf_checkpoint(path)
        assert list(other) == list(by_prefix)
        np.testing.assert_array_equal(other["int32/matrix"], by_prefix["int32/matrix"])


@pytest.fixture(scope="module")
def many_prefix(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("many")
    for name in ("many.index", "many.data-00000-of-00001"):
        with gzip.open(FIXTURES / f"{name}.gz", "rb") as src, open(folder / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return folder / "many"


def test_index_with_two_data_blocks_equals_tensorflows_reader(many_prefix):
    data = Path(f"{many_prefix}.index").read_bytes()
    assert len(tf_checkpoint._data_block_handles(data, "many.index")) == 2
    ours = read_tf_checkpoint(many_prefix)
    with np.load(FIXTURES / "many_expected.npz") as expected:
        names = bytes(expected["names"]).decode().split("\n")
        values = expected["values"]
        assert str(expected["tf_dtype"]) == "uint8"
    assert list(ours) == names  # sorted table order, nothing lost at the block boundary
    got = np.array([ours[name] for name in names])
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, values)


def test_crc32c_matches_published_vectors_and_long_inputs():
    # RFC 3720 B.4 and the usual check value.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    # Long inputs take the lane-parallel path; it must agree with the byte-at-a-time loop,
    # including a tail that is not a multiple of the lane count.
    data = np.random.default_rng(0).integers(0, 256, 4096 * 70 + 123, dtype=np.uint8).tobytes()
    assert crc32c(data) == tf_checkpoint._crc_bytes(0xFFFFFFFF, data) ^ 0xFFFFFFFF


def _copy_small(tmp_path: Path) -> Path:
    for path in FIXTURES.glob("small.*"):
        shutil.copyfile(path, tmp_path / path.name)
    return tmp_path / "small"


def test_corrupt_tensor_bytes_fail_their_checksum(tmp_path):
    prefix = _copy_small(tmp_path)
    _, entries = read_tf_checkpoint_entries(prefix)
    entry = entries["FeatureExtractor/MobilenetV1/Conv2d_0/weights"]
    shard = tmp_path / f"small.data-{entry.shard_id:05d}-of-00002"
    data = bytearray(shard.read_bytes())
    data[entry.offset + 5] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(TFCheckpointError, match=r"Conv2d_0/weights.*CRC-32C"):
        read_tf_checkpoint(prefix)
    unverified = read_tf_checkpoint(prefix, verify=False)
    assert unverified["int32/matrix"].shape == (2, 2)


def test_corrupt_string_tensor_fails_its_checksum(tmp_path):
    prefix = _copy_small(tmp_path)
    _, entries = read_tf_checkpoint_entries(prefix)
    entry = entries["strings/vector"]
    shard = tmp_path / f"small.data-{entry.shard_id:05d}-of-00002"
    data = bytearray(shard.read_bytes())
    data[entry.offset + entry.size - 1] ^= 0x01  # last byte of the last string
    shard.write_bytes(bytes(data))
    with pytest.raises(TFCheckpointError, match=r"strings/vector.*CRC-32C"):
        read_tf_checkpoint(prefix)


def test_broken_files_are_named(tmp_path):
    prefix = _copy_small(tmp_path)
    index = Path(f"{prefix}.index")
    original = index.read_bytes()

    index.write_bytes(original[:30])
    with pytest.raises(TFCheckpointError, match=r"small\.index.*too short"):
        read_tf_checkpoint(prefix)

    index.write_bytes(original[:-1] + b"\0")
    with pytest.raises(TFCheckpointError, match=r"small\.index.*magic"):
        read_tf_checkpoint(prefix)

    corrupt = bytearray(original)
    corrupt[3] ^= 0xFF  # inside the first data block
    index.write_bytes(bytes(corrupt))
    with pytest.raises(TFCheckpointError, match=r"small\.index.*CRC-32C"):
        read_tf_checkpoint(prefix)

    index.write_bytes(original)
    os.remove(f"{prefix}.data-00001-of-00002")
    with pytest.raises(FileNotFoundError, match=r"small\.data-00001-of-00002"):
        read_tf_checkpoint(prefix)

    with pytest.raises(FileNotFoundError, match=r"nothing\.index"):
        read_tf_checkpoint(tmp_path / "nothing")
