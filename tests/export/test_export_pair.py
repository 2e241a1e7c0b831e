"""``odm-sr-export`` writes the ``.onnx`` and the ``.odmq`` both or neither, and a reader refuses an ``.onnx``
beside an ``.odmq`` of another export, or a damaged ``.onnx``, naming the files (issue 22 items 6, 11, 12)."""

from __future__ import annotations

import errno
import os
import shutil

import numpy as np
import pytest
from conftest import tiny_network
from PIL import Image
from test_export_cli import write_checkpoint

from odm_sr.export.runtime import export_checkpoint
from odm_sr.export.spec import ExportError
from odm_sr.upscale import upscale_file


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    """Tiny 2-bit EDSR (ODM) checkpoints at x2 and x3."""
    out = {}
    for scale in (2, 3):
        tmp = tmp_path_factory.mktemp(f"x{scale}")
        net, cfg = tiny_network("edsr", "odm", 2, tmp, scale=scale)
        write_checkpoint(net, cfg, tmp / "tiny.ckpt")
        out[scale] = tmp / "tiny.ckpt"
    return out


def _upscale(path, tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "lr.png")
    return upscale_file(path, tmp_path / "lr.png", tmp_path / "sr.png", engine="onnx", threads=1)


def _files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_export_keeps_the_previous_pair(ckpts, tmp_path, monkeypatch):
    """The export fails after the graph is made (disk full while packing, or at the fsync of the second file):
    the previous .onnx and .odmq stay as they were, and no temporary file is left."""
    from odm_sr.export import packing

    export_checkpoint(ckpts[2], tmp_path / "out" / "model.onnx", (16, 16))
    before = _files(tmp_path / "out")
    full = OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(packing, "pack_bits", lambda *a: (_ for _ in ()).throw(full))
        with pytest.raises(OSError, match="No space left"):
            export_checkpoint(ckpts[3], tmp_path / "out" / "model.onnx", (16, 16))
    assert _files(tmp_path / "out") == before
    calls, real_fsync = [], os.fsync

    def fsync(fd: int) -> None:  # the second file does not fit
        calls.append(fd)
        if len(calls) == 2:
            raise full
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        export_checkpoint(ckpts[3], tmp_path / "out" / "model.onnx", (16, 16))
    assert len(calls) == 2 and _files(tmp_path / "out") == before
    assert _upscale(tmp_path / "out" / "model.onnx", tmp_path).is_file()  # the kept pair still works


@pytest.mark.parametrize("other", ["another_scale", "another_export"])
def test_an_onnx_beside_the_odmq_of_another_export_is_refused_naming_both(other, ckpts, tmp_path):
    export_checkpoint(ckpts[2], tmp_path / "a" / "model.onnx", (16, 16))
    export_checkpoint(ckpts[3 if other == "another_scale" else 2], tmp_path / "b" / "model.onnx", (16, 16))
    shutil.copyfile(tmp_path / "b" / "model.onnx", tmp_path / "a" / "model.onnx")
    onnx, packed = tmp_path / "a" / "model.onnx", tmp_path / "a" / "model.odmq"
    with pytest.raises(ExportError, match=f"^{onnx} and {packed} do not belong to each other") as err:
        _upscale(onnx, tmp_path)
    message = str(err.value)
    if other == "another_scale":
        assert "model.onnx: edsr x3 " in message and "model.odmq: edsr x2 " in message, message
    assert "\n" not in message and not (tmp_path / "sr.png").exists()


def test_a_damaged_onnx_is_refused_naming_it(ckpts, tmp_path):
    onnx = tmp_path / "model.onnx"
    export_checkpoint(ckpts[2], onnx, (16, 16))
    good = onnx.read_bytes()
    onnx.write_bytes(b"\x08\xff" + good[:50])  # not a protobuf any more: ORT said InvalidProtobuf
    with pytest.raises(ExportError, match=f"^{onnx}: not a readable ONNX model"):
        _upscale(onnx, tmp_path)
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0x10  # inside the weights: still an ONNX model, wrong pixels
    onnx.write_bytes(bytes(damaged))
    with pytest.raises(ExportError, match=f"^{onnx}: checksum mismatch: the file is damaged"):
        _upscale(onnx, tmp_path)
    assert not (tmp_path / "sr.png").exists()
