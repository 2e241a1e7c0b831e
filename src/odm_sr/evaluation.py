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
from .metrics import GRAY_MODES, SRMetrics, to_uint8
from .models.base import SRModel, pixel_range
from .models.windows import PAD_MODES
from .quant.distributed import world_size

Upscaler = Callable[[Tensor], Tensor]  # LR batch in [0, 1] -> SR batch in [0, 1]
EVAL_PAD_MODES = ("official", *PAD_MODES)


def owned_weights(indices: Sequence[int] | Tensor | None, n: int, device: torch.device | str | None = None) -> Tensor:
    """1 for each of a batch's ``n`` images this rank counts, 0 for the padding images of DDP's sampler.

    Lightning shards a val/test set with ``DistributedSampler(shuffle=False)``: rank r gets the positions
    r, r + world, ...; position p < len(set) holds image p, and the shards are padded to equal length with
    repeats of the first images (positions p >= len(set)), which land on a rank r with r != index % world.
    So a rank counts image ``index`` iff ``index % world == rank``: every image once over the ranks (also
    where every rank sees the whole set). One process, or no ``indices`` (a set without "index"): all count.
    """
    world = world_size()
    if indices is None or world < 2:
        return torch.ones(n, dtype=torch.float64, device=device)
    idx = torch.as_tensor(indices, device=device).reshape(n)
    return (idx % world == torch.distributed.get_rank()).to(torch.float64)


def update_metrics(metric: SRMetrics, sr: Tensor, hr: Tensor, indices: Sequence[int] | Tensor | None = None) -> None:
    """Add a batch (SR and HR in [0, 1]; rounded to uint8 first) to ``metric``, each image weighted by
    ``owned_weights`` (the dataset ``indices`` when given: DDP's padding images are not counted twice)."""
    weights = owned_weights(indices, sr.shape[0], metric.count.device)
    for i in range(sr.shape[0]):
        metric.update(to_uint8(sr[i], 1.0), to_uint8(hr[i], 1.0), weights[i])


@torch.no_grad()
def evaluate_loader(upscale: Upscaler, loader, scale: int, gray: str = "channel") -> tuple[float, float]:
    """Mean per-image PSNR/SSIM of ``upscale`` over a loader, in this process (no DDP merge); the metrics
    run on the device of ``upscale``'s output (the network's, e.g. ``eval.device``); ``gray``: ``SRMetrics``'."""
    metric: SRMetrics | None = None
    for batch in loader:
        sr = upscale(batch["lr"])
        if metric is None:
            metric = SRMetrics(scale, gray, sync_on_compute=False).to(sr.device)
        update_metrics(metric, sr, batch["hr"])
    if metric is None:
        return math.nan, math.nan
    psnr_mean, ssim_mean, _ = metric.compute().tolist()
    return psnr_mean, ssim_mean


def evaluate_sets(upscale: Upscaler, datamodule, gray: str = "channel") -> dict[str, tuple[float, float]]:
    """PSNR/SSIM of ``upscale`` on every test set of ``datamodule`` (set up here); ``gray``: ``SRMetrics``'."""
    datamodule.setup("test")
    loaders = datamodule.test_dataloader()
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    names = list(datamodule.test_set_names)
    return {name: evaluate_loader(upscale, loader, datamodule.scale, gray)
            for name, loader in zip(names, loaders, strict=True)}


def bicubic_upscale(scale: int) -> Upscaler:
    """MATLAB-bicubic upscaling by ``scale`` of the 8-bit LR (the baseline row of every table); the uint8 path
    rounds after each pass as MATLAB does, which reproduces the published bicubic numbers."""
    return lambda lr: imresize(to_uint8(lr, 1.0), scale).float() / 255.0


def eval_gray_mode(net: torch.nn.Module | None, gray_mode: str = "official") -> str:
    """How a grayscale ground truth is compared (``eval.gray_mode``, ``metrics.GRAY_MODES``): ``official`` is
    the convention of the script behind ``net``'s published numbers (``SRModel.official_gray_mode``; ``channel``
    for a bare module or none)."""
    if gray_mode == "official":
        return net.official_gray_mode if isinstance(net, SRModel) else "channel"
    if gray_mode not in GRAY_MODES:
        raise ValueError(f"eval.gray_mode={gray_mode!r}: expected official or one of {GRAY_MODES}")
    return gray_mode


def eval_pad_mode(net: torch.nn.Module, pad_mode: str = "official") -> str | None:
    """The window padding ``net`` uses when evaluated (``eval.pad_mode``, METHODS.md §1.3.2); None for a net
    without window padding (EDSR, RDN). ``official``: the mode of the script behind the published numbers
    (SwinIR ``main_test_swinir.py``: mirror; HAT ``pre_process``: reflect), else ``reflect`` or ``mirror``."""
    if pad_mode not in EVAL_PAD_MODES:
        raise ValueError(f"eval.pad_mode={pad_mode!r}: expected one of {EVAL_PAD_MODES}")
    if not isinstance(net, SRModel) or net.pad_mode is None:
        return None
    return (net.official_eval_pad_mode or net.pad_mode) if pad_mode == "official" else pad_mode


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

    rng = pixel_range(net)
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
