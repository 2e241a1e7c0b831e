"""The float tail of an upsampling network as one convolution, in the exported graph (``compose_tail``).

EDSR's tail (``[conv F → 4F, PixelShuffle 2] × 2``, conv F → 3, ``add_mean``) and RDN's ``UPNet`` have no
activation: the whole tail is one affine map of the body's output, a conv from F channels to 3·s² channels on the
LR grid followed by one pixel shuffle by s. At x4 its kernel is 5×5, and EDSR-baseline's tail costs 64·48·25 MACs
per LR pixel instead of 64·256·9 + 4·64·256·9 + 16·64·3·9 (10x fewer): the float32 tail was about half of
the time of the FP graph and of the exact integer graph in ONNX Runtime (bench/README.md "Speed").

- The kernel and bias are the tail's responses to unit impulses, computed in float64 (exact to a float64
  round-off), rounded to float32 once.
- Borders: the layers of the tail zero-pad their own inputs at every resolution, which one conv on the LR grid
  cannot do. The outputs of the outermost ``band`` LR rows/columns are taken from the sequential tail run on
  strips of ``band + radius`` LR rows/columns along each side (the same float32 ops as the network's own tail);
  everything else from the composed conv. ``band`` and ``radius`` are measured from the tail itself.
- Only the graph changes: the integer model's PyTorch forward (``odm-sr-eval eval.exact=true``) keeps the
  sequential tail. The two float32 sums differ in their last bits; rounded to grey levels on B100 x4 (trained
  mini EDSR ODM W2A2) the composed ORT tail and the sequential PyTorch one differ on 1.5e-5 of the pixels, as
  ORT's own sequential tail does (1.4e-5): the exactness bar of the integer graph is unchanged.
- Inputs must have at least ``2·band`` LR rows and columns: 2 for EDSR and RDN (``TAIL_MIN_SIDE``; a tail with
  a wider band is refused).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from odm_sr.quant.backbones import backbone_of

TAIL_MIN_SIDE = 2  # the smallest LR side a composed tail takes: 2·band, band 1 (EDSR, RDN at x2, x3, x4)


def _composable(modules: list[nn.Module]) -> bool:
    """Only float convs (stride 1, no dilation or groups, 'same' padding) and pixel shuffles."""
    leaves = [m for top in modules for m in top.modules() if not isinstance(m, nn.Sequential)]
    for m in leaves:
        if isinstance(m, (nn.PixelShuffle, nn.Identity)):
            continue
        if not isinstance(m, nn.Conv2d) or type(m).forward is not nn.Conv2d.forward:
            return False
        k = m.kernel_size
        if m.stride != (1, 1) or m.dilation != (1, 1) or m.groups != 1 or m.padding_mode != "zeros" \
                or m.padding != (k[0] // 2, k[1] // 2) or k[0] % 2 == 0 or k[1] % 2 == 0:
            return False
    return bool(leaves)


class ComposedTail(nn.Module):
    """``nn.Sequential(*tail)`` as one conv + pixel shuffle, borders from the sequential tail on strips (module
    docstring)."""

    def __init__(self, tail: list[nn.Module], scale: int, channels: int) -> None:
        super().__init__()
        self.tail, self.scale = nn.Sequential(*copy.deepcopy(tail)).eval(), int(scale)
        n_convs = sum(isinstance(m, nn.Conv2d) for m in self.tail.modules())
        size = 4 * n_convs + 5  # LR window: impulse responses stay clear of its border effects
        weight, bias, self.radius = self._kernel(channels, size)
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())
        self.band = self._band(channels, size, weight, bias)
        if 2 * self.band > TAIL_MIN_SIDE:
            raise ValueError(f"a composed tail with a border band of {self.band} LR pixels needs inputs of at least "
                             f"{2 * self.band} pixels (TAIL_MIN_SIDE is {TAIL_MIN_SIDE})")
        self.strip = self.band + self.radius

    def _sequential64(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return copy.deepcopy(self.tail).double()(x)

    def _kernel(self, channels: int, size: int) -> tuple[Tensor, Tensor, int]:
        s, c = self.scale, size // 2
        x = torch.zeros(channels + 1, channels, size, size, dtype=torch.float64)
        x[torch.arange(channels), torch.arange(channels), c, c] = 1.0
        y = self._sequential64(x)
        zero, response = y[channels], y[:channels] - y[channels]  # the bias; the linear part per input channel
        out = y.shape[1]
        r = c - 1  # the largest radius measurable in the window
        kernel = torch.zeros(out, s, s, channels, 2 * r + 1, 2 * r + 1, dtype=torch.float64)
        for u in range(2 * r + 1):  # output at LR (c − u + r) sees the impulse at kernel tap u
            for v in range(2 * r + 1):
                i, j = c - (u - r), c - (v - r)
                kernel[..., u, v] = response[:, :, s * i:s * i + s, s * j:s * j + s].permute(1, 2, 3, 0)
        kernel = kernel.reshape(out * s * s, channels, 2 * r + 1, 2 * r + 1)
        taps = torch.nonzero(kernel.abs().amax(dim=(0, 1)) > 0)
        radius = int((taps - r).abs().max()) if len(taps) else 0
        if radius >= r:
            raise ValueError(f"tail kernel radius {radius} reaches the {size}x{size} window")
        kernel = kernel[:, :, r - radius:r + radius + 1, r - radius:r + radius + 1].contiguous()
        return kernel, zero[:, s * c:s * c + s, s * c:s * c + s].reshape(-1), radius

    def _band(self, channels: int, size: int, weight: Tensor, bias: Tensor) -> int:
        """LR rows/columns along each border where the composed conv and the sequential tail differ."""
        x = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        diff = (self._sequential64(x) - F.pixel_shuffle(F.conv2d(x, weight, bias, padding=self.radius),
                                                        self.scale)).abs()
        bad = (diff.amax(dim=(0, 1)) > 1e-9 * (1 + float(diff.abs().max()))).nonzero()
        if not len(bad):
            return 0
        s, edge = self.scale, size * self.scale - 1
        return int(torch.minimum(bad, edge - bad).amin(dim=1).max()) // s + 1

    def forward(self, x: Tensor) -> Tensor:
        y = F.pixel_shuffle(F.conv2d(x, self.weight, self.bias, padding=self.radius), self.scale)
        if not self.band:
            return y
        b, k = self.band * self.scale, self.strip
        top, bottom = self.tail(x[:, :, :k])[:, :, :b], self.tail(x[:, :, -k:])[:, :, -b:]
        left, right = self.tail(x[:, :, :, :k])[..., b:-b, :b], self.tail(x[:, :, :, -k:])[..., b:-b, -b:]
        middle = torch.cat([left, y[..., b:-b, b:-b], right], dim=3)
        return torch.cat([top, middle, bottom], dim=2)


def tail_modules(model: nn.Module) -> list[str]:
    """Names of the modules that end ``model``'s forward and can be composed (``Backbone.affine_tail``); []
    where the family declares none or the modules are not float convs and pixel shuffles (ODM-FQ's integer
    tail)."""
    names = list(backbone_of(model).affine_tail)
    if not names or not _composable([getattr(model, n) for n in names]):
        return []
    return names


def compose_tail(model: nn.Module) -> nn.Module:
    """``model`` (not copied) with its affine tail replaced by a ``ComposedTail``; unchanged where it has none."""
    names = tail_modules(model)
    if not names:
        return model
    modules = [getattr(model, n) for n in names]
    first = next(m for m in modules[0].modules() if isinstance(m, nn.Conv2d))
    composed = ComposedTail(modules, int(model.scale), first.in_channels)
    setattr(model, names[0], composed)
    for name in names[1:]:
        setattr(model, name, nn.Identity())
    return model
