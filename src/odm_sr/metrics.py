"""PSNR and SSIM with the MATLAB convention used for every reported number (METHODS.md §1.3).

Pipeline: model output -> ``to_uint8`` (scale to 0-255, round, clamp, cast) -> Y channel as MATLAB
``rgb2ycbcr`` (float64, not rounded) -> crop ``border`` (= scale) pixels on each side -> per-image PSNR
and SSIM -> mean over the images of a set (``SRMetrics``, a ``torchmetrics.Metric``: sums and a count,
summed over DDP ranks by torchmetrics itself).

Images are channel-first, (C, H, W) with C in {1, 3} (or a batch of one, (1, C, H, W)), uint8, as torch
tensors or NumPy arrays.
Single-channel (grayscale) ground truth, e.g. Set14 ``img_003`` (bridge), is compared on its one channel
without the Y transform, as the MATLAB scripts (``if size(im, 3) == 3``) and BasicSR do. The model sees
such an image replicated to 3 channels; its 3-channel output is reduced to one channel by the rounded
mean of its three channels (``round((R + G + B) / 3)``), so a perfect replicated output scores like the
gray truth. ``gray="rgb"`` instead replicates the gray truth to RGB and compares Y, as test scripts that read every
image as colour do (IMDN's ``test_IMDN.py``, PAN's published numbers): ``SRModel.official_gray_mode``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "to_uint8",
    "rgb_to_y",
    "psnr",
    "ssim",
    "GRAY_MODES",
    "evaluate_pair",
    "check_eval_size",
    "psnr_tensor",
    "ssim_tensor",
    "SRMetrics",
]

ArrayLike = Tensor | np.ndarray

# MATLAB rgb2ycbcr, BT.601: Y = 16 + (65.481 R + 128.553 G + 24.966 B) with R, G, B in [0, 1].
_Y_COEFFS = (65.481, 128.553, 24.966)

# Wang et al. ssim_index.m defaults.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K = (0.01, 0.03)
SSIM_L = 255.0


def to_uint8(x: ArrayLike, pixel_range: float = 1.0) -> Tensor:
    """Map an image in [0, pixel_range] to uint8: x * 255 / pixel_range, rounded, clamped to [0, 255].

    ``pixel_range`` is 1 for SwinIR/HAT outputs and 255 for EDSR/RDN (METHODS.md §1.1). Rounding is
    torch's round-half-to-even (as BasicSR and EDSR-PyTorch do). Keeps the device.
    """
    x = torch.as_tensor(x)
    x = x.detach().to(torch.float64) * (255.0 / pixel_range)
    return x.round().clamp(0.0, 255.0).to(torch.uint8)


def _as_uint8_tensor(img: ArrayLike, what: str, device: torch.device | None = None) -> Tensor:
    t = torch.as_tensor(img, device=device)
    if t.dtype != torch.uint8:
        raise TypeError(f"{what} must be uint8 (apply to_uint8 first), got {t.dtype}")
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]  # a batch of one, as the evaluation loaders give
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"{what} must have shape (C, H, W) with C in {{1, 3}}, got {tuple(t.shape)}")
    return t.detach()


def rgb_to_y(img_uint8: ArrayLike) -> Tensor:
    """MATLAB ``rgb2ycbcr`` luma of a uint8 RGB image (..., 3, H, W), as float64 in [16, 235], unrounded.

    Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 with R, G, B the uint8 values.
    """
    x = torch.as_tensor(img_uint8)
    if x.dtype != torch.uint8:
        raise TypeError(f"rgb_to_y expects uint8, got {x.dtype}")
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"rgb_to_y expects shape (..., 3, H, W), got {tuple(x.shape)}")
    x = x.to(torch.float64)
    r, g, b = x.unbind(dim=-3)
    return 16.0 + (_Y_COEFFS[0] * r + _Y_COEFFS[1] * g + _Y_COEFFS[2] * b) / 255.0


GRAY_MODES = ("channel", "rgb")  # a gray truth: on its one channel (MATLAB), or replicated to RGB, then Y


def _compare_channels(sr: ArrayLike, hr: ArrayLike, border: int, gray: str = "channel") -> tuple[Tensor, Tensor]:
    """The two float64 (H, W) planes that PSNR/SSIM compare: Y, or the single gray channel (``gray="rgb"``: Y of
    the gray truth replicated to RGB); on ``sr``'s device (a GPU output is not copied to the CPU: ``hr`` moves
    instead), where the metrics are then computed."""
    if gray not in GRAY_MODES:
        raise ValueError(f"gray={gray!r}: expected one of {GRAY_MODES}")
    sr_t = _as_uint8_tensor(sr, "sr")
    hr_t = _as_uint8_tensor(hr, "hr", sr_t.device)
    if gray == "rgb" and hr_t.shape[0] == 1:
        hr_t = hr_t.expand(3, -1, -1)
    if sr_t.shape[-2:] != hr_t.shape[-2:]:
        raise ValueError(f"sr and hr sizes differ: {tuple(sr_t.shape)} vs {tuple(hr_t.shape)}")
    if hr_t.shape[0] == 3:
        if sr_t.shape[0] != 3:
            raise ValueError("hr is RGB but sr has 1 channel")
        sr_p, hr_p = rgb_to_y(sr_t), rgb_to_y(hr_t)
    else:
        hr_p = hr_t[0].to(torch.float64)
        if sr_t.shape[0] == 3:
            # Rounded channel mean; sums of three uint8 never hit .5 after /3, so ties cannot occur.
            sr_p = torch.round(sr_t.to(torch.float64).mean(dim=0))
        else:
            sr_p = sr_t[0].to(torch.float64)
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    if border > 0:
        if 2 * border >= hr_p.shape[0] or 2 * border >= hr_p.shape[1]:
            raise ValueError(f"border {border} removes the whole {tuple(hr_p.shape)} image")
        sr_p = sr_p[border:-border, border:-border]
        hr_p = hr_p[border:-border, border:-border]
    return sr_p, hr_p


def psnr_tensor(sr: ArrayLike, hr: ArrayLike, border: int, gray: str = "channel") -> Tensor:
    """``psnr`` as a float64 0-d tensor on ``sr``'s device (no host sync); ``inf`` for identical images."""
    sr_p, hr_p = _compare_channels(sr, hr, border, gray)
    mse = torch.mean((sr_p - hr_p) ** 2)
    return 10.0 * torch.log10(255.0**2 / mse)


