"""Evaluation loops shared by training, `odm-sr-eval` and the bicubic baseline rows."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .data.imresize import imresize
from .metrics import MetricAccumulator, evaluate_pair, to_uint8


@torch.no_grad()
def evaluate_loader(upscale: Callable[[Tensor], Tensor], loader, scale: int) -> tuple[float, float]:
    """Mean per-image PSNR/SSIM (METHODS.md §1.3) of ``upscale`` (LR [0,1] → SR [0,1]) over a loader."""
    acc = MetricAccumulator()
    for batch in loader:
        sr = upscale(batch["lr"])
        for i in range(sr.shape[0]):
            acc.update(*evaluate_pair(to_uint8(sr[i], 1.0), to_uint8(batch["hr"][i], 1.0), scale))
    return acc.psnr, acc.ssim


def bicubic_upscale(scale: int) -> Callable[[Tensor], Tensor]:
    """MATLAB-bicubic upscaling by ``scale`` (the baseline row of every table)."""
    return lambda lr: imresize(lr, scale)


def bicubic_metrics(datamodule, set_names: list[str]) -> dict[str, tuple[float, float]]:
    """Bicubic PSNR/SSIM per test set of a set-up data module."""
    datamodule.setup("test")
    loaders = datamodule.test_dataloader()
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    return {name: evaluate_loader(bicubic_upscale(datamodule.scale), loader, datamodule.scale)
            for name, loader in zip(set_names, loaders)}
