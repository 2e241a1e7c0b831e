"""Super-resolving one image file with a trained checkpoint (``upscale_file``); the library side of
`odm-sr-upscale` (``odm_sr.cli.upscale``)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .data.io import read_image, save_image, to_tensor
from .evaluation import network_upscale, resolve_device, warn_if_tiled_dynamic
from .precision import set_tf32
from .trained import load_trained


def upscale_file(ckpt: str | Path, src: str | Path, dst: str | Path, tile: int | None = None,
                 overlap: int = 16, pad_mode: str = "official", tf32: bool = False, engine: str = "torch",
                 threads: int | None = None, overwrite: bool = False, device: str | None = None) -> Path:
    """Read ``src`` (grayscale/RGBA converted to RGB), super-resolve it, write ``dst`` (PNG recommended).
    Refuses ``dst`` = ``src`` unless ``overwrite``; a checkpoint with NaN/inf weights is an error.

    ``engine="onnx"``: the integer graph in ONNX Runtime (``export.runtime``; ``ckpt`` may also be an exported
    .onnx/.odmq), with ``threads`` intra-op threads. ``device`` (torch engine): where the network runs; None:
    CUDA where available, else the CPU."""
    src, dst = Path(src), Path(dst)
    if not overwrite and src.exists() and dst.exists() and os.path.samefile(src, dst):
        raise FileExistsError(f"output {dst} is the input image {src}: writing it would destroy the input; "
                              f"choose another output path (or pass --overwrite to replace the input)")
    set_tf32(tf32)  # fp32 as in training unless asked
    if engine == "onnx":
        from .export.runtime import load_engine, onnx_upscale

        onnx = load_engine(ckpt, threads, pad_mode)
        return write_upscaled(lambda out: onnx_upscale(onnx, tile, overlap, out=out), onnx.scale, src, dst, tile)
    net, method, _ = load_trained(ckpt)
    warn_if_tiled_dynamic(method, tile, "--tile")
    return upscale_image(net.to(resolve_device(device)), src, dst, tile, overlap, pad_mode)


def upscale_image(net: nn.Module, src: str | Path, dst: str | Path, tile: int | None = None,
                  overlap: int = 16, pad_mode: str = "official") -> Path:
    """``net`` on the image file ``src``, written to ``dst`` (``write_upscaled``)."""
    return write_upscaled(lambda out: network_upscale(net, tile, overlap, pad_mode, out=out), int(net.scale),
                          src, dst, tile)


def write_upscaled(make_upscaler: Callable[[Tensor], Callable[[Tensor], Tensor]], scale: int, src: str | Path,
                   dst: str | Path, tile: int | None = None) -> Path:
    """The image file ``src`` through ``make_upscaler(out)`` (an upscaler that rounds each tile to uint8 into
    ``out``), written to ``dst`` atomically (a temporary file renamed over ``dst``: a killed run leaves no
    truncated image under the final name). The destination is an (H, W, 3) uint8 buffer, the layout the encoder
    takes: with tiling, memory is the uint8 output plus one tile, never a float copy of the whole output.
    Running out of memory is an ``UpscaleMemoryError`` suggesting ``--tile`` (``tile``: the one in use)."""
    img, _ = read_image(src, mode="RGB")
    lr = to_tensor(img).unsqueeze(0)
    del img
    try:
        buffer = torch.empty((1, scale * lr.shape[-2], scale * lr.shape[-1], 3), dtype=torch.uint8)
        with torch.no_grad():
            make_upscaler(buffer.permute(0, 3, 1, 2))(lr)
    except Exception as err:  # torch.OutOfMemoryError is a RuntimeError; ONNX Runtime raises its own classes
        if isinstance(err, MemoryError | torch.OutOfMemoryError) or _OUT_OF_MEMORY.search(str(err)):
            raise UpscaleMemoryError(out_of_memory_advice(src, tuple(lr.shape[-2:]), tile, err)) from err
        raise
    del lr
    dst = Path(dst)
    save_image(buffer[0].numpy(), dst)  # creates the parent folders; atomic
    return dst


class UpscaleMemoryError(MemoryError):
    """The network ran out of (GPU or CPU) memory on the image; the message suggests ``--tile``."""


# what the allocators say: torch's CPU allocator ("can't allocate memory"), CUDA ("out of memory"), ONNX Runtime
_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|failed to allocate memory|not enough memory", re.I)


def out_of_memory_advice(src: str | Path, lr_hw: tuple[int, ...], tile: int | None, err: BaseException) -> str:
    """The one-line message of ``UpscaleMemoryError``: the image, its size and the ``--tile`` to try."""
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    advice = ("run it in tiles with --tile 256 (or smaller: memory is then that of one tile, with --overlap LR "
              "pixels of context around it)" if tile is None else
              f"use a smaller --tile than {tile}")
    return f"upscaling {src} ({lr_hw[0]}x{lr_hw[1]} LR pixels) ran out of memory: {advice} ({first})"