def psnr(sr: ArrayLike, hr: ArrayLike, border: int, gray: str = "channel") -> float:
    """Y-channel PSNR of one uint8 (C, H, W) image pair: 10 log10(255^2 / MSE) after cropping ``border``.

    Returns ``inf`` for identical images.
    """
    return psnr_tensor(sr, hr, border, gray).item()


def _gaussian_window_1d() -> Tensor:
    """fspecial('gaussian', 11, 1.5) is the outer product of this normalised 1-D Gaussian."""
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * SSIM_SIGMA**2))
    return g / g.sum()


def _filter_valid(planes: Tensor) -> Tensor:
    """filter2(window, x, 'valid') for a stack (B, H, W): the separable Gaussian, no padding.

    Shifted in-place adds over the 11 taps: faster on CPU than a float64 conv2d, and exact.
    """
    taps = _gaussian_window_1d().tolist()
    b, h, w = planes.shape
    n = SSIM_WINDOW - 1
    rows = torch.zeros(b, h - n, w, dtype=planes.dtype, device=planes.device)
    for k, g in enumerate(taps):
        rows.add_(planes[:, k : k + h - n, :], alpha=g)
    out = torch.zeros(b, h - n, w - n, dtype=planes.dtype, device=planes.device)
    for k, g in enumerate(taps):
        out.add_(rows[:, :, k : k + w - n], alpha=g)
    return out


def ssim_tensor(sr: ArrayLike, hr: ArrayLike, border: int, gray: str = "channel") -> Tensor:
    """Y-channel SSIM of one uint8 (C, H, W) pair, Wang et al.'s ``ssim_index.m`` after cropping ``border``.

    Gaussian 11x11 window (sigma 1.5), C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = 255, statistics
    computed on the valid region only (no padding, output (H-10) x (W-10)), then the mean of the map (a float64
    0-d tensor on ``sr``'s device):

        SSIM = mean[(2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))]
    """
    x, y = _compare_channels(sr, hr, border, gray)
    if min(x.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(x.shape)}")
    c1 = (SSIM_K[0] * SSIM_L) ** 2
    c2 = (SSIM_K[1] * SSIM_L) ** 2
    stack = torch.stack([x, y, x * x, y * y, x * y])
    mu_x, mu_y, e_xx, e_yy, e_xy = _filter_valid(stack).unbind(0)
    sigma_x2 = e_xx - mu_x * mu_x
    sigma_y2 = e_yy - mu_y * mu_y
    sigma_xy = e_xy - mu_x * mu_y
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * sigma_xy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (sigma_x2 + sigma_y2 + c2)
    return torch.mean(num / den)


