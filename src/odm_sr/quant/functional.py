"""Quantizer arithmetic shared by every method (METHODS.md §3).

All functions are plain tensor functions with explicit, hand-checkable gradients, so that each method's
quantizer module is a thin shell around them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import torch
from torch import Tensor


def round_ste(x: Tensor) -> Tensor:
    """Round half to even (``torch.round``) with a straight-through gradient (∂/∂x = 1)."""
    return x + (torch.round(x) - x).detach()


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a broadcast gradient back to the shape of ``like`` (scalar or per-channel bounds)."""
    if grad.shape == like.shape:
        return grad
    lead = grad.dim() - like.dim()
    if lead > 0:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, size in enumerate(like.shape) if size == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def split_outside(grad: Tensor, x: Tensor, lower: Tensor | float, upper: Tensor | float
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(g·1[l ≤ X ≤ u], g·1[X < l], g·1[X > u]) for a quantizer's clip range.

    ``threshold_backward`` (ReLU's vectorised gradient kernel) instead of boolean masks: comparisons, ``&``
    and ``where`` are several times slower on CPU, and a quantizer runs them on every activation element.
    The sign of a float difference is exact, so the masks are too: X = l or X = u counts as inside.
    """
    below = torch.ops.aten.threshold_backward(grad, lower - x, 0)
    above = torch.ops.aten.threshold_backward(grad, x - upper, 0)
    return grad.sub(below).sub_(above), below, above


def sum_to_shape(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a gradient over everything ``like`` (a scalar or broadcast bound) does not hold."""
    return grad.sum().reshape(like.shape) if like.numel() == 1 else _reduce_to(grad, like)


def dot_to_shape(a: Tensor, b: Tensor, like: Tensor) -> Tensor:
    """Σ a·b reduced to the shape of ``like``; one fused ``dot`` without a temporary for scalar bounds."""
    if like.numel() == 1 and a.shape == b.shape:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(like.shape)
    return _reduce_to(a * b, like)


class _UniformQuant(torch.autograd.Function):
    """q(X; l, u) = Int((clip(X, l, u) - l) / s)·s + l with s = (u - l)/n, n = 2^b - 1.

    Gradients (METHODS.md §3 table), with v = (clip(X) - l)/s and R = Int(v):
    ∂q/∂X = 1[l ≤ X ≤ u];  ∂q/∂u = (R - v)/n inside, 1 above, 0 below;
    ∂q/∂l = (v - R)/n inside, 1 below, 0 above.
    One fused pass instead of the ~10 autograd nodes the composed expression would build; the forward works
    in place on one temporary and the backward needs no boolean masks (``split_outside``), two sums and one
    dot product per bound.
    """

    @staticmethod
    def forward(ctx, x: Tensor, lower: Tensor, upper: Tensor, levels: int) -> Tensor:
        n = float(levels)
        step = (upper - lower) / n
        v = torch.maximum(x, lower)
        v = torch.minimum(v, upper, out=v) if v.shape == x.shape else torch.minimum(v, upper)
        v.sub_(lower).div_(step)
        r = torch.round(v)
        frac = v.sub_(r)  # v - R, in [-1/2, 1/2] inside and 0 outside
        ctx.save_for_backward(x, lower, upper, frac)
        ctx.n = n
        return r.mul_(step).add_(lower)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, lower, upper, frac = ctx.saved_tensors
        need_x, need_l, need_u = ctx.needs_input_grad[:3]
        grad_in, below, above = split_outside(grad_out, x, lower, upper)
        grad_l = grad_u = None
        if need_l or need_u:
            # inside: ∂q/∂u = -frac/n, ∂q/∂l = frac/n (frac is 0 outside; grad_in is 0 there too)
            if need_u:
                grad_u = sum_to_shape(above, upper) - dot_to_shape(grad_in, frac, upper) / ctx.n
            if need_l:
                grad_l = sum_to_shape(below, lower) + dot_to_shape(grad_in, frac, lower) / ctx.n
        return (grad_in if need_x else None), grad_l, grad_u, None


def uniform_quantize(x: Tensor, lower: Tensor, upper: Tensor, bits: int) -> Tensor:
    """Asymmetric uniform quantization onto the 2^b levels l + k·s, k = 0..2^b - 1 (ODM activations)."""
    lower = torch.as_tensor(lower, dtype=x.dtype, device=x.device)
    upper = torch.as_tensor(upper, dtype=x.dtype, device=x.device)
    return _UniformQuant.apply(x, lower, upper, 2**bits - 1)


def symmetric_quantize(x: Tensor, bound: Tensor, bits: int) -> Tensor:
    """Symmetric quantization on [-u, u] without a zero level (ODM weights): 2-bit levels are {±u/3, ±u}.

    ∂q/∂u = 2(R - v)/n inside and sign(X) outside follow from l = -u through autograd.
    """
    bound = torch.as_tensor(bound, dtype=x.dtype, device=x.device)
    return _UniformQuant.apply(x, -bound, bound, 2**bits - 1)


def grad_scale(x: Tensor, factor: float) -> Tensor:
    """Identity in the forward, gradient multiplied by ``factor``.

    LSQ's step-size gradient scale g = 1/√(N·Q_P) (Esser et al. 2020, §2.2; METHODS.md §4.4)."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


TAIL_TOPK_MAX_ELEMENTS = 1 << 18  # up to here (weights, small activations) a top-k of the tail beats a sort


def percentile(x: Tensor, q: float | Sequence[float]) -> Tensor:
    """q-th percentile (0-100) of all elements, linear interpolation as ``torch.quantile``; detached.

    ``q`` may be a sequence: the result is then a 1-D tensor (one sort instead of one per percentile).
    float64 input stays float64; other dtypes are computed in float32.
    Tail percentiles of tensors up to ``TAIL_TOPK_MAX_ELEMENTS`` (the weight percentiles that WCC and DDTB
    recompute every step) read the two neighbours from a ``topk`` of the tail instead of sorting everything,
    with ``torch.quantile``'s own rank and interpolation arithmetic, so the values are identical.
    ``torch.quantile`` refuses tensors above 16M elements; there we use ``kthvalue`` on the two neighbours.
    """
    flat = x.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    scalar = isinstance(q, (int, float))
    qs = [float(q)] if scalar else [float(v) for v in q]
    n = flat.numel()
    if 0 < n <= TAIL_TOPK_MAX_ELEMENTS and all(min(v, 100.0 - v) <= 12.5 for v in qs):
        out = _tail_percentiles(flat, qs)
    elif n <= 16_000_000:
        out = torch.quantile(flat, torch.tensor(qs, dtype=flat.dtype, device=flat.device) / 100.0)
    else:
        out = torch.stack([_kth_percentile(flat, v) for v in qs])
    return out[0] if scalar else out


def _round_to(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to float32 (as a float32 tensor would hold it) unless ``dtype`` is float64."""
    return value if dtype == torch.float64 else struct.unpack("f", struct.pack("f", value))[0]


def _tail_percentiles(flat: Tensor, qs: list[float]) -> Tensor:
    """``torch.quantile(flat, qs/100)`` (linear) for percentiles within 12.5 % of either end, via ``topk``."""
    n = flat.numel()
    # ranks as ATen's quantile computes them: q/100 rounded to the input dtype, times (n − 1) in double; the
    # rounding in Python (no tensor, no host transfer: this runs every step for every WCC/DDTB weight)
    ranks = [_round_to(v / 100.0, flat.dtype) * (n - 1) for v in qs]
    values = []
    for rank in ranks:
        below, above = int(rank), min(int(math.ceil(rank)), n - 1)
        if rank >= (n - 1) / 2:  # upper tail: the n − below largest, descending (index n − 1 − r)
            top = flat.topk(n - below).values
            lo, hi = top[n - 1 - below], top[n - 1 - above]
        else:  # lower tail: the above + 1 smallest, ascending (index r)
            top = flat.topk(above + 1, largest=False).values
            lo, hi = top[below], top[above]
        values.append(torch.lerp(lo, hi, rank - below))
    return torch.stack(values)


def _kth_percentile(flat: Tensor, q: float) -> Tensor:
    pos = (flat.numel() - 1) * q / 100.0
    lo, hi = int(pos), min(int(pos) + 1, flat.numel() - 1)
    v_lo = flat.kthvalue(lo + 1).values
    v_hi = flat.kthvalue(hi + 1).values
    return v_lo + (v_hi - v_lo) * (pos - lo)


def max_abs_weight_quantize(w: Tensor, bits: int) -> Tensor:
    """PAMS weights: Int(W·Q/m)·m/Q, m = max|W| (detached) + 1e-8, STE without clipping (|W| ≤ m anyway).

    2 bits (Q = 1) gives the ternary {−m, 0, m}. `quant_ops.quant_weight`.
    """
    q_max = float(2 ** (bits - 1) - 1)
    m = w.detach().abs().max() + 1e-8
    return round_ste(w * (q_max / m)) * (m / q_max)
