"""DAQ (Hong et al., WACV 2022): distribution-aware, per-image and per-channel dynamic quantization.

Source: `Cheeun/DAQ-pytorch@28c56e4` `src/model/quantize.py` (`Quantization`, `Conv2d_Q`); METHODS.md §3
(mid-rise) and §4.2. Nothing is learnable; every quantizer uses the identity STE (∂q/∂x = 1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .backbones import apply_placement, backbone_of
from .base import Bits, QuantMethod
from .blocks import ActSite, group_by_image, read_quirks, ungroup
from .functional import straight_through
from .quantizer import Quantizer

# Gaussian-optimal step factors t_b for b = 1..9 bits (`gaussian_steps`, indexed by b − 1 in the release)
GAUSSIAN_STEPS = {1: 2.0, 2: 1.596, 3: 0.996, 4: 0.586, 5: 0.335, 6: 0.188, 7: 0.104, 8: 0.057, 9: 0.031}
# `--finetune`: fixed factors for every bit-width (quirk `finetune_fixed_steps`: EDSR only, training only)
FINETUNE_STEP, FINETUNE_SIGMA_STEP = 1.596, 0.057


def step_factor(bits: int) -> float:
    """t_b from the table; raises for bit-widths outside 1..9."""
    if bits not in GAUSSIAN_STEPS:
        raise ValueError(f"DAQ has step factors for 1..9 bits, got {bits}")
    return GAUSSIAN_STEPS[bits]


def midrise(x: Tensor, step: Tensor, bits: int, clamp: bool = True) -> Tensor:
    """Mid-rise levels (k − ½)·Δ: (Int(x/Δ + ½) − ½)·Δ, clamped to ±(2^(b−1) − ½)Δ; 0 where Δ ≤ 0.

    No gradient handling here: callers wrap the result in the identity STE. Where Δ ≤ 0 the arithmetic runs on
    the smallest normal float instead (finite or ±inf, never NaN) and the result is replaced by 0.
    """
    positive = step > 0
    safe = step.clamp_min(torch.finfo(step.dtype).tiny)
    y = torch.div(x, safe).add_(0.5).round_().sub_(0.5).mul_(safe)
    if not clamp:
        return torch.where(positive, y, 0.0)
    thr = (2 ** (bits - 1) - 0.5) * safe
    return y.clamp_(-thr, thr).mul_(positive)  # finite after the clamp: the mask multiplies


def quantize_sigma(sigma: Tensor, bits: int, factor: float) -> Tensor:
    """Quantize the per-channel σ of each image (``sigma`` (B, C, 1)) at ``bits``: centred on its mean over
    channels, mid-rise with step factor·std over channels (unbiased), clamped to ±(2^(b−1) − ½)·step."""
    mean = sigma.mean(1, keepdim=True)
    step = factor * sigma.std(1, keepdim=True)
    return midrise(sigma - mean, step, bits) + mean


def relu_stats(grouped: Tensor) -> tuple[Tensor, Tensor]:
    """Post-ReLU μ, σ per (image, channel) over the non-zero entries, each sum divided by (count + 1)."""
    count = (grouped > 0).sum(2, keepdim=True) + 1
    mu = grouped.sum(2, keepdim=True) / count
    second = grouped.pow(2).sum(2, keepdim=True) / count
    return mu, (second - mu.pow(2)).clamp_min(0).sqrt()


class DaqActQuantizer(Quantizer):
    """Per-image, per-channel activation quantizer with detached runtime μ_c, σ_c and Δ_c = t_b·σ_c.

    - Post-ReLU input (tensor minimum == 0, decided on the first forward: whether a layer's input comes out of
      a ReLU is the architecture's, and a per-call test would be a host sync per layer and step):
      x → Int(x/Δ)·Δ on {0, Δ, …, (2^b − 1)Δ} (the upper clamp is
      dropped under ``unbounded``), with μ, σ from :func:`relu_stats`.
    - Otherwise: μ_c + midrise(x − μ_c) clamped to ±(2^(b−1) − ½)Δ, with μ_c and σ_c (unbiased std) over the
      image's positions (all tokens of all windows for transformer layers).
    - σ is quantized per image at ``sigma_bits`` (32: not quantized). A channel whose Δ is 0 outputs 0 after
      ReLU and μ_c in the signed branch (as released). Quantized σ can be < 0 (a dead channel whose σ_c = 0 lies
      below the image's mean σ): by default such a channel outputs 0 / μ_c too; under ``nonpositive_offset``
      (quirk ``nonpositive_sigma_offset``) it outputs what the release does with its negative step, whose
      rounding term the factor 1[Δ > 0] zeroes: thr = (2^(b−1) − ½)·Δ after ReLU (a negative constant) and,
      after the ±thr clamp, μ_c + |thr| in the signed branch (`quantize.py`, both branches of
      ``Quantization.forward``).
    - ``fixed_steps`` (quirk ``finetune_fixed_steps``): the release's ``--finetune`` factors 1.596 / 0.057 in
      training mode only; in eval mode t_b / t_qq, as the released test scripts (which omit the flag).
    """

    def __init__(self, bits: int, site: ActSite, sigma_bits: int = 32, unbounded: bool = False,
                 fixed_steps: bool = False, nonpositive_offset: bool = False) -> None:
        super().__init__()
        self.bits, self.site, self.sigma_bits, self.unbounded = bits, site, sigma_bits, unbounded
        self.fixed_steps, self.nonpositive_offset = fixed_steps, nonpositive_offset
        self.factor = step_factor(bits)
        self.sigma_factor = step_factor(sigma_bits) if sigma_bits < 32 else 0.0
        self.post_relu: bool | None = None  # set on the first forward (see the class docstring)

    def factors(self) -> tuple[float, float]:
        """(step factor, σ step factor) of this forward: the ``--finetune`` ones only while training."""
        if self.fixed_steps and self.training:
            return FINETUNE_STEP, FINETUNE_SIGMA_STEP
        return self.factor, self.sigma_factor

    @torch.no_grad()
    def quantized(self, x: Tensor) -> Tensor:
        """The forward values (no gradient)."""
        grouped = group_by_image(x, self.site)
        if self.post_relu is None:
            self.post_relu = bool(x.min() == 0)
        relu = self.post_relu
        if relu:
            mu, sigma = relu_stats(grouped)
        else:
            mu, sigma = grouped.mean(2, keepdim=True), grouped.std(2, keepdim=True)
        factor, sigma_factor = self.factors()
        if self.sigma_bits < 32:
            sigma = quantize_sigma(sigma, self.sigma_bits, sigma_factor)
        step = factor * sigma
        if relu:  # released form: midrise(x − thr) + thr, thr = (2^(b−1) − ½)Δ, i.e. multiples of Δ
            thr = (2 ** (self.bits - 1) - 0.5) * step.clamp_min(0)
            out = midrise(grouped - thr, step, self.bits, clamp=not self.unbounded) + thr
        else:
            out = midrise(grouped - mu, step, self.bits) + mu
        if self.nonpositive_offset:  # the release's constant for Δ < 0 (the rounding term is zeroed)
            thr = (2 ** (self.bits - 1) - 0.5) * step
            out = torch.where(step < 0, thr if relu else mu + thr.abs(), out)
        return ungroup(out, x, self.site)

    def forward(self, x: Tensor) -> Tensor:
        return straight_through(x, self.quantized(x))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, sigma_bits={self.sigma_bits}, unbounded={self.unbounded}"


class DaqWeightQuantizer(Quantizer):
    """Per-layer zero-centred mid-rise weights, Δ = t_b·std(W) (unbiased), ±(2^(b−1) − ½)Δ, identity STE;
    ``fixed_steps``: Δ = 1.596·std(W) in training mode only (the release's ``--finetune``)."""

    def __init__(self, bits: int, fixed_steps: bool = False) -> None:
        super().__init__()
        self.bits, self.fixed_steps = bits, fixed_steps
        self.factor = step_factor(bits)

    def forward(self, w: Tensor) -> Tensor:
        factor = FINETUNE_STEP if self.fixed_steps and self.training else self.factor
        with torch.no_grad():
            q = midrise(w, factor * w.std(), self.bits)
        return straight_through(w, q)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class DAQ(QuantMethod):
    """DAQ: W + A on the placement's layers, L1 only (base ``training_losses``), nothing learnable."""

    name = "daq"
    per_image_statistics = True  # per-image, per-channel mean/std of every quantized activation

    def __init__(self, cfg: Any = None, bits: Bits | None = None, **options: Any):
        super().__init__(cfg, bits, **options)
        c = self.cfg
        self.quirks = read_quirks(c)
        sigma_bits = c["sigma_bits"]
        valid = (*GAUSSIAN_STEPS, 32)
        if sigma_bits != "auto" and (isinstance(sigma_bits, bool) or sigma_bits not in valid):
            raise ValueError(f"sigma_bits={sigma_bits!r}: expected 'auto', 1..9 or 32 (not quantized)")
        self.sigma_bits = sigma_bits
        for b in (self.bits.w, self.bits.a):
            if b < 32:
                step_factor(b)
        self.placement = c["placement"]

    def quantize(self, model: nn.Module) -> nn.Module:
        self.check_backbone(model)
        spec = backbone_of(model)
        sigma_bits = spec.daq_sigma_bits(model) if self.sigma_bits == "auto" else int(self.sigma_bits)
        # the release passes --finetune to EDSR's ResBlocks only (RDN hard-codes it off; no transformer there)
        fixed = self.quirks["finetune_fixed_steps"] and spec.daq_finetune_steps
        unbounded, offset = self.quirks["unbounded_relu_branch"], self.quirks["nonpositive_sigma_offset"]
        make_act = None if self.bits.a >= 32 else (
            lambda site: DaqActQuantizer(self.bits.a, site, sigma_bits, unbounded, fixed, offset))
        make_weight = None if self.bits.w >= 32 else (lambda name, layer: DaqWeightQuantizer(self.bits.w, fixed))
        return apply_placement(model, self.placement, make_act, make_weight)