def ssim(sr: ArrayLike, hr: ArrayLike, border: int, gray: str = "channel") -> float:
    """``ssim_tensor`` as a float."""
    return ssim_tensor(sr, hr, border, gray).item()


def evaluate_pair(sr_uint8: ArrayLike, hr_uint8: ArrayLike, scale: int, gray: str = "channel") -> tuple[float, float]:
    """(PSNR, SSIM) of one uint8 (C, H, W) pair with the border = ``scale`` convention."""
    return psnr(sr_uint8, hr_uint8, scale, gray), ssim(sr_uint8, hr_uint8, scale, gray)


def check_eval_size(hr_size: tuple[int, int], scale: int, name: str) -> None:
    """Raise naming ``name`` if an (H, W) ground truth is too small to score at ``scale``: the metrics crop
    ``scale`` pixels on each side, and SSIM's window then needs ``SSIM_WINDOW`` pixels each way."""
    need = SSIM_WINDOW + 2 * scale
    if min(hr_size) < need:
        raise ValueError(f"{name}: the {hr_size[0]}x{hr_size[1]} ground truth is too small to score at x{scale}: "
                         f"PSNR/SSIM crop {scale} pixels on each side and SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window "
                         f"needs the rest, so each image must be at least {need}x{need} (LR "
                         f"{-(-need // scale)}x{-(-need // scale)}); drop it from its set")


class SRMetrics(Metric):
    """Mean per-image PSNR and SSIM of one set (never a pooled MSE), as sums and a count.

    ``gray``: how a gray truth is compared (``GRAY_MODES``).
    ``update(sr_uint8, hr_uint8, weight)`` adds one image pair, (C, H, W) or (1, C, H, W), or a batch
    (N, C, H, W) of equal-sized pairs; ``weight`` (0 or 1, a number or one per image) counts it or not, so a
    rank can leave out the padding images of DDP's sampler (``evaluation.owned_weights``). ``compute()`` is the
    float64 tensor ``[psnr, ssim, count]`` (psnr/ssim are nan when nothing was counted). The states are sums
    (``dist_reduce_fx="sum"``): under DDP ``compute`` sums them over the ranks by itself. Everything stays on
    the metric's device (move it with ``.to(device)``), so updates cost no host sync.

    >>> m = SRMetrics(scale=2)
    >>> hr = torch.full((3, 24, 24), 100, dtype=torch.uint8)
    >>> m.update(hr, hr); m.update(hr.flip(-1), hr, weight=0)
    >>> m.compute().tolist()
    [inf, 1.0, 1.0]
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    psnr_sum: Tensor
    ssim_sum: Tensor
    count: Tensor

    def __init__(self, scale: int, gray: str = "channel", **kwargs) -> None:
        super().__init__(**kwargs)
        if gray not in GRAY_MODES:
            raise ValueError(f"gray={gray!r}: expected one of {GRAY_MODES}")
        self.scale, self.gray = int(scale), gray
        for name in ("psnr_sum", "ssim_sum", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, sr_uint8: ArrayLike, hr_uint8: ArrayLike, weight: float | Tensor = 1.0) -> None:
        sr_t, hr_t = torch.as_tensor(sr_uint8), torch.as_tensor(hr_uint8)
        if sr_t.dim() == 3:
            sr_t, hr_t = sr_t[None], hr_t[None] if hr_t.dim() == 3 else hr_t
        weights = torch.as_tensor(weight, dtype=torch.float64, device=self.count.device).expand(sr_t.shape[0])
        for i in range(sr_t.shape[0]):
            p = psnr_tensor(sr_t[i].to(self.count.device), hr_t[i], self.scale, self.gray)
            s = ssim_tensor(sr_t[i].to(self.count.device), hr_t[i], self.scale, self.gray)
            w = weights[i]
            # where, not p * w: an uncounted identical pair (inf PSNR) must add 0, not nan
            self.psnr_sum += torch.where(w > 0, p * w, torch.zeros_like(p))
            self.ssim_sum += s * w
            self.count += w

    def compute(self) -> Tensor:
        return torch.stack([self.psnr_sum / self.count, self.ssim_sum / self.count, self.count])
