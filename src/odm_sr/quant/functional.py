"""Quantizer arithmetic shared by every method (METHODS.md §3).

All functions are plain tensor functions with explicit, hand-checkable gradients, so that each method's
quantizer module is a thin shell around them.
"""

from __future__ import annotations

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


class _UniformQuant(torch.autograd.Function):
    """q(X; l, u) = Int((clip(X, l, u) - l) / s)·s + l with s = (u - l)/n, n = 2^b - 1.

    Gradients (METHODS.md §3 table), with v = (clip(X) - l)/s and R = Int(v):
    ∂q/∂X = 1[l ≤ X ≤ u];  ∂q/∂u = (R - v)/n inside, 1 above, 0 below;
    ∂q/∂l = (v - R)/n inside, 1 below, 0 above.
    One fused pass instead of the ~10 autograd nodes the composed expression would build.
    """

    @staticmethod
    def forward(ctx, x: Tensor, lower: Tensor, upper: Tensor, levels: int) -> Tensor:
        n = float(levels)
        step = (upper - lower) / n
        v = (torch.minimum(torch.maximum(x, lower), upper) - lower) / step
        r = torch.round(v)
        ctx.save_for_backward(x, lower, upper, v - r)
        ctx.n = n
        return r * step + lower

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, lower, upper, frac = ctx.saved_tensors
        n = ctx.n
        below = x < lower
        above = x > upper
        inside = ~(below | above)
        grad_x = grad_out * inside if ctx.needs_input_grad[0] else None
        grad_l = grad_u = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # frac = v - R; inside: ∂q/∂u = -frac/n, ∂q/∂l = frac/n
            g_in = grad_out * frac * inside / n
            if ctx.needs_input_grad[2]:
                grad_u = _reduce_to(grad_out * above - g_in, upper)
            if ctx.needs_input_grad[1]:
                grad_l = _reduce_to(grad_out * below + g_in, lower)
        return grad_x, grad_l, grad_u, None


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


def percentile(x: Tensor, q: float | Sequence[float]) -> Tensor:
    """q-th percentile (0-100) of all elements, linear interpolation as ``torch.quantile``; detached.

    ``q`` may be a sequence: the result is then a 1-D tensor (one sort instead of one per percentile).
    float64 input stays float64; other dtypes are computed in float32.
    ``torch.quantile`` refuses tensors above 16M elements; there we use ``kthvalue`` on the two neighbours.
    """
    flat = x.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    scalar = isinstance(q, (int, float))
    qs = [float(q)] if scalar else [float(v) for v in q]
    if flat.numel() <= 16_000_000:
        out = torch.quantile(flat, torch.tensor(qs, dtype=flat.dtype, device=flat.device) / 100.0)
    else:
        out = torch.stack([_kth_percentile(flat, v) for v in qs])
    return out[0] if scalar else out


def _kth_percentile(flat: Tensor, q: float) -> Tensor:
    pos = (flat.numel() - 1) * q / 100.0
    lo, hi = int(pos), min(int(pos) + 1, flat.numel() - 1)
    v_lo = flat.kthvalue(lo + 1).values
    v_hi = flat.kthvalue(hi + 1).values
    return v_lo + (v_hi - v_lo) * (pos - lo)
