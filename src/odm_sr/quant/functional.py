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


def wanted(ctx, index: int) -> bool:
    """Whether a custom Function's backward must return the gradient of input ``index`` in this backward pass.

    ``ctx.needs_input_grad`` is fixed in the forward; a pass that does not reach the input (ODM's g_M pass
    ``autograd.grad(L_M, θ)`` never needs the quantizer bounds' gradients, METHODS.md §5.5) asks the engine
    whether it will run the input's gradient node. A leaf that is an ``autograd.grad`` input cannot be asked
    (the engine raises): it is wanted. Under ``torch.compile`` the static flag is used.
    """
    if not ctx.needs_input_grad[index]:
        return False
    if torch.compiler.is_compiling():
        return True
    node = ctx.next_functions[index][0]
    try:
        return node is None or bool(torch._C._will_engine_execute_node(node))
    except (RuntimeError, AttributeError):  # an autograd.grad input (leaf), or an engine without the query
        return True


def clipped_backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(∂L/∂x, ∂L/∂bound) of a fused clip-and-round Function that saved ``(inside, d, bound)`` and ``ctx.factor``:
    the input's gradient through the inside mask, the bound's as one row product with d = ∂q/∂bound per element
    (None where the forward did not need it), times the bound's gradient factor; each only where the pass reaches
    it (:func:`wanted`)."""
    inside, d, bound = ctx.saved_tensors
    grad_b = None
    if d is not None and wanted(ctx, 1):
        (grad_b,) = row_grads(d.unsqueeze(0), grad_out, (bound,))
        if ctx.factor != 1.0:
            grad_b = grad_b * ctx.factor
    grad_in = grad_out * inside if wanted(ctx, 0) else None
    return grad_in, grad_b


def bounds_backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(∂L/∂x, ∂L/∂l, ∂L/∂u) of a fused two-bound quantizer Function that saved ``(∂q/∂x, rows, lower, upper)``,
    ``rows`` = ∂q/∂(l, u) per element stacked (None where the forward did not need them): the input's gradient one
    multiply, both bounds' one row product; each only where the pass reaches it (:func:`wanted`)."""
    dq_dx, rows, lower, upper = ctx.saved_tensors
    grad_l = grad_u = None
    if rows is not None and (wanted(ctx, 1) or wanted(ctx, 2)):
        grad_l, grad_u = row_grads(rows, grad_out, (lower, upper))
    grad_in = grad_out * dq_dx if wanted(ctx, 0) else None
    return grad_in, grad_l, grad_u


def row_grads(rows: Tensor, grad: Tensor, likes: Sequence[Tensor]) -> list[Tensor]:
    """Σ grad·rows[i] reduced to the shape of ``likes[i]``: the bound gradients of a fused quantizer.

    ``rows`` (k, *grad.shape) holds ∂q/∂(bound i) per element, computed in the forward. Scalar bounds take one
    matrix-vector product for all k; broadcast bounds (DDTB's per-image ones) one product and one sum each.
    """
    if all(like.numel() == 1 for like in likes) and rows.shape[1:] == grad.shape:
        sums = torch.mv(rows.reshape(len(likes), -1), grad.reshape(-1))
        return [sums[i].reshape(like.shape) for i, like in enumerate(likes)]
    prod = rows * grad
    return [_reduce_to(prod[i], like) for i, like in enumerate(likes)]


class _UniformQuant(torch.autograd.Function):
    """q(X; l, u) = Int((clip(X, l, u) - l) / s)·s + l with s = (u - l)/n, n = 2^b - 1.

    Gradients (METHODS.md §3 table), with v = (clip(X) - l)/s and R = Int(v):
    ∂q/∂X = 1[l ≤ X ≤ u];  ∂q/∂u = (R - v)/n inside, 1 above, 0 below;
    ∂q/∂l = (v - R)/n inside, 1 below, 0 above (X = l or X = u counts as inside).
    The forward saves the inside mask and, when a bound needs a gradient, ∂q/∂l and ∂q/∂u per element (two
    rows of one tensor); the backward is then one multiply and one matrix-vector product, which matters for
    ODM, whose step runs it twice (g_R and g_M, METHODS.md §5.5).
    """

    @staticmethod
    def forward(ctx, x: Tensor, lower: Tensor, upper: Tensor, levels: int) -> Tensor:
        n = float(levels)
        need_bounds = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        step = (upper - lower) / n
        c = torch.clamp(x, lower, upper)
        inside = c == x
        rows = None
        if need_bounds:
            rows = c.new_empty((2, *c.shape))
            torch.lt(x, c, out=rows[0])  # below: clip gave l > X
            torch.gt(x, c, out=rows[1])  # above
        v = c.sub_(lower).div_(step)
        r = torch.round(v)
        if rows is not None:
            frac = v.sub_(r).mul_(inside)  # v - R inside, 0 outside
            rows[0].add_(frac, alpha=1.0 / n)
            rows[1].sub_(frac, alpha=1.0 / n)
        ctx.save_for_backward(inside, rows, lower, upper)
        return r.mul_(step).add_(lower)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return (*bounds_backward(ctx, grad_out), None)


