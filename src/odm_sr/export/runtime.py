"""Running an exported integer model with ONNX Runtime on CPU (``odm-sr-upscale --engine onnx``,
``odm-sr-eval eval.engine=onnx``), and the one-call export of a checkpoint (``odm-sr-export``)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from odm_sr.files import atomic_write_all

from .fast import EXACT, FAST, calibration_images, check_mode, fast_model
from .integer import IntegerSpec, extract_spec, integer_model
from .onnx_graph import INPUT, graph_metadata, has_dynamic_size, tag_graph, to_onnx
from .packing import pack, read_header, unpack
from .requant import MIN_SIZE, RequantPair
from .spec import ExportError
from .tail import TAIL_MIN_SIDE, tail_modules

PACKED_SUFFIX = ".odmq"


def session(graph: bytes, threads: int | None = None, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session; ``threads`` intra-op threads (None: ORT's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


class OnnxEngine:
    """ORT sessions of one integer model: a single dynamic-size graph (EDSR, RDN) or one graph per LR size
    (SwinIR/HAT, built on first use from the integer model).

    Called on (N, 3, H, W) float32 arrays in the backbone's pixel range, like the network itself. ``run_name``:
    the training run the model comes from (the row name of ``odm-sr-eval``).
    """

    def __init__(self, int_model: nn.Module, threads: int | None = None, pad_mode: str = "official",
                 graph: bytes | None = None, run_name: str = "") -> None:
        self.model, self.threads, self.pad_mode, self.run_name = int_model, threads, pad_mode, run_name
        self.scale = int(int_model.scale)
        self.pixel_range = float(int_model.pixel_range)
        self.dynamic = has_dynamic_size(int_model)
        self._composed_tail = bool(tail_modules(int_model))  # to_onnx composes it (export.tail)
        self._sessions: dict[tuple[int, int] | None, object] = {}
        if graph is not None:
            self._sessions[None] = session(graph, threads)

    def graph(self, hw: tuple[int, int]) -> bytes:
        return to_onnx(self.model, hw, self.pad_mode)

    def _session(self, hw: tuple[int, int]):
        key = None if self.dynamic else hw
        if key not in self._sessions:
            self._sessions[key] = session(self.graph(hw), self.threads)
        return self._sessions[key]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if min(x.shape[-2:]) < MIN_SIZE and any(isinstance(m, RequantPair) for m in self.model.modules()):
            raise ValueError(f"input of {x.shape[-2]}x{x.shape[-1]} pixels: the requantized integer graph is exact "
                             f"for inputs of at least {MIN_SIZE}x{MIN_SIZE} (export.requant)")
        if min(x.shape[-2:]) < TAIL_MIN_SIDE and self._composed_tail:
            raise ValueError(f"input of {x.shape[-2]}x{x.shape[-1]} pixels: the graph's composed tail takes inputs of "
                             f"at least {TAIL_MIN_SIDE}x{TAIL_MIN_SIDE} (export.tail)")
        return self._session(tuple(x.shape[-2:])).run(None, {INPUT: np.ascontiguousarray(x, np.float32)})[0]


def onnx_eval_upscale(path: str | Path, eval_cfg) -> object:
    """``odm-sr-eval eval.engine=onnx``: ``onnx_upscale`` with the ``eval`` group's tile, overlap, pad mode and
    ``threads``."""
    engine = load_engine(path, eval_cfg.get("threads"), str(eval_cfg.get("pad_mode", "official")))
    return onnx_upscale(engine, eval_cfg.get("tile"), int(eval_cfg.get("tile_overlap", 16)))


def onnx_upscale(engine: OnnxEngine, tile: int | None = None, overlap: int = 16, out: Tensor | None = None):
    """The ``evaluation.network_upscale`` contract ([0, 1] in and out, tiled as ``forward_chopped``; with ``out``,
    each tile rounded to uint8 into it) on ORT."""
    from odm_sr.inference import forward_chopped
    from odm_sr.metrics import to_uint8

    rng = engine.pixel_range

    def run(x: Tensor) -> Tensor:
        sr = torch.from_numpy(engine((x * rng).numpy())) / rng
        return sr if out is None else to_uint8(sr, 1.0)

    return lambda lr: forward_chopped(run, lr, scale=engine.scale, tile=tile, overlap=overlap, out=out)


def trained_integer(ckpt: str | Path) -> tuple[nn.Module, IntegerSpec, nn.Module, DictConfig]:
    """(trained fake-quant network, its integer spec, the integer model, config) of a checkpoint."""
    from odm_sr.trained import load_trained

    net, _, cfg = load_trained(ckpt)
    spec = extract_spec(net)
    return net, spec, integer_model(net, spec), cfg


def load_engine(path: str | Path, threads: int | None = None, pad_mode: str = "official") -> OnnxEngine:
    """An engine from a training checkpoint (.ckpt), a packed file (.odmq) or an exported graph (.onnx, with
    its packed file beside it, which must be the one exported with it: ``check_pair``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a .ckpt, {PACKED_SUFFIX} or .onnx)")
    if path.suffix == ".ckpt":
        _, _, int_model, cfg = trained_integer(path)
        return OnnxEngine(int_model, threads, pad_mode, run_name=str(cfg.get("run_name")))
    packed = path.with_suffix(PACKED_SUFFIX)
    if not packed.is_file():
        raise FileNotFoundError(f"{packed}: the packed weights of {path} are missing (odm-sr-export writes both)")
    data = packed.read_bytes()
    net, spec, cfg = unpack(data, str(packed))
    int_model, run_name = integer_model(net, spec), str(cfg.get("run_name"))
    if path.suffix != ".onnx":
        return OnnxEngine(int_model, threads, pad_mode, run_name=run_name)
    graph = path.read_bytes()
    check_pair(path, graph, packed, {**_identity(cfg), **read_header(data, str(packed))["graph"]})
    if not has_dynamic_size(int_model):  # SwinIR/HAT: a graph per LR size, built from the packed file
        return OnnxEngine(int_model, threads, pad_mode, run_name=run_name)
    try:
        return OnnxEngine(int_model, threads, pad_mode, graph, run_name)
    except Exception as err:  # onnxruntime's InvalidProtobuf, InvalidGraph, Fail: no common base class
        raise ExportError(f"{path}: ONNX Runtime cannot load it ({type(err).__name__}: {err}".splitlines()[0]
                          + "); export the checkpoint again with odm-sr-export") from None


