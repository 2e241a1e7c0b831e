"""Evaluation loops shared by training, `odm-sr-eval` and the bicubic baseline rows (METHODS.md §1.3)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .data.imresize import imresize
from .metrics import MetricAccumulator, evaluate_pair, to_uint8

Upscaler = Callable[[Tensor], Tensor]  # LR batch in [0, 1] -> SR batch in [0, 1]


def accumulate(acc: MetricAccumulator, sr: Tensor, hr: Tensor, scale: int) -> None:
    """Add the per-image PSNR/SSIM of a batch (SR and HR in [0, 1]; rounded to uint8 first)."""
    for i in range(sr.shape[0]):
        acc.update(*evaluate_pair(to_uint8(sr[i], 1.0), to_uint8(hr[i], 1.0), scale))


@torch.no_grad()
def evaluate_loader(upscale: Upscaler, loader, scale: int) -> tuple[float, float]:
    """Mean per-image PSNR/SSIM of ``upscale`` over a loader."""
    acc = MetricAccumulator()
    for batch in loader:
        accumulate(acc, upscale(batch["lr"]), batch["hr"], scale)
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


def network_upscale(net: torch.nn.Module, tile: int | None = None, overlap: int = 16) -> Upscaler:
    """Inference with a backbone in its own pixel range, tiled when ``tile`` is set."""
    from .inference import forward_chopped

    rng = float(getattr(net, "pixel_range", 1.0))
    return lambda lr: forward_chopped(lambda x: net(x * rng) / rng, lr, scale=int(net.scale), tile=tile,
                                      overlap=overlap)
