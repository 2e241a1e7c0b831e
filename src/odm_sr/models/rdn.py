"""RDN (Zhang et al., CVPR 2018), as in `sanghyun-son/EDSR-PyTorch` `src/model/rdn.py`.

Module names match that file (and DDTB's RDN checkpoints): `SFENet1`, `SFENet2`,
`RDBs.{i}.convs.{c}.conv.0`, `RDBs.{i}.LFF`, `GFF.{0,1}`, `UPNet.{0,2[,4]}`. No mean shift: the
network works directly on [0, 255].
"""

from __future__ import annotations

import torch
from torch import nn

from odm_sr.models.base import SRModel

RDN_CONFIGS = {"A": (20, 6, 32), "B": (16, 8, 64)}  # (D blocks, C convs per block, G growth rate)


def same_conv(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2, stride=1)


class RDB_Conv(nn.Module):  # noqa: N801 - official class name
    """One dense layer: cat(x, relu(conv3x3(x)))."""

    def __init__(self, in_channels: int, grow_rate: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Sequential(same_conv(in_channels, grow_rate, kernel_size), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.conv(x)), 1)


class RDB(nn.Module):
    """Residual dense block: x + LFF(dense layers(x)), LFF a 1x1 conv (G0 + C*G -> G0)."""

    def __init__(self, grow_rate0: int, grow_rate: int, n_conv_layers: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[RDB_Conv(grow_rate0 + c * grow_rate, grow_rate, kernel_size)
                                     for c in range(n_conv_layers)])
        self.LFF = nn.Conv2d(grow_rate0 + n_conv_layers * grow_rate, grow_rate0, 1, padding=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LFF(self.convs(x)) + x


def upsampling_net(scale: int, grow_rate0: int, grow_rate: int, kernel_size: int = 3) -> nn.Sequential:
    """x2/x3: conv G0 -> G*r^2, PS(r), conv G -> 3; x4: [conv -> 4G, PS2] x 2, conv G -> 3."""
    if scale in (2, 3):
        return nn.Sequential(same_conv(grow_rate0, grow_rate * scale ** 2, kernel_size),
                             nn.PixelShuffle(scale), same_conv(grow_rate, 3, kernel_size))
    if scale == 4:
        return nn.Sequential(same_conv(grow_rate0, grow_rate * 4, kernel_size), nn.PixelShuffle(2),
                             same_conv(grow_rate, grow_rate * 4, kernel_size), nn.PixelShuffle(2),
                             same_conv(grow_rate, 3, kernel_size))
    raise ValueError(f"scale {scale} is not supported; allowed: 2, 3, 4")


class RDN(SRModel):
    """RDN; input and output in [0, 255] (`pixel_range` 255.0).

    forward: f1 = SFENet1(x); D RDBs on SFENet2(f1); GFF(cat of all RDB outputs) + f1; UPNet.
    `config` ('A' or 'B') sets (D, C, G); explicit D, C, G override it (e.g. tiny test models).
    """

    def __init__(self, scale: int, config: str = "B", G0: int = 64, D: int | None = None,  # noqa: N803
                 C: int | None = None, G: int | None = None, kernel_size: int = 3,  # noqa: N803
                 name: str = "rdn") -> None:
        super().__init__()
        if config not in RDN_CONFIGS:
            raise ValueError(f"RDN config {config!r} is not supported; allowed: {sorted(RDN_CONFIGS)}")
        self.name, self.scale, self.pixel_range = name, scale, 255.0
        default_d, default_c, default_g = RDN_CONFIGS[config]
        self.D = D or default_d
        n_conv_layers, grow_rate = C or default_c, G or default_g
        self.SFENet1 = same_conv(3, G0, kernel_size)
        self.SFENet2 = same_conv(G0, G0, kernel_size)
        self.RDBs = nn.ModuleList([RDB(G0, grow_rate, n_conv_layers, kernel_size) for _ in range(self.D)])
        self.GFF = nn.Sequential(nn.Conv2d(self.D * G0, G0, 1, padding=0, stride=1),
                                 same_conv(G0, G0, kernel_size))
        self.UPNet = upsampling_net(scale, G0, grow_rate, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shallow = self.SFENet1(x)
        x = self.SFENet2(shallow)
        block_outputs = []
        for block in self.RDBs:
            x = block(x)
            block_outputs.append(x)
        x = self.GFF(torch.cat(block_outputs, 1)) + shallow
        return self.UPNet(x)
