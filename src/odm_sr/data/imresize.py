"""MATLAB-faithful bicubic ``imresize`` in torch (METHODS.md §1.4).

MATLAB ``imresize(img, scale, 'bicubic')`` with antialiasing on (the default):

* cubic kernel with a = -0.5 (Keys 1981):
  k(x) = 1.5|x|^3 - 2.5|x|^2 + 1 for |x| <= 1, -0.5|x|^3 + 2.5|x|^2 - 4|x| + 2 for 1 < |x| <= 2, else 0;
* downscaling (s < 1) widens the kernel: h(x) = s * k(s * x), support 4/s (antialias);
* output pixel u (1-based) maps to the input coordinate x = u/s + 0.5 * (1 - 1/s);
* taps are the integers floor(x - width/2) + 0 .. ceil(width) + 1; weights are normalised to sum 1;
* taps outside the image use symmetric padding (the edge pixel repeated: ... 2 1 | 1 2 3 ... n | n n-1 ...);
* separable: one 1-D pass per spatial axis, the axis with the smaller scale first (MATLAB's
  ``imresize.m``; rows first on ties). For float input without intermediate rounding the two
  passes commute, so the order only changes float round-off;
* output size ceil(in * s).

Like MATLAB, the result type follows the input type:

* float input -> float output, no rounding or clamping (what the brief and §1.4 call "no rounding");
* uint8 input -> uint8 output, computed in float64 and rounded (half away from zero) and clamped to
  [0, 255] after *each* 1-D pass, as MATLAB's mex does for uint8 images. The benchmark LR files were
  made this way: rounding only the final float result differs from them by ~0.13 grey levels on
  average, rounding each pass by ~0.02 (see tests/data/test_imresize.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["cubic_kernel", "resize_weights", "resize_matrix", "imresize"]


def cubic_kernel(x: Tensor) -> Tensor:
    """Keys cubic convolution kernel with a = -0.5 (MATLAB ``cubic``)."""
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def resize_weights(in_len: int, out_len: int, scale: float) -> tuple[Tensor, Tensor]:
    """Per-output-pixel taps of a 1-D MATLAB bicubic resize, as float64 weights and int64 indices.

    Returns ``(weights, indices)``, both of shape (out_len, taps): output pixel o is
    ``sum_t weights[o, t] * input[indices[o, t]]``. Indices are already mirrored into [0, in_len).
    """
    antialias = scale < 1
    kernel_width = 4.0 / scale if antialias else 4.0
    u = torch.arange(1, out_len + 1, dtype=torch.float64)
    x = u / scale + 0.5 * (1.0 - 1.0 / scale)
    left = torch.floor(x - kernel_width / 2.0)
    taps = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]
    dist = x[:, None] - idx
    weights = scale * cubic_kernel(dist * scale) if antialias else cubic_kernel(dist)
    weights = weights / weights.sum(dim=1, keepdim=True)
    # Drop tap columns that are zero for every output pixel (MATLAB does the same).
    keep = (weights != 0).any(dim=0)
    weights, idx = weights[:, keep], idx[:, keep].long()
    # Symmetric padding: 1-based index i maps into the period-2n sequence 1..n, n..1.
    mirror = torch.cat([torch.arange(in_len), torch.arange(in_len - 1, -1, -1)])
    idx = mirror[torch.remainder(idx - 1, 2 * in_len)]
    return weights, idx


def resize_matrix(in_len: int, out_len: int, scale: float) -> Tensor:
    """The 1-D resize as a dense (out_len, in_len) float64 matrix; mirrored taps are summed in place."""
    weights, idx = resize_weights(in_len, out_len, scale)
    matrix = torch.zeros(out_len, in_len, dtype=torch.float64)
    return matrix.scatter_add_(1, idx, weights)


def _resize_axis(x: Tensor, axis: int, out_len: int, scale: float, round_uint8: bool) -> Tensor:
    """One 1-D pass along H (axis 0) or W (axis 1) of a (..., H, W) tensor, as one matmul."""
    in_len = x.shape[-2] if axis == 0 else x.shape[-1]
    matrix = resize_matrix(in_len, out_len, scale).to(device=x.device, dtype=x.dtype)
    # A dense matmul is banded work done densely, but BLAS makes it faster than a gather over taps
    # for the image sizes used here (e.g. 2 ms for 320x480), and it batches over leading dims.
    out = torch.matmul(matrix, x) if axis == 0 else torch.matmul(x, matrix.T)
    if round_uint8:
        out = torch.floor(out + 0.5).clamp_(0.0, 255.0)  # MATLAB rounds half away from zero
    return out


def _output_size(in_len: int, scale: float) -> int:
    # Tolerate float error in in_len * scale (e.g. 321 * (1/3)) before MATLAB's ceil.
    return int(math.ceil(round(in_len * scale, 9)))


def imresize(x: Tensor, scale: float | None = None, out_hw: tuple[int, int] | None = None) -> Tensor:
    """MATLAB-style bicubic resize of a tensor of shape (..., H, W), e.g. (C,H,W) or (N,C,H,W).

    Give ``scale`` (e.g. 1/4 to downscale, 4 to upscale; output size ceil(H*scale) x ceil(W*scale))
    or ``out_hw`` (per-axis scales out/in, as MATLAB does for an explicit output size). A float tensor
    is resized in its own dtype (differentiable, any device, any value range) and not rounded; a uint8
    tensor gives uint8, rounded after each pass like MATLAB's uint8 path.
    """
    is_uint8 = x.dtype == torch.uint8
    if not (is_uint8 or torch.is_floating_point(x)):
        raise TypeError(f"imresize expects a float or uint8 tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"imresize expects a tensor of shape (..., H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if out_hw is not None:
        out_h, out_w = int(out_hw[0]), int(out_hw[1])
        if out_h <= 0 or out_w <= 0:
            raise ValueError(f"out_hw must be positive, got {out_hw}")
        scales = (out_h / h, out_w / w)
    elif scale is not None:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        out_h, out_w = _output_size(h, scale), _output_size(w, scale)
        scales = (float(scale), float(scale))
    else:
        raise ValueError("imresize needs either scale or out_hw")
    sizes = (out_h, out_w)
    order = (0, 1) if scales[0] <= scales[1] else (1, 0)
    out = x.double() if is_uint8 else x
    for axis in order:
        if sizes[axis] == out.shape[-2 + axis] and scales[axis] == 1.0:
            continue  # identity pass
        out = _resize_axis(out, axis, sizes[axis], scales[axis], round_uint8=is_uint8)
    return out.to(torch.uint8) if is_uint8 else out
