"""Read TensorFlow V2 checkpoints (``X.index`` + ``X.data-*``) without TensorFlow.

This module owns the on-disk format of TensorFlow's "tensor bundle", the files that
``tf.train.Checkpoint``, ``tf.compat.v1.train.Saver`` and the Object Detection API write:

* ``X.index`` is a LevelDB-style sorted table (``tensorflow/core/lib/io/table``): data blocks
  of prefix-compressed ``key -> value`` records with a restart array, an index block pointing
  at them, and a 48-byte footer ending in a magic number. Each block is followed by a
  compression byte (always "none": TensorFlow's writer never compresses bundles) and a masked
  CRC-32C. The empty key holds a ``BundleHeaderProto`` (shard
  count, endianness); every other key is a tensor name whose value is a ``BundleEntryProto``
  (dtype, shape, shard id, byte offset, byte size, masked CRC-32C of the bytes).
* ``X.data-0000k-of-0000n`` hold the raw tensor bytes, little-endian, back to back.

The protobuf messages are decoded by hand (a few varint fields); no ``.proto`` is compiled and
neither TensorFlow nor ``protobuf`` is imported. Numeric tensors come back as numpy arrays of
their own dtype (bfloat16 as float32, which holds it exactly), string tensors as object arrays
of ``bytes``. Partitioned (sliced) variables and big-endian bundles are refused with a message.
Every failure names the file and what is wrong with it.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = [
    "TFCheckpointError", "TensorEntry", "read_tf_checkpoint", "read_tf_checkpoint_entries", "crc32c",
    "check_finite_tensors",
]  # fmt: skip

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # two BlockHandles padded to 40 bytes, then the 8-byte magic
_BLOCK_TRAILER_SIZE = 5  # compression type (1 byte) + masked crc32c (4 bytes)

# TensorFlow's DataType enum (types.proto) -> numpy dtype of the stored little-endian bytes.
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    8: np.dtype("<c8"),  # DT_COMPLEX64
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    14: np.dtype("<u2"),  # DT_BFLOAT16: the upper half of a float32, widened below
    17: np.dtype("<u2"),  # DT_UINT16
    18: np.dtype("<c16"),  # DT_COMPLEX128
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}
_DT_STRING = 7
_DT_BFLOAT16 = 14


class TFCheckpointError(ValueError):
    """A TensorFlow checkpoint that is missing, truncated, corrupt or uses an unsupported feature."""


@dataclass(frozen=True)
class TensorEntry:
    """One ``BundleEntryProto``: where a tensor's bytes are and what they hold."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None
    sliced: bool


# ------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), as LevelDB and the tensor bundle store it


def _make_crc_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table[byte] = crc
    return table


_CRC_TABLE = _make_crc_table()
_CRC_TABLE_LIST = [int(v) for v in _CRC_TABLE]
_LANES = 4096  # bytes processed in parallel by the vectorised CRC below


def _crc_bytes(register: int, data: bytes) -> int:
    table = _CRC_TABLE_LIST
    for byte in data:
        register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


def _gf2_apply(matrix: list[int], vector: int) -> int:
    out = 0
    bit = 0
    while vector:
        if vector & 1:
            out ^= matrix[bit]
        vector >>= 1
        bit += 1
    return out


