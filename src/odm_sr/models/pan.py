"""PAN (Zhao et al., ECCV Workshops 2020, "Efficient Image Super-Resolution Using Pixel Attention").

Architecture of `zhaohengyuan1/PAN` (`codes/models/archs/PAN_arch.py`), with its module names so the official
`PANx{s}_DF2K.pth` load with ``strict=True``: ``conv_first``; ``SCPA_trunk.{i}`` (1×1 ``conv1_a``/``conv1_b`` splitting
into two branches, 3×3 ``k1.0`` on one, ``PAConv`` (1×1 ``k2`` + sigmoid gating the 3×3 ``k3``, then 3×3 ``k4``) on the
other, LeakyReLU(0.2), 1×1 ``conv3`` over both, block residual; no biases inside the block); ``trunk_conv`` with the
residual from ``conv_first``; nearest ×2 (×s at ×2/×3) upsampling, ``upconv1``, pixel attention ``att1.conv`` + sigmoid,
``HRconv1`` (×4: again with ``upconv2``/``att2``/``HRconv2``); ``conv_last``; plus the bilinearly upsampled input.
RGB in [0, 1] in and out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from odm_sr.models.base import SRModel

LRELU_SLOPE = 0.2


class PA(nn.Module):
    """Pixel attention: x · sigmoid(conv1×1(x))."""

    def __init__(self, nf: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(nf, nf, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.conv(x))


class PAConv(nn.Module):
    """k4(k3(x) · sigmoid(k2(x))): 1×1 ``k2`` (with bias) gates the 3×3 ``k3``; 3×3 ``k4``."""

    def __init__(self, nf: int, k_size: int = 3) -> None:
        super().__init__()
        self.k2 = nn.Conv2d(nf, nf, 1)
        self.sigmoid = nn.Sigmoid()
        self.k3 = nn.Conv2d(nf, nf, k_size, padding=(k_size - 1) // 2, bias=False)
        self.k4 = nn.Conv2d(nf, nf, k_size, padding=(k_size - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k4(self.k3(x) * self.sigmoid(self.k2(x)))


class SCPA(nn.Module):
    """Self-calibrated block with pixel attention: two half-width branches (plain 3×3, PAConv), 1×1 fusion, residual."""

    def __init__(self, nf: int, reduction: int = 2) -> None:
        super().__init__()
        width = nf // reduction
        self.conv1_a = nn.Conv2d(nf, width, 1, bias=False)
        self.conv1_b = nn.Conv2d(nf, width, 1, bias=False)
        self.k1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False))
        self.PAConv = PAConv(width)
        self.conv3 = nn.Conv2d(width * reduction, nf, 1, bias=False)
        self.lrelu = nn.LeakyReLU(LRELU_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_a = self.lrelu(self.k1(self.lrelu(self.conv1_a(x))))
        out_b = self.lrelu(self.PAConv(self.lrelu(self.conv1_b(x))))
        return self.conv3(torch.cat([out_a, out_b], dim=1)) + x


class PAN(SRModel):
    """PAN ×``scale``: ``nb`` SCPA blocks of ``nf`` features, ``unf`` in the upsampling; input/output in [0, 1]."""

    def __init__(self, scale: int, in_nc: int = 3, out_nc: int = 3, nf: int = 40, unf: int = 24, nb: int = 16,
                 name: str = "pan") -> None:
        super().__init__()
        self.name, self.scale, self.pixel_range = name, scale, 1.0
        self.official_gray_mode = "rgb"  # the authors' Set14 log matches Y of the gray truth replicated to RGB
        self.conv_first = nn.Conv2d(in_nc, nf, 3, padding=1)
        self.SCPA_trunk = nn.Sequential(*[SCPA(nf) for _ in range(nb)])
        self.trunk_conv = nn.Conv2d(nf, nf, 3, padding=1)
        self.upconv1 = nn.Conv2d(nf, unf, 3, padding=1)
        self.att1 = PA(unf)
        self.HRconv1 = nn.Conv2d(unf, unf, 3, padding=1)
        if scale == 4:
            self.upconv2 = nn.Conv2d(unf, unf, 3, padding=1)
            self.att2 = PA(unf)
            self.HRconv2 = nn.Conv2d(unf, unf, 3, padding=1)
        self.conv_last = nn.Conv2d(unf, out_nc, 3, padding=1)
        self.lrelu = nn.LeakyReLU(LRELU_SLOPE)

    def _up(self, fea: torch.Tensor, factor: int, conv: nn.Conv2d, att: PA, hr_conv: nn.Conv2d) -> torch.Tensor:
        fea = self.lrelu(att(conv(F.interpolate(fea, scale_factor=factor, mode="nearest"))))
        return self.lrelu(hr_conv(fea))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.conv_first(x)
        fea = fea + self.trunk_conv(self.SCPA_trunk(fea))
        if self.scale == 4:
            fea = self._up(fea, 2, self.upconv1, self.att1, self.HRconv1)
            fea = self._up(fea, 2, self.upconv2, self.att2, self.HRconv2)
        else:
            fea = self._up(fea, self.scale, self.upconv1, self.att1, self.HRconv1)
        upsampled = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return self.conv_last(fea) + upsampled