def _identity(cfg: DictConfig) -> dict[str, str]:
    return {"model": str(cfg.model.name), "scale": str(int(cfg.model.scale)), "run_name": str(cfg.get("run_name"))}


def check_pair(onnx_path: Path, graph: bytes, packed_path: Path, expected: dict) -> None:
    """The ``.onnx`` and the ``.odmq`` were written by one ``odm-sr-export``: same export id, model, scale and
    run (``expected``: those of the packed file; else an error naming both files and what each holds), and the
    graph's SHA-256 is the one the packed file records."""
    tagged = graph_metadata(graph, str(onnx_path))
    keys = ("export_id", "model", "scale", "run_name")
    if any(tagged.get(k) != expected.get(k) for k in keys):
        def describe(meta: dict) -> str:
            return f"{meta.get('model')} x{meta.get('scale')} of run {meta.get('run_name')}, export id " \
                   f"{meta.get('export_id')}"

        raise ExportError(f"{onnx_path} and {packed_path} do not belong to each other ({onnx_path.name}: "
                          f"{describe(tagged)}; {packed_path.name}: {describe(expected)}); odm-sr-export writes "
                          f"both: keep each .onnx beside its own .odmq, or export the checkpoint again")
    if hashlib.sha256(graph).hexdigest() != expected.get("sha256"):
        raise ExportError(f"{onnx_path}: checksum mismatch: the file is damaged (its SHA-256 is not the one "
                          f"{packed_path.name} records); copy it again or export the checkpoint again")


def export_checkpoint(ckpt: str | Path, out: str | Path, lr_hw: tuple[int, int] = (64, 64),
                      pad_mode: str = "official", mode: str = EXACT, calib_images: int = 16,
                      data_root: str | Path | None = None) -> dict:
    """Write ``out`` (.onnx) and the packed file beside it, both or neither (``files.atomic_write_all``); returns
    their paths and sizes. ``mode``: ``exact`` (default) or the opt-in inexact ``fast-inexact`` (``export.fast``:
    8-bit ranges from ``calib_images`` training LR images under ``data_root``; the graph's metadata says so)."""
    out = Path(out)
    check_mode(mode)
    packed = out.with_suffix(PACKED_SUFFIX)
    if packed == out:
        raise ExportError(f"{out}: give the path of the .onnx graph; its packed file is written beside it")
    net, spec, int_model, cfg = trained_integer(ckpt)
    tags = {}
    if mode == FAST:
        calib = calibration_images(int(net.scale), calib_images, float(net.pixel_range), data_root)
        int_model, tags = fast_model(int_model, calib), {"mode": mode, "calib_images": len(calib)}
    export_id = uuid.uuid4().hex
    graph = tag_graph(to_onnx(int_model, lr_hw, pad_mode), {"export_id": export_id, **_identity(cfg), **tags})
    data = pack(net, spec, cfg, {"export_id": export_id, "sha256": hashlib.sha256(graph).hexdigest()})
    atomic_write_all({out: lambda f: f.write(graph), packed: lambda f: f.write(data)})
    from odm_sr.analysis.complexity import storage

    return {"storage_k": storage(net)["total_k"], "onnx": str(out), "onnx_bytes": len(graph),
            "packed": str(packed), "packed_bytes": len(data), "dynamic_size": has_dynamic_size(int_model),
            "traced_lr_hw": list(lr_hw), "mode": mode}