def _zero_bytes_operator(count: int) -> list[int]:
    """The linear map that advances a raw CRC register over ``count`` zero bytes."""
    one_byte = [_crc_bytes(1 << bit, b"\0") for bit in range(32)]
    result = [1 << bit for bit in range(32)]  # identity
    power = one_byte
    while count:
        if count & 1:
            result = [_gf2_apply(power, column) for column in result]
        count >>= 1
        if count:
            power = [_gf2_apply(power, column) for column in power]
    return result


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C of ``data`` (``crc32c(b"123456789") == 0xE3069283``).

    Long inputs are cut into 4096 equal lanes whose CRCs numpy computes side by side; since a
    CRC with a zero start is linear, the lanes are then chained by advancing the running
    register over one lane's worth of zero bytes (a 32x32 bit matrix) before xoring the next.
    """
    data = memoryview(data).cast("B")
    lane_len = len(data) // _LANES
    if lane_len < 64:
        return _crc_bytes(0xFFFFFFFF, data) ^ 0xFFFFFFFF
    head = np.frombuffer(data[: lane_len * _LANES], dtype=np.uint8).reshape(_LANES, lane_len)
    lanes = np.zeros(_LANES, dtype=np.uint32)
    for column in range(lane_len):
        lanes = _CRC_TABLE[(lanes ^ head[:, column]) & 0xFF] ^ (lanes >> 8)
    advance = _zero_bytes_operator(lane_len)
    register = 0xFFFFFFFF  # the initial value, advanced like any other contribution
    for lane in lanes.tolist():
        register = _gf2_apply(advance, register) ^ lane
    register = _crc_bytes(register, data[lane_len * _LANES :])
    return register ^ 0xFFFFFFFF


def _unmask_crc(masked: int) -> int:
    # LevelDB stores crc32c "masked" so that a CRC of data holding CRCs stays well spread.
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------------
# varints and protobuf fields


def _varint(buf: bytes | memoryview, pos: int, where: str) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise TFCheckpointError(f"{where}: truncated or malformed varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes, where: str) -> list[tuple[int, int | bytes]]:
    """``(field number, value)`` pairs of a protobuf message: ints for varint/fixed, bytes otherwise."""
    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, where)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos, where)
            value, pos = bytes(buf[pos : pos + length]), pos + length
        else:
            raise TFCheckpointError(f"{where}: unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise TFCheckpointError(f"{where}: truncated protobuf message")
        fields.append((number, value))
    return fields


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_entry(name: str, value: bytes, where: str) -> TensorEntry:
    dtype, shard_id, offset, size, crc, shape, sliced = 0, 0, 0, 0, None, [], False
    for number, field in _proto_fields(value, where):
        if number == 1:
            dtype = int(field)
        elif number == 2:  # TensorShapeProto: repeated Dim dim = 2 {int64 size = 1}
            for dim_number, dim in _proto_fields(field, where):
                if dim_number == 2:
                    sizes = [int(v) for n, v in _proto_fields(dim, where) if n == 1]
                    shape.append(_signed64(sizes[0]) if sizes else 0)
                elif dim_number == 3 and dim:
                    raise TFCheckpointError(f"{where}: tensor {name!r} has an unknown rank")
        elif number == 3:
            shard_id = int(field)
        elif number == 4:
            offset = _signed64(int(field))
        elif number == 5:
            size = _signed64(int(field))
        elif number == 6:
            crc = int(field)
        elif number == 7:
            sliced = True
    return TensorEntry(name, dtype, tuple(shape), shard_id, offset, size, crc, sliced)


# ------------------------------------------------------------------------------------------
# the sorted table of the .index file


def _read_block(data: bytes, offset: int, size: int, where: str) -> bytes:
    end = offset + size + _BLOCK_TRAILER_SIZE
    if offset < 0 or end > len(data):
        raise TFCheckpointError(f"{where}: block at {offset}+{size} runs past the end of the file (truncated?)")
    block = data[offset : offset + size]
    kind = data[offset + size]
    (stored_crc,) = struct.unpack_from("<I", data, offset + size + 1)
    if crc32c(data[offset : offset + size + 1]) != _unmask_crc(stored_crc):
        raise TFCheckpointError(f"{where}: block at offset {offset} fails its CRC-32C check (corrupt file)")
    if kind != 0:
        # TensorFlow's BundleWriter always writes uncompressed tables (kNoCompression), so a
        # Snappy (1) block means a file from some other writer.
        raise TFCheckpointError(f"{where}: block at offset {offset} is compressed (type {kind}); TF bundles never are")
    return block


def _block_records(block: bytes, where: str) -> list[tuple[bytes, bytes]]:
    """The ``(key, value)`` records of one block (keys stored as shared prefix + new suffix)."""
    if len(block) < 4:
        raise TFCheckpointError(f"{where}: block shorter than its restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise TFCheckpointError(f"{where}: block restart array is larger than the block")
    records: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    while pos < limit:
        shared, pos = _varint(block, pos, where)
        non_shared, pos = _varint(block, pos, where)
        value_len, pos = _varint(block, pos, where)
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise TFCheckpointError(f"{where}: corrupt record in a table block")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        records.append((key, block[pos : pos + value_len]))
        pos += value_len
    return records


def _data_block_handles(data: bytes, where: str) -> list[tuple[int, int]]:
    """``(offset, size)`` of every data block, from the footer and the index block."""
    if len(data) < _FOOTER_SIZE:
        raise TFCheckpointError(f"{where}: {len(data)} bytes is too short for a checkpoint index (truncated?)")
    footer = data[-_FOOTER_SIZE:]
    if struct.unpack_from("<Q", footer, 40)[0] != _TABLE_MAGIC:
        raise TFCheckpointError(f"{where}: not a TensorFlow checkpoint index (bad table magic number)")
    _, pos = _varint(footer, 0, where)  # metaindex offset: the metaindex block is empty in bundles
    _, pos = _varint(footer, pos, where)
    index_offset, pos = _varint(footer, pos, where)
    index_size, _ = _varint(footer, pos, where)
    handles = []
    for _, handle in _block_records(_read_block(data, index_offset, index_size, where), where):
        offset, pos = _varint(handle, 0, where)
        size, _ = _varint(handle, pos, where)
        handles.append((offset, size))
    return handles


def _table_records(index_path: Path) -> list[tuple[bytes, bytes]]:
    data = index_path.read_bytes()
    where = str(index_path)
    records: list[tuple[bytes, bytes]] = []
    for offset, size in _data_block_handles(data, where):
        records.extend(_block_records(_read_block(data, offset, size, where), where))
    return records


# ------------------------------------------------------------------------------------------
# public API


def _index_path(prefix_or_index_path: str | os.PathLike) -> tuple[Path, str]:
    text = os.fspath(prefix_or_index_path)
    prefix = re.sub(r"\.(index|meta|data-\d{5}-of-\d{5})$", "", text)
    index = Path(prefix + ".index")
    if not index.is_file():
        raise FileNotFoundError(
            f"TensorFlow checkpoint index {index} does not exist; pass the checkpoint prefix "
            "(e.g. model.ckpt for model.ckpt.index + model.ckpt.data-00000-of-00001)"
        )
    return index, prefix


def read_tf_checkpoint_entries(prefix_or_index_path: str | os.PathLike) -> tuple[int, dict[str, TensorEntry]]:
    """The shard count and every tensor's :class:`TensorEntry`, from the ``.index`` file alone."""
    index, _ = _index_path(prefix_or_index_path)
    where = str(index)
    num_shards = 1
    entries: dict[str, TensorEntry] = {}
    for key, value in _table_records(index):
        if key == b"":  # BundleHeaderProto: num_shards = 1, endianness = 2 (0 little, 1 big)
            header = dict(_proto_fields(value, where))
            num_shards = int(header.get(1, 1))
            if header.get(2, 0) != 0:
                raise TFCheckpointError(f"{where}: big-endian checkpoints are not supported")
            continue
        name = key.decode("utf-8", errors="replace")
        entries[name] = _parse_entry(name, value, f"{where} (tensor {name!r})")
    return num_shards, entries


