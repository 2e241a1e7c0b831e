"""A damaged ``.odmq`` is refused, naming the file, before it can give wrong pixels (issue 22 items 3, 12): the
SHA-256 over header and body, non-finite floats, an unreadable header. The damaged files are generated here."""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np
import pytest
from conftest import tiny_network
from PIL import Image

from odm_sr.export.integer import extract_spec
from odm_sr.export.packing import DIGEST_SIZE, MAGIC, header_size, pack, read_packed
from odm_sr.export.spec import ExportError
from odm_sr.upscale import upscale_file


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> bytes:
    """A good packed file of a tiny 2-bit EDSR (ODM)."""
    tmp = tmp_path_factory.mktemp("packed")
    net, cfg = tiny_network("edsr", "odm", 2, tmp)
    return pack(net, extract_spec(net), cfg)


def resealed(data: bytes) -> bytes:
    """``data`` (its SHA-256 cut off) with a fresh SHA-256: a hand-made file that passes the checksum."""
    return data + hashlib.sha256(data).digest()


def flip(data: bytes, offsets) -> bytes:
    out = bytearray(data)
    for i in offsets:
        out[i] ^= 0x5A
    return bytes(out)


def with_float(data: bytes, offset: int, value: float) -> bytes:
    body = bytearray(data[:-DIGEST_SIZE])
    body[offset:offset + 4] = np.float32(value).tobytes()
    return resealed(bytes(body))


def _upscale(path, tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "lr.png")
    return upscale_file(path, tmp_path / "lr.png", tmp_path / "sr.png", engine="onnx", threads=1)


def damaged(data: bytes, how: str) -> bytes:
    """The damages of the issue's probe: flipped body bytes, a flipped header byte, a truncated file, a NaN
    weight scale and an inf float (both with a valid checksum), a header zlib cannot read, an old version."""
    start = header_size(data)
    if how == "body_bytes":
        return flip(data, [start + 40, start + 41, len(data) - DIGEST_SIZE - 9])
    if how == "header_byte":
        return flip(data, [12])
    if how == "truncated":
        return data[:-100]
    if how == "nan_scale":
        return with_float(data, start, float("nan"))  # the first weight layer's scale
    if how == "inf_float":
        return with_float(data, len(data) - DIGEST_SIZE - 4, float("inf"))  # the last float parameter
    if how == "bad_zlib":
        head = b"\x78\x9c" + bytes(range(40))
        return resealed(MAGIC + struct.pack("<HI", 2, len(head)) + head + data[start:-DIGEST_SIZE])
    if how == "version_1":
        return data[:4] + struct.pack("<H", 1) + data[6:]
    raise ValueError(how)


EXPECTED = {"body_bytes": "checksum mismatch: the file is damaged or truncated",
            "header_byte": "checksum mismatch", "truncated": "checksum mismatch",
            "nan_scale": r"the weight scale of [\w.]+ holds NaN or inf",
            "inf_float": r"[\w.]+ holds NaN or inf", "bad_zlib": r"the header cannot be read \(error: ",
            "version_1": "format version 1, this odm-sr reads version 2; export the checkpoint again"}


@pytest.mark.parametrize("how", sorted(EXPECTED))
def test_a_damaged_packed_file_is_refused_naming_it(how, packed, tmp_path):
    path = tmp_path / "model.odmq"
    path.write_bytes(damaged(packed, how))
    with pytest.raises(ExportError, match=f"^{path}: {EXPECTED[how]}") as err:
        _upscale(path, tmp_path)
    assert "\n" not in str(err.value) and not (tmp_path / "sr.png").exists()


def test_the_good_file_reads_and_its_checksum_covers_every_byte(packed, tmp_path):
    path = tmp_path / "model.odmq"
    path.write_bytes(packed)
    assert _upscale(path, tmp_path).is_file()
    assert zlib.decompress(packed[10:header_size(packed)])  # the header is where the layout says
    for offset in (0, 5, 11, header_size(packed), len(packed) - DIGEST_SIZE - 1, len(packed) - 1):
        path.write_bytes(flip(packed, [offset]))
        with pytest.raises(ExportError, match=f"^{path}: "):
            read_packed(path)
