"""A shard row's ``.npy`` codec: ``decode_row`` (cached header parse) reads exactly what ``np.load`` reads,
and refuses what ``np.load`` refuses or silently ignores (truncated or padded members)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from edlm_dist.data.shards import decode_row, encode_row


def _npy(array: np.ndarray, version=None) -> bytes:
    buffer = io.BytesIO()
    if version is None:
        np.save(buffer, array, allow_pickle=False)
    else:
        np.lib.format.write_array(buffer, array, version=version, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("array", [
    np.arange(32, dtype=np.int32),
    np.zeros(0, dtype=np.int32),
    np.arange(12, dtype=">i8").reshape(3, 4),
    np.array(7, dtype=np.int16),
    np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
])
@pytest.mark.parametrize("version", [None, (2, 0)])
def test_decode_row_equals_np_load(array, version):
    data = _npy(array, version)
    expected = np.load(io.BytesIO(data), allow_pickle=False)
    for _ in range(2):  # second read: from the cached header
        row = decode_row(data)
        assert row.dtype == expected.dtype and row.shape == expected.shape
        assert np.array_equal(row, expected) and row.flags.writeable


def test_encode_decode_round_trip():
    row = np.random.default_rng(0).integers(0, 50258, size=1024).astype(np.int32)
    assert np.array_equal(decode_row(encode_row(row)), row)


def test_damaged_members_raise_value_error():
    data = encode_row(np.arange(32, dtype=np.int32))
    for damaged in (data[:-1], data + b"\0", data[:20], b"\x93NUMPY\x01\x00\xff\xff", b"not an npy member"):
        with pytest.raises(ValueError):
            decode_row(damaged)


def test_object_rows_are_refused_like_np_load():
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"  # pads the header to a multiple of 64 bytes
    data = np.lib.format.magic(1, 0) + len(header).to_bytes(2, "little") + header.encode("latin1") + b"\0" * 8
    with pytest.raises(ValueError):
        np.load(io.BytesIO(data), allow_pickle=False)
    with pytest.raises(ValueError, match="pickle"):
        decode_row(data)
