"""Evaluation loops shared by training, `odm-sr-eval` and the bicubic baseline rows (METHODS.md §1.3)."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .data.imresize import imresize
from .metrics import MetricAccumulator, evaluate_pair, to_uint8
from .models.windows import PAD_MODES
from .quant.distributed import world_size

Upscaler = Callable[[Tensor], Tensor]  # LR batch in [0, 1] -> SR batch in [0, 1]
EVAL_PAD_MODES = ("official", *PAD_MODES)


def accumulate(acc: MetricAccumulator, sr: Tensor, hr: Tensor, scale: int,
               names: Sequence[str] | None = None) -> None:
    """Add the per-image PSNR/SSIM of a batch (SR and HR in [0, 1]; rounded to uint8 first), with the
    images' names when given (``merge_across_ranks`` drops the duplicates DDP's sampler pads with by name)."""
    for i in range(sr.shape[0]):
        name = str(names[i]) if names is not None else ""
        acc.update(*evaluate_pair(to_uint8(sr[i], 1.0), to_uint8(hr[i], 1.0), scale), image_name=name)


def merge_across_ranks(acc: MetricAccumulator) -> MetricAccumulator:
    """Under DDP: one accumulator holding every rank's images (rank order), each named image once.

    DDP's distributed sampler gives each rank a shard of the set and pads the shards to equal length with
    repeated images; per-rank means would be means over a shard. Every rank must call this for the same sets
    in the same order (it is a collective). Without a process group (or with one rank): ``acc`` itself.
    """
    world = world_size()
    if world < 2:
        return acc
    parts: list[list[tuple[str, float, float]] | None] = [None] * world
    torch.distributed.all_gather_object(parts, acc.per_image)
    merged, seen = MetricAccumulator(acc.set_name), set()
    for records in parts:
        for name, psnr_value, ssim_value in records or []:
            if name and name in seen:
                continue
            seen.add(name)
            merged.update(psnr_value, ssim_value, image_name=name)
    return merged


@torch.no_grad()
def evaluate_loader(upscale: Upscaler, loader, scale: int) -> tuple[float, float]:
    """Mean per-image PSNR/SSIM of ``upscale`` over a loader."""
    acc = MetricAccumulator()
    for batch in loader:
        accumulate(acc, upscale(batch["lr"]), batch["hr"], scale, batch.get("name"))
    return acc.psnr, acc.ssim


def evaluate_sets(upscale: Upscaler, datamodule) -> dict[str, tuple[float, float]]:
    """PSNR/SSIM of ``upscale`` on every test set of ``datamodule`` (set up here)."""
    datamodule.setup("test")
    loaders = datamodule.test_dataloader()
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    names = list(datamodule.test_set_names)
    return {name: evaluate_loader(upscale, loader, datamodule.scale)
            for name, loader in zip(names, loaders, strict=True)}


def bicubic_upscale(scale: int) -> Upscaler:
    """MATLAB-bicubic upscaling by ``scale`` of the 8-bit LR (the baseline row of every table); the uint8 path
    rounds after each pass as MATLAB does, which reproduces the published bicubic numbers."""
    return lambda lr: imresize(to_uint8(lr, 1.0), scale).float() / 255.0


def eval_pad_mode(net: torch.nn.Module, pad_mode: str = "official") -> str | None:
    """The window padding ``net`` uses when evaluated (``eval.pad_mode``, METHODS.md §1.3.2); None for a net
    without window padding (EDSR, RDN). ``official``: the mode of the script behind the published numbers
    (SwinIR ``main_test_swinir.py``: mirror; HAT ``pre_process``: reflect), else ``reflect`` or ``mirror``."""
    if pad_mode not in EVAL_PAD_MODES:
        raise ValueError(f"eval.pad_mode={pad_mode!r}: expected one of {EVAL_PAD_MODES}")
    if not hasattr(net, "pad_mode"):
        return None
    return getattr(net, "official_eval_pad_mode", net.pad_mode) if pad_mode == "official" else pad_mode


@contextlib.contextmanager
def window_padding(net: torch.nn.Module, mode: str | None) -> Iterator[None]:
    """``net.pad_mode = mode`` inside the block (nothing when ``mode`` is None); restored afterwards."""
    if mode is None:
        yield
        return
    saved = net.pad_mode
    net.pad_mode = mode
    try:
        yield
    finally:
        net.pad_mode = saved


def resolve_device(device: str | None = None) -> torch.device:
    """``eval.device`` / ``--device``: the device named, or (None, "auto") CUDA where available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def module_device(net: torch.nn.Module) -> torch.device:
    """The device of ``net``'s first parameter (or buffer); the CPU for a module without either."""
    for t in (*net.parameters(), *net.buffers()):
        return t.device
    return torch.device("cpu")