class _SymmetricQuant(torch.autograd.Function):
    """q(X; -u, u) of ``_UniformQuant`` with one bound u: ∂q/∂X = 1[|X| ≤ u], ∂q/∂u = 2(R - v)/n inside and
    sign(X) outside (what autograd gives through l = -u). ``factor`` scales ∂q/∂u (LSQ's gradient scale)."""

    @staticmethod
    def forward(ctx, x: Tensor, bound: Tensor, levels: int, factor: float) -> Tensor:
        n = float(levels)
        lower = -bound
        step = (bound - lower) / n
        c = torch.clamp(x, lower, bound)
        inside = c == x
        v = c.sub_(lower).div_(step)
        r = torch.round(v)
        d = None
        if ctx.needs_input_grad[1]:  # ∂q/∂u per element: -2(v - R)/n inside, sign(X) outside
            d = torch.where(inside, v.sub_(r).mul_(-2.0 / n), torch.sign(x))
        ctx.save_for_backward(inside, d, bound)
        ctx.factor = factor
        return r.mul_(step).add_(lower)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return (*clipped_backward(ctx, grad_out), None, None)


def uniform_quantize(x: Tensor, lower: Tensor, upper: Tensor, bits: int) -> Tensor:
    """Asymmetric uniform quantization onto the 2^b levels l + k·s, k = 0..2^b - 1 (ODM activations)."""
    lower = torch.as_tensor(lower, dtype=x.dtype, device=x.device)
    upper = torch.as_tensor(upper, dtype=x.dtype, device=x.device)
    return _UniformQuant.apply(x, lower, upper, 2**bits - 1)


def symmetric_quantize(x: Tensor, bound: Tensor, bits: int, grad_factor: float = 1.0) -> Tensor:
    """Symmetric quantization on [-u, u] without a zero level (ODM weights): 2-bit levels are {±u/3, ±u}.

    ∂q/∂u = 2(R - v)/n inside and sign(X) outside, times ``grad_factor``.
    """
    bound = torch.as_tensor(bound, dtype=x.dtype, device=x.device)
    return _SymmetricQuant.apply(x, bound, 2**bits - 1, float(grad_factor))


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
    if _tail_path(n, qs):
        values = _tail_values(flat, qs)
        out = values[0].reshape(1) if len(values) == 1 else torch.stack(values)
    elif n <= 16_000_000:
        out = torch.quantile(flat, torch.tensor(qs, dtype=flat.dtype, device=flat.device) / 100.0)
    else:
        out = torch.stack([_kth_percentile(flat, v) for v in qs])
    return out[0] if scalar else out


