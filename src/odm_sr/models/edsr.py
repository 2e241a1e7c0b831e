"""EDSR (Lim et al., CVPRW 2017): the baseline (16 blocks, 64 features) and the full model.

Source: `sanghyun-son/EDSR-PyTorch` `src/model/edsr.py` and `src/model/common.py`. Module names match
the official checkpoints (`edsr_baseline_x{s}-*.pt`, `edsr_x{s}-*.pt`): `sub_mean`, `add_mean`, `head.0`,
`body.{i}.body.{0,2}`, `body.{R}`, `tail.0.{0,2}`, `tail.1`.
"""

from __future__ import annotations

import torch
from torch import nn

from odm_sr.models.base import SRModel

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean, subtracted at the input, added back at the output


def default_conv(in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> nn.Conv2d:
    """'Same'-padded conv, as `common.default_conv`."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


class MeanShift(nn.Conv2d):
    """Fixed 1x1 conv that adds sign * rgb_range * mean / std per channel (weights frozen).

    `common.MeanShift`: weight = I / std, bias = sign * rgb_range * mean / std; sign -1 subtracts.
    """

    def __init__(self, rgb_range: float, rgb_mean: tuple[float, ...] = RGB_MEAN,
                 rgb_std: tuple[float, ...] = (1.0, 1.0, 1.0), sign: int = -1) -> None:
        super().__init__(3, 3, kernel_size=1)
        std = torch.tensor(rgb_std)
        self.weight.data = torch.eye(3).view(3, 3, 1, 1) / std.view(3, 1, 1, 1)
        self.bias.data = sign * rgb_range * torch.tensor(rgb_mean) / std
        for parameter in self.parameters():
            parameter.requires_grad = False


class ResBlock(nn.Module):
    """x + res_scale * conv(relu(conv(x))); `body.0` is conv1, `body.2` is conv2 (no BN)."""

    def __init__(self, n_feats: int, kernel_size: int = 3, res_scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(default_conv(n_feats, n_feats, kernel_size), nn.ReLU(True),
                                  default_conv(n_feats, n_feats, kernel_size))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mul(self.res_scale) + x


def pixelshuffle_upsampler(scale: int, num_feat: int) -> nn.Sequential:
    """`common.Upsampler` (no BN, no act; SwinIR/HAT's `Upsample` is the same): [conv F->4F, PS2] x log2(scale),
    or conv F->9F, PS3 for x3."""
    if scale == 3:
        return nn.Sequential(default_conv(num_feat, 9 * num_feat), nn.PixelShuffle(3))
    if scale not in (2, 4, 8):
        raise ValueError(f"scale {scale} is not supported; allowed: 2, 3, 4, 8")
    layers: list[nn.Module] = []
    for _ in range(scale.bit_length() - 1):
        layers += [default_conv(num_feat, 4 * num_feat), nn.PixelShuffle(2)]
    return nn.Sequential(*layers)


class EDSR(SRModel):
    """EDSR; input and output in [0, rgb_range] (`pixel_range` 255.0 by default).

    forward: sub_mean, head, x + body(x) (body ends with a conv), tail (upsampler, conv F->3), add_mean.
    """

    def __init__(self, scale: int, n_resblocks: int = 16, n_feats: int = 64, res_scale: float = 1.0,
                 rgb_range: float = 255.0, name: str = "edsr") -> None:
        super().__init__()
        self.name, self.scale, self.pixel_range = name, scale, float(rgb_range)
        self.sub_mean = MeanShift(rgb_range)
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(default_conv(3, n_feats))
        self.body = nn.Sequential(*[ResBlock(n_feats, res_scale=res_scale) for _ in range(n_resblocks)],
                                  default_conv(n_feats, n_feats))
        self.tail = nn.Sequential(pixelshuffle_upsampler(scale, n_feats), default_conv(n_feats, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        x = self.body(x) + x
        return self.add_mean(self.tail(x))