def network_upscale(net: torch.nn.Module, tile: int | None = None, overlap: int = 16,
                    pad_mode: str = "official", out: Tensor | None = None) -> Upscaler:
    """Inference with a backbone in its own pixel range, tiled when ``tile`` is set; transformers pad to a
    window multiple as ``eval_pad_mode(net, pad_mode)`` says (training keeps the model's own mode).
    ``out``: a uint8 (N, C, sH, sW) destination (may be a view of an HWC buffer); each tile is rounded to uint8
    (``to_uint8``) as it comes, so memory grows with the uint8 output, not with a float copy of it."""
    from .inference import forward_chopped

    rng = float(getattr(net, "pixel_range", 1.0))
    mode = eval_pad_mode(net, pad_mode)

    def run(x: Tensor) -> Tensor:
        x = x.to(module_device(net))  # the network's device (a tile at a time when tiled)
        with window_padding(net, mode):
            sr = net(x * rng) / rng
        return sr if out is None else to_uint8(sr, 1.0)

    return lambda lr: forward_chopped(run, lr, scale=int(net.scale), tile=tile, overlap=overlap, out=out)


def warn_if_tiled_dynamic(method, tile: int | None, setting: str) -> None:
    """Tiling changes the output of a method with per-image activation statistics (DAQ, DDTB's dynamic
    gates: each tile gets its own statistics; up to 37/255 apart reported for DAQ); say so when ``tile`` is set."""
    if tile and method.per_image_statistics:
        warnings.warn(f"{setting}={tile}: method {method.name!r} quantizes activations with statistics of the "
                      f"whole input, so a tiled result differs from the whole-image one (not only round-off); "
                      f"leave {setting} unset for reported numbers.", UserWarning, stacklevel=2)


def eval_upscale(net: torch.nn.Module, eval_cfg: Mapping[str, Any]) -> Upscaler:
    """``network_upscale`` with the ``eval`` config group's ``tile``, ``tile_overlap`` and ``pad_mode``."""
    return network_upscale(net, eval_cfg.get("tile"), int(eval_cfg.get("tile_overlap", 16)),
                           str(eval_cfg.get("pad_mode", "official")))


def metrics_table(rows: dict[str, dict[str, Any]], set_names: list[str]) -> str:
    """Markdown table: one row per entry of ``rows`` ({row: {set: (psnr, ssim)}}), PSNR/SSIM per set."""
    header = "| method | " + " | ".join(set_names) + " |"
    sep = "|---|" + "---|" * len(set_names)
    lines = [header, sep]
    for row, per_set in rows.items():
        cells = []
        for s in set_names:
            value = per_set.get(s)
            cells.append("–" if value is None or any(map(math.isnan, value)) else f"{value[0]:.2f}/{value[1]:.4f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_as_json(rows: dict[str, dict[str, tuple[float, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {set: (psnr, ssim)}} as written to results.json / eval.json: {row: {set: {"psnr", "ssim"}}}."""
    return {row: {s: {"psnr": v[0], "ssim": v[1]} for s, v in per_set.items()} for row, per_set in rows.items()}