def _round_to(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to float32 (as a float32 tensor would hold it) unless ``dtype`` is float64."""
    return value if dtype == torch.float64 else struct.unpack("f", struct.pack("f", value))[0]


def _tail_path(n: int, qs: list[float]) -> bool:
    """Whether ``percentile`` reads these percentiles of ``n`` values from a ``topk`` of the tail."""
    return 0 < n <= TAIL_TOPK_MAX_ELEMENTS and all(min(v, 100.0 - v) <= 12.5 for v in qs)


def _tail_values(rows: Tensor, qs: list[float]) -> list[Tensor]:
    """``torch.quantile(rows, q/100, dim=-1)`` (linear) for each of ``qs`` (within 12.5 % of either end), via
    ``topk`` over the last dimension of a 1-D tensor or of each row of a 2-D one."""
    n = rows.shape[-1]
    values = []
    for v in qs:
        # rank as ATen's quantile computes it: q/100 rounded to the input dtype, times (n − 1) in double; the
        # rounding in Python (no tensor, no host transfer: this runs every step for every WCC/DDTB weight)
        rank = _round_to(v / 100.0, rows.dtype) * (n - 1)
        below, above = int(rank), min(int(math.ceil(rank)), n - 1)
        if rank >= (n - 1) / 2:  # upper tail: the n − below largest, descending (index n − 1 − r)
            top = rows.topk(n - below, dim=-1).values
            lo, hi = top[..., n - 1 - below], top[..., n - 1 - above]
        else:  # lower tail: the above + 1 smallest, ascending (index r)
            top = rows.topk(above + 1, dim=-1, largest=False).values
            lo, hi = top[..., below], top[..., above]
        values.append(torch.lerp(lo, hi, rank - below))
    return values


def percentile_rows(x: Tensor, q: Sequence[float]) -> Tensor | None:
    """``percentile(x[i], q)`` for every row i of a 2-D ``x`` at once, shape (len(q), rows); detached.

    Only the tail path (rows up to ``TAIL_TOPK_MAX_ELEMENTS`` elements, percentiles within 12.5 % of an end):
    one ``topk`` per tail over all rows, the same ranks and interpolation, so every row's values are those of
    ``percentile`` on that row. Returns None where ``percentile`` would take another path.
    """
    rows = x.detach()
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.float()
    qs = [float(v) for v in q]
    if not (rows.dim() == 2 and _tail_path(rows.shape[1], qs)):
        return None
    return torch.stack(_tail_values(rows, qs))


def _kth_percentile(flat: Tensor, q: float) -> Tensor:
    pos = (flat.numel() - 1) * q / 100.0
    lo, hi = int(pos), min(int(pos) + 1, flat.numel() - 1)
    v_lo = flat.kthvalue(lo + 1).values
    v_hi = flat.kthvalue(hi + 1).values
    return v_lo + (v_hi - v_lo) * (pos - lo)


class _MaxAbsQuant(torch.autograd.Function):
    """Int(W·(Q/m))·(m/Q), m = max|W| + 1e-8 (constant), with the straight-through gradient ∂/∂W = 1 (the
    composed round_ste form gives (Q/m)·(m/Q), which is 1 up to an ulp)."""

    @staticmethod
    def forward(ctx, w: Tensor, q_max: float, rows: bool = False) -> Tensor:
        # max|W| in one reduction (``rows``: of each row of a stack of weights)
        m = (torch.linalg.vector_norm(w, float("inf"), dim=1, keepdim=True) if rows
             else torch.linalg.vector_norm(w, float("inf"))) + 1e-8
        if q_max == 1.0:  # Q/m and m/Q without the multiplications by 1 (same values)
            return torch.round(w * m.reciprocal()).mul_(m)
        return torch.round(w * (q_max / m)).mul_(m / q_max)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return grad_out, None, None


class _StraightThrough(torch.autograd.Function):
    """The value of ``q`` with the gradient of ``x`` (∂/∂x = 1): ``x + (q − x).detach()`` (DAQ's released
    ``q.detach() + x − x.detach()``) without its ops and without their float round-off on the levels."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor) -> Tensor:
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return grad_out, None


def straight_through(x: Tensor, q: Tensor) -> Tensor:
    """Forward ``q`` (computed without gradient), backward the identity to ``x``."""
    return _StraightThrough.apply(x, q)


def max_abs_weight_quantize(w: Tensor, bits: int) -> Tensor:
    """PAMS weights: Int(W·Q/m)·m/Q, m = max|W| (detached) + 1e-8, STE without clipping (|W| ≤ m anyway).

    2 bits (Q = 1) gives the ternary {−m, 0, m}. `quant_ops.quant_weight`.
    """
    return _MaxAbsQuant.apply(w, float(2 ** (bits - 1) - 1))


def max_abs_weight_quantize_rows(w: Tensor, bits: int) -> Tensor:
    """``max_abs_weight_quantize`` of every row of a 2-D ``w`` (a stack of flattened weights) in one call."""
    return _MaxAbsQuant.apply(w, float(2 ** (bits - 1) - 1), True)
