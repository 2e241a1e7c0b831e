"""SRResNet (Ledig et al., CVPR 2017) as the SR quantization literature uses it: the DAQ release's.

Source: `Cheeun/DAQ-pytorch@28c56e4` `src/model/srresnet.py` and `src/model/common_srresnet.py` (its README gives
FP ×4 Set5/Set14/B100/Urban100 32.07/28.50/27.52/25.86). Module names match that release, so its state_dicts
load with ``strict=True``:

- `head.0`: conv 9×9, 3 → F, no bias; `head.1`: PReLU (one slope);
- `body.{i}`: ResBlock, x + bn2(conv2(act(bn1(conv1(x))))) (convs 3×3 without bias, `act` a ReLU as the release
  passes it, BN after each conv);
- `body.{R}`: conv 3×3 without bias, `body.{R+1}`: BN; a global skip from the head output;
- `tail.0`: upsampler, [conv F → 4F (no bias), PixelShuffle(2), PReLU] per factor 2 (`tail.0.{0,2,3,5}` at ×4);
  `tail.1`: conv 9×9, F → 3, no bias;
- `sub_mean`, `add_mean`: MeanShift modules the release builds (so its files hold them) but never calls: the
  network works on raw [0, 255] pixels (`rgb_range` 255, the release's default; no SRResNet script overrides it).

The release hard-codes ×4 in its upsampler; ×2 (one stage) and ×3 (conv F → 9F, PixelShuffle(3), PReLU) follow
the same pattern (our extension). Conv weights are initialised N(0, 2/(k²·C_out)), biases (none) 0, as released.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from odm_sr.models.base import SRModel
from odm_sr.models.edsr import MeanShift, default_conv


class ResBlock(nn.Module):
    """x + bn2(conv2(act(bn1(conv1(x))))) (`common_srresnet.ResBlock`, res_scale unused as released)."""

    def __init__(self, n_feats: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv1 = default_conv(n_feats, n_feats, kernel_size, bias=False)
        self.bn1 = nn.BatchNorm2d(n_feats)
        self.act = nn.ReLU(True)
        self.conv2 = default_conv(n_feats, n_feats, kernel_size, bias=False)
        self.bn2 = nn.BatchNorm2d(n_feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))) + x


def srresnet_upsampler(scale: int, n_feats: int) -> nn.Sequential:
    """[conv F→4F, PS2, PReLU] × log2(scale), or conv F→9F, PS3, PReLU at ×3 (convs without bias)."""
    if scale == 3:
        return nn.Sequential(default_conv(n_feats, 9 * n_feats, bias=False), nn.PixelShuffle(3), nn.PReLU())
    if scale not in (2, 4):
        raise ValueError(f"scale {scale} is not supported by SRResNet; allowed: 2, 3, 4")
    layers: list[nn.Module] = []
    for _ in range(scale.bit_length() - 1):
        layers += [default_conv(n_feats, 4 * n_feats, bias=False), nn.PixelShuffle(2), nn.PReLU()]
    return nn.Sequential(*layers)


class SRResNet(SRModel):
    """SRResNet; input and output in [0, rgb_range] (``pixel_range`` 255 by default, no mean shift in forward)."""

    def __init__(self, scale: int, n_resblocks: int = 16, n_feats: int = 64, rgb_range: float = 255.0,
                 name: str = "srresnet") -> None:
        super().__init__()
        self.name, self.scale, self.pixel_range = name, scale, float(rgb_range)
        self.sub_mean = MeanShift(rgb_range)  # built but unused, as released (the checkpoints hold it)
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(default_conv(3, n_feats, 9, bias=False), nn.PReLU())
        self.body = nn.Sequential(*[ResBlock(n_feats) for _ in range(n_resblocks)],
                                  default_conv(n_feats, n_feats, bias=False), nn.BatchNorm2d(n_feats))
        self.tail = nn.Sequential(srresnet_upsampler(scale, n_feats), default_conv(n_feats, 3, 9, bias=False))
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not isinstance(m, MeanShift):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x)
        return self.tail(self.body(x) + x)
