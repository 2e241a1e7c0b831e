"""IMDN (Hui et al., ACM MM 2019, "Lightweight Image Super-Resolution with Information Multi-distillation Network").

Architecture of `Zheng222/IMDN` (`model/architecture.py`, `model/block.py`), with its module names so the official
`checkpoints/IMDN_x{s}.pth` load with ``strict=True`` (their ``module.`` prefix is stripped by the loader):
``fea_conv``; ``IMDB1``..``IMDB6`` (3×3 ``c1``..``c4`` with the 16/48 channel split and LeakyReLU(0.05), contrast-aware
channel attention ``cca.conv_du.{0,2}`` (mean + std pooling, 1×1 64→4→64, ReLU, sigmoid), 1×1 fusion ``c5``, block
residual); ``c.0`` (1×1 over the six block outputs, LeakyReLU); ``LR_conv`` with the global residual from ``fea_conv``;
``upsampler.0`` (3×3 conv to 3·s² channels) + PixelShuffle. RGB in [0, 1] in and out (no mean shift).
"""

from __future__ import annotations

import torch
from torch import nn

from odm_sr.models.base import SRModel

LRELU_SLOPE = 0.05  # block.activation('lrelu') default


def conv_layer(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    """'Same'-padded conv with bias (``block.conv_layer``)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2)


class _SqrtZeroGrad(torch.autograd.Function):
    """sqrt(v) with the gradient 1/(2·sqrt(v)) where v > 0 and 0 where v = 0 (instead of inf)."""

    @staticmethod
    def forward(ctx, v: torch.Tensor) -> torch.Tensor:
        out = v.sqrt()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return torch.where(out > 0, grad / (2 * out).clamp_min(torch.finfo(out.dtype).tiny), torch.zeros_like(grad))


def channel_std(x: torch.Tensor) -> torch.Tensor:
    """Per-channel standard deviation over H, W (population, ``block.stdv_channels``): (B, C, 1, 1).

    Same forward as the release's ``variance.pow(0.5)``, whose gradient is infinite where a channel is constant
    (variance 0): a quantized network reaches that (a 2-bit input patch of one level gives a constant channel),
    and inf · 0 turns every gradient into NaN after one step. Here the gradient is 0 there (a subgradient).
    """
    mean = x.mean(dim=(2, 3), keepdim=True)
    return _SqrtZeroGrad.apply((x - mean).pow(2).mean(dim=(2, 3), keepdim=True))


class CCALayer(nn.Module):
    """Contrast-aware channel attention: x · sigmoid(conv(relu(conv(std(x) + mean(x)))))."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.conv_du = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(channels // reduction, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv_du(channel_std(x) + x.mean(dim=(2, 3), keepdim=True))


class IMDModule(nn.Module):
    """Information multi-distillation block: three distillation steps keep ``distilled`` channels each, ``c4`` makes
    the last ``distilled``; the concatenation goes through CCA and the 1×1 ``c5``, plus the block input."""

    def __init__(self, channels: int = 64, distillation_rate: float = 0.25) -> None:
        super().__init__()
        self.distilled = int(channels * distillation_rate)
        self.remaining = channels - self.distilled
        self.c1 = conv_layer(channels, channels, 3)
        self.c2 = conv_layer(self.remaining, channels, 3)
        self.c3 = conv_layer(self.remaining, channels, 3)
        self.c4 = conv_layer(self.remaining, self.distilled, 3)
        self.act = nn.LeakyReLU(LRELU_SLOPE)
        self.c5 = conv_layer(channels, channels, 1)
        self.cca = CCALayer(self.distilled * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = (self.distilled, self.remaining)
        d1, r1 = torch.split(self.act(self.c1(x)), split, dim=1)
        d2, r2 = torch.split(self.act(self.c2(r1)), split, dim=1)
        d3, r3 = torch.split(self.act(self.c3(r2)), split, dim=1)
        out = torch.cat([d1, d2, d3, self.c4(r3)], dim=1)
        return self.c5(self.cca(out)) + x


class IMDN(SRModel):
    """IMDN ×``scale``: ``num_modules`` IMDBs of ``nf`` features; input and output in [0, 1]."""

    def __init__(self, scale: int, nf: int = 64, num_modules: int = 6, in_nc: int = 3, out_nc: int = 3,
                 name: str = "imdn") -> None:
        super().__init__()
        self.name, self.scale, self.pixel_range = name, scale, 1.0
        self.official_gray_mode = "rgb"  # the released test reads every image as colour (cv2 BGR), then Y
        self.num_modules = num_modules
        self.fea_conv = conv_layer(in_nc, nf, 3)
        for i in range(1, num_modules + 1):
            self.add_module(f"IMDB{i}", IMDModule(nf))
        self.c = nn.Sequential(conv_layer(nf * num_modules, nf, 1), nn.LeakyReLU(LRELU_SLOPE))
        self.LR_conv = conv_layer(nf, nf, 3)
        self.upsampler = nn.Sequential(conv_layer(nf, out_nc * scale ** 2, 3), nn.PixelShuffle(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.fea_conv(x)
        outs, out = [], fea
        for i in range(1, self.num_modules + 1):
            out = getattr(self, f"IMDB{i}")(out)
            outs.append(out)
        return self.upsampler(self.LR_conv(self.c(torch.cat(outs, dim=1))) + fea)