def _decode_strings(raw: memoryview, count: int, where: str) -> tuple[np.ndarray, bytes]:
    """Elements of a string tensor, and the bytes its CRC covers.

    Layout: a varint64 length per element, a 4-byte masked CRC of the lengths, the bytes. The
    CRC covers each length as a little-endian uint32 (uint64 past 4 GiB), not as its varint.
    """
    lengths = []
    pos = 0
    for _ in range(count):
        length, pos = _varint(raw, pos, where)
        lengths.append(length)
    checked = b"".join(n.to_bytes(4 if n <= 0xFFFFFFFF else 8, "little") for n in lengths)
    checked += bytes(raw[pos : pos + 4])
    pos += 4
    items = []
    for length in lengths:
        items.append(bytes(raw[pos : pos + length]))
        pos += length
    if pos != len(raw):
        raise TFCheckpointError(f"{where}: string tensor holds {len(raw)} bytes, its lengths add up to {pos}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array, checked + b"".join(items)


def _decode_tensor(entry: TensorEntry, raw: memoryview, where: str, verify: bool) -> np.ndarray:
    count = int(np.prod(entry.shape, dtype=np.int64))
    checked: bytes | memoryview = raw
    if entry.dtype == _DT_STRING:
        array, checked = _decode_strings(raw, count, where)
    if verify and entry.crc32c is not None and crc32c(checked) != _unmask_crc(entry.crc32c):
        raise TFCheckpointError(f"{where}: data fails its CRC-32C check (corrupt shard {entry.shard_id})")
    if entry.dtype == _DT_STRING:
        return array.reshape(entry.shape)
    if entry.dtype not in _DTYPES:
        raise TFCheckpointError(
            f"{where}: TensorFlow dtype enum {entry.dtype} is not supported (numeric and string tensors only)"
        )
    dtype = _DTYPES[entry.dtype]
    if count * dtype.itemsize != entry.size:
        raise TFCheckpointError(
            f"{where}: {entry.size} bytes stored for shape {list(entry.shape)} of {dtype} "
            f"({count * dtype.itemsize} expected)"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(entry.shape)
    if entry.dtype == _DT_BFLOAT16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(dtype.newbyteorder("="), copy=True)


def check_finite_tensors(tensors: Mapping[str, Any], source: str, *, error: type[ValueError] = ValueError) -> Mapping:
    """Refuse imported weights holding NaN or infinity, naming the first such tensor.

    A NaN BatchNorm scale imports without complaint and only shows up as ``nan%`` scores
    later; the importers check the tensors that become model parameters here (numpy arrays or
    torch tensors). Non-float tensors (step counters, strings) pass. Graph constants a source
    also holds (a reshape target stored as float bits) are not weights and are not checked.
    """
    for name, value in tensors.items():
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        if array.dtype.kind in "fc" and array.size and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise error(
                f"{source}: tensor {name!r} holds {bad} NaN or infinite value(s) of {array.size}; the weights are "
                "damaged (or were saved from a diverged run): use an intact copy"
            )
    return tensors


def read_tf_checkpoint(prefix_or_index_path: str | os.PathLike, *, verify: bool = True) -> dict[str, np.ndarray]:
    """Every tensor of a TensorFlow V2 checkpoint as ``name -> numpy array``.

    Args:
        prefix_or_index_path: the checkpoint prefix (``model.ckpt``) or any of its files
            (``model.ckpt.index``, ``model.ckpt.data-00000-of-00001``).
        verify: check each tensor's CRC-32C (numpy-vectorised: under a second for the 22 MB of
            an SSD-MobileNetV1); the index blocks are always checked.

    Returns:
        name -> array in the checkpoint's sorted order; float32/64/16, int8..64, uint8..64,
        bool and complex keep their dtype, bfloat16 becomes float32 (exact), strings become
        object arrays of ``bytes`` (e.g. TF2's ``_CHECKPOINTABLE_OBJECT_GRAPH``), as
        TensorFlow's own reader returns them.

    Raises:
        FileNotFoundError: the ``.index`` or a data shard is missing (the message names it).
        TFCheckpointError: corrupt or truncated files, failed checksums, partitioned variables.
    """
    index, prefix = _index_path(prefix_or_index_path)
    num_shards, entries = read_tf_checkpoint_entries(index)
    shards: dict[int, bytes] = {}
    tensors: dict[str, np.ndarray] = {}
    for name, entry in entries.items():
        where = f"{prefix} (tensor {name!r})"
        if entry.sliced:
            raise TFCheckpointError(
                f"{where} is a partitioned variable saved in slices, which this reader does not "
                "assemble; re-save it unpartitioned"
            )
        if not 0 <= entry.shard_id < num_shards:
            raise TFCheckpointError(f"{where}: shard {entry.shard_id} outside the {num_shards} shards of the header")
        if entry.shard_id not in shards:
            shard_path = Path(f"{prefix}.data-{entry.shard_id:05d}-of-{num_shards:05d}")
            if not shard_path.is_file():
                raise FileNotFoundError(f"TensorFlow checkpoint data shard {shard_path} does not exist")
            shards[entry.shard_id] = shard_path.read_bytes()
        shard = shards[entry.shard_id]
        if entry.offset < 0 or entry.offset + entry.size > len(shard):
            raise TFCheckpointError(
                f"{where}: bytes {entry.offset}..{entry.offset + entry.size} lie past the end of shard "
                f"{entry.shard_id} ({len(shard)} bytes; truncated file?)"
            )
        raw = memoryview(shard)[entry.offset : entry.offset + entry.size]
        tensors[name] = _decode_tensor(entry, raw, where, verify)
    return tensors
