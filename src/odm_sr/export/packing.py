"""The packed weight file (``.odmq``) beside the exported graph: b-bit weight codes, per-layer scales,
activation grids and the float layers, and the loader that rebuilds the integer model from it.

Layout (little-endian)::

    b"ODMQ" | u16 version | u32 n | n bytes of zlib(JSON header) | body | SHA-256 of all the bytes before it

The reader checks the SHA-256 before it reads anything else, so a damaged or truncated file is refused, not
turned into wrong pixels; it also refuses a NaN or inf among the floats. The header holds the training config
(to rebuild the network's structure, ``builders.build_network``; checked by ``stored_config`` first), the
SHA-1 of the tensor names and their counts, and the export id and SHA-256 of the ``.onnx`` exported with it
(``runtime.load_engine`` checks that an ``.onnx`` and its ``.odmq`` belong to each other); its size does not
grow with the weights. The body follows the order of ``integer.weight_layers``, ``integer.act_quantizers`` and
``integer.fp_parameters`` of that structure:

- per quantized layer: its weight parameter (u_w, m or s; float32), then the b-bit unsigned codes packed
  little-endian bit by bit (4 per byte at 2 bits), padded to a whole byte;
- per activation quantizer: (l_a, u_a) or α, float32;
- per float parameter: its values, float32.

So the body is the storage figure of ``odm-sr-complexity`` (METHODS.md §6, rule ``full``): b bits per quantized
weight, 32 per float parameter, per activation bound and per weight-quantizer parameter; PAMS adds m per layer
(a buffer there) and each layer's codes round up to a byte.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from odm_sr.stored_config import stored_config

from .integer import IntegerSpec, act_quantizers, fp_parameters, weight_layers
from .spec import ActGrid, ExportError, WeightCodes, grid_kind, weight_kind

MAGIC, VERSION = b"ODMQ", 2  # version 2: the trailing SHA-256
DIGEST_SIZE = 32


def pack_bits(values: Tensor, bits: int) -> bytes:
    """Unsigned ``bits``-bit integers, packed little-endian bit by bit (2 bits: 4 values per byte)."""
    v = values.reshape(-1).numpy().astype(np.uint16)
    if v.size and int(v.max()) >= 1 << bits:
        raise ExportError(f"code {int(v.max())} does not fit in {bits} bits")
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, count: int, bits: int) -> Tensor:
    planes = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[:count * bits]
    values = planes.reshape(count, bits).astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))
    return torch.from_numpy(values)


def _names_digest(model: nn.Module) -> str:
    names = [*weight_layers(model), *act_quantizers(model), *fp_parameters(model)]
    return hashlib.sha1("\n".join(names).encode()).hexdigest()


def _f32(values) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def pack(model: nn.Module, spec: IntegerSpec, cfg: DictConfig, graph: dict | None = None) -> bytes:
    """The packed file of ``spec`` (from ``integer.extract_spec(model)``); ``cfg`` is the training config,
    ``graph`` what identifies the ``.onnx`` written with it (``runtime.export_checkpoint``: its export id and
    SHA-256)."""
    header = {"cfg": OmegaConf.to_container(cfg, resolve=True), "names_sha1": _names_digest(model),
              "counts": [len(spec.weights), len(spec.grids), len(spec.fp)], "graph": graph or {}}
    body = bytearray()
    for codes in spec.weights.values():
        body += _f32([codes.param]) + pack_bits(codes.stored(), codes.bits)
    for grid in spec.grids.values():
        body += _f32(grid.params)
    for value in spec.fp.values():
        body += _f32(value.reshape(-1).numpy())
    return frame(header, bytes(body))


def frame(header: dict, body: bytes) -> bytes:
    """The file of a header and a body (magic, version, header size, zlib(JSON header), body, SHA-256)."""
    head = zlib.compress(json.dumps(header, sort_keys=True).encode(), 9)
    data = MAGIC + struct.pack("<HI", VERSION, len(head)) + head + body
    return data + hashlib.sha256(data).digest()


def header_size(data: bytes) -> int:
    """Bytes before the body (magic, version, header)."""
    return 10 + struct.unpack_from("<HI", data, 4)[1]


def body_size(data: bytes) -> int:
    """Bytes of the body (the weights), without the header and the trailing SHA-256."""
    return len(data) - header_size(data) - DIGEST_SIZE


def read_header(data: bytes, source: str = "packed file") -> dict:
    """The header of a packed file whose magic, version and SHA-256 are checked (ExportError naming
    ``source`` otherwise)."""
    if data[:4] != MAGIC:
        raise ExportError(f"{source}: not an odm-sr packed model (expected the magic {MAGIC!r})")
    version, size = struct.unpack_from("<HI", data.ljust(10, b"\0"), 4)
    if version != VERSION:
        raise ExportError(f"{source}: format version {version}, this odm-sr reads version {VERSION}; export the "
                          f"checkpoint again with odm-sr-export")
    if len(data) < 10 + size + DIGEST_SIZE or hashlib.sha256(data[:-DIGEST_SIZE]).digest() != data[-DIGEST_SIZE:]:
        raise ExportError(f"{source}: checksum mismatch: the file is damaged or truncated (its SHA-256 does not "
                          f"match its content); copy it again or export the checkpoint again with odm-sr-export")
    try:
        return json.loads(zlib.decompress(data[10:10 + size]))
    except (zlib.error, UnicodeDecodeError, ValueError) as err:
        raise ExportError(f"{source}: the header cannot be read ({type(err).__name__}: {err}); "
                          f"export the checkpoint again with odm-sr-export") from None


def structure(cfg: DictConfig) -> nn.Module:
    """The quantized network that ``cfg`` builds (random weights; no FP checkpoint is read)."""
    from odm_sr.builders import build_network

    build_cfg = cfg.copy()
    build_cfg.model.pretrained = None
    net, _, _ = build_network(build_cfg)
    return net.eval()


class _Reader:
    """The body of a checked file (``data`` without its SHA-256), read in order; errors name ``source``."""

    def __init__(self, data: bytes, offset: int, source: str) -> None:
        self.data, self.offset, self.source = data, offset, source

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise ExportError(f"{self.source}: truncated body")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def floats(self, count: int, name: str) -> np.ndarray:
        values = np.frombuffer(self.take(4 * count), dtype="<f4").copy()
        if not np.isfinite(values).all():
            raise ExportError(f"{self.source}: {name} holds NaN or inf (a damaged or hand-made file); export the "
                              f"checkpoint again with odm-sr-export")
        return values


def unpack(data: bytes, source: str = "packed file") -> tuple[nn.Module, IntegerSpec, DictConfig]:
    """(quantized structure, spec, training config) of a packed file; ``integer.integer_model`` rebuilds
    the exported model from them."""
    header = read_header(data, source)
    cfg = stored_config(header.get("cfg"), source)
    net = structure(cfg)
    if _names_digest(net) != header["names_sha1"]:
        raise ExportError(f"{source}: the network its config builds has other layers than the packed ones "
                          f"(a different odm-sr version?)")
    reader, spec = _Reader(data[:-DIGEST_SIZE], header_size(data), source), IntegerSpec()
    for name, layer in weight_layers(net).items():
        wq, count = layer.weight_quant, layer.weight.numel()
        param = float(reader.floats(1, f"the weight scale of {name}")[0])
        stored = unpack_bits(reader.take((count * wq.bits + 7) // 8), count, wq.bits)
        spec.weights[name] = WeightCodes.from_stored(weight_kind(wq), wq.bits, stored.reshape(layer.weight.shape),
                                                     param)
    for name, q in act_quantizers(net).items():
        kind = grid_kind(q)
        spec.grids[name] = ActGrid(kind, q.bits, tuple(float(v) for v in reader.floats(2 if kind == "odm" else 1,
                                                                                     f"the grid of {name}")))
    for name, p in fp_parameters(net).items():
        spec.fp[name] = torch.from_numpy(reader.floats(p.numel(), name)).reshape(p.shape)
    if reader.offset != len(reader.data):
        raise ExportError(f"{source}: {len(reader.data) - reader.offset} bytes after the last tensor")
    return net, spec, cfg


def read_packed(path: str | Path) -> tuple[nn.Module, IntegerSpec, DictConfig]:
    return unpack(Path(path).read_bytes(), str(path))
