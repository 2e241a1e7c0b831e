"""Requantizing integer convs: one ``QLinearConv`` from a layer's input codes straight to the next layer's codes.

Where an integer conv's output reaches the next integer layer's quantizer through nothing but a monotone
activation (EDSR's ``conv → ReLU → conv`` in every residual block), the reference (``IntegerConv2d.reference``:
exact integer sums, the float64 rescale, float32 ReLU, the quantizer's float32 ops) maps each output's integer
sum ``acc`` to a code by a non-decreasing step function, one per output channel and border configuration (the
set of kernel taps inside the image: the grid offset's border count differs there). Its steps
``T_j`` = the smallest ``acc`` whose code is ≥ j are computed here with those same float ops (a bisection over
the reachable sums), so they include every float32 round-off of the reference.

``QLinearConv`` computes ``q = sat_uint8(round(float32(A)·M_o))`` of an int32 ``A``; with the weight codes
scaled by an integer K (as far as int8 allows), ``A = K·Σ (k − z)·code + Σ_{taps inside} e_o(tap) + B_o``:
``z`` is the input zero point (ORT pads with it), ``e`` the weights of two constant input channels (values z + 1
and z + 64; padded with z, so they sum e over the taps inside) that give each border configuration its own
integer intercept (channels of value z fill the input to a multiple of 4: ORT's fast path, 65-66 inputs take
1.4x as long as 64 or 68), ``B`` the int32 bias.
The fitted slope and intercepts put each rounding edge of ``q`` between ``T_j − 1`` and ``T_j``; a ``Clip``
to the codes' range follows. **The rule**: a layer is requantized this way only if, for every output channel and
border configuration, ``q`` equals the reference code at the ends of the reachable range and on both sides of
every step (both are monotone, so then everywhere), with every unclipped ``float32(A)·M`` at least 1e-4 away
from a rounding edge (any float32 evaluation order of the requantization gives the same codes), every ``|A|``
below 2^24, and every pair of uint8 × int8 products below 2^15 (AVX2's 16-bit pair sums cannot saturate).
Otherwise the layer keeps ``ConvInteger`` and the float64 rescale (``IntegerConv2d``). The PyTorch forward
(``odm-sr-eval eval.exact=true``) is the unfused reference either way.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .graph_ops import _const, _IntegerOp
from .spec import ActGrid

CONST_VALUES = (1, 64)  # the constant channels' values above the zero point
MARGIN = 1e-4  # least distance of an unclipped float32(A)·M from a rounding edge (in code units)
SLOPES = 201  # candidate slopes per channel, within ±1 sum unit per code of the reference's
MIN_SIZE = 2  # 1-pixel inputs add border configurations that a 3x3 kernel's 10 intercepts cannot all fit


@dataclass
class Requant:
    """``QLinearConv`` parameters that reproduce the reference codes (``fit``)."""

    weight: Tensor  # int8 (C_o, C_i [+ 2], kh, kw): K·code [, e − 64·e₂, e₂]
    multiplier: Tensor  # float32 (C_o,): M_o (x and y scales 1)
    bias: Tensor  # int32 (C_o,)
    zero_point: int  # x zero point (ODM: round(−l_a/s_a) ≥ 0; PAMS: Q)
    const_values: tuple[int, ...]  # uint8 values of the constant input channels (z + 1, z + 64, then z: padding)
    low: int  # Clip bounds: the next grid's reachable codes
    high: int


def border_masks(layer: nn.Module) -> Tensor:
    """(configs, kh, kw) bool: every set of taps inside the image an output position can have in an image of
    at least ``MIN_SIZE`` pixels per side."""
    kh, kw = layer.codes.codes.shape[-2:]
    per_axis = []
    for k, pad, dil in ((kh, layer.padding[0], layer.dilation[0]), (kw, layer.padding[1], layer.dilation[1])):
        masks = {tuple(0 <= i - pad + a * dil < size for a in range(k))
                 for size in range(MIN_SIZE, k * dil + 2 * pad + 2) for i in range(size + 2 * pad - dil * (k - 1))}
        per_axis.append([m for m in masks if any(m)])
    return torch.stack([torch.tensor(r)[:, None] & torch.tensor(c)[None, :]
                        for r, c in itertools.product(*per_axis)])


def _codes_of(first: nn.Module, act: nn.Module, grid: ActGrid, acc: Tensor, count: Tensor | None,
              bias: Tensor) -> Tensor:
    """The reference's next codes of integer sums (float64 tensors, broadcast)."""
    return grid.codes(_apply(act, first.finish_sums(acc, count, bias)))


def _steps(first, act, grid, lo, hi, count, bias, levels: int) -> Tensor:
    """T (channels, configs, levels): the smallest sum in [lo, hi + 1] with code ≥ j, j = 1 … levels
    (hi + 1: never), by bisection."""
    shape = (*lo.shape, levels)
    j = torch.arange(1, levels + 1, dtype=torch.float64).expand(shape)
    below, above = (lo - 1).unsqueeze(-1).expand(shape).clone(), (hi + 1).unsqueeze(-1).expand(shape).clone()
    cnt = None if count is None else count.unsqueeze(-1).expand(shape)
    while bool((above - below > 1).any()):
        mid = torch.floor((below + above) / 2)
        ok = _codes_of(first, act, grid, mid, cnt, bias[:, None, None].expand(shape)).double() >= j
        above, below = torch.where(ok, mid, above), torch.where(ok, below, mid)
    return above


def _windows(steps: Tensor, lo: Tensor, hi: Tensor, first_level: int) -> tuple[Tensor, Tensor]:
    """Bounds (L, U) of the rounding edge of each level j > first_level: L < edge < U."""
    lo_, hi_ = lo.unsqueeze(-1), hi.unsqueeze(-1)
    lower = torch.where(steps > lo_, steps - 1, torch.full_like(steps, -torch.inf))
    upper = torch.where(steps <= hi_, steps, torch.full_like(steps, torch.inf))
    return lower[..., first_level:], upper[..., first_level:]


def _best_slope(lower: Tensor, upper: Tensor, levels: Tensor, slope0: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per channel, the slope u (sum units per code) whose worst intercept window over the configs is widest;
    returns u (C_o,) and the windows (C_o, configs) of c₀ (edge j at c₀ + (j − ½)·u)."""
    u = slope0 + torch.linspace(-1.0, 1.0, SLOPES, dtype=torch.float64)  # (S,)
    shift = (levels - 0.5)[None, None, :, None] * u  # (1, 1, J, S)
    lo = (lower.unsqueeze(-1) - shift).amax(dim=2)  # (C_o, configs, S)
    hi = (upper.unsqueeze(-1) - shift).amin(dim=2)
    width = torch.nan_to_num(hi - lo, nan=torch.inf, posinf=1e9).amin(dim=1)  # (C_o, S)
    best = width.argmax(dim=1)
    pick = best[:, None, None].expand(-1, lo.shape[1], 1)
    return u[best], lo.gather(2, pick)[..., 0], hi.gather(2, pick)[..., 0]


def _top_code(grid: ActGrid) -> int:
    return grid.levels if grid.kind == "odm" else 2 * grid.levels


@dataclass
class _Tables:
    """Per output channel and border configuration: reachable sums, border counts, the reference's steps."""

    masks: Tensor  # (configs, kh, kw) float64
    count: Tensor  # (C_o, configs): Σ code over the taps inside
    lo: Tensor
    hi: Tensor
    steps: Tensor  # (C_o, configs, top)
    low: int
    top: int


def _tables(first: nn.Module, act: nn.Module, grid: ActGrid) -> _Tables:
    codes, in_grid = first.codes.codes.double(), first.grid
    masks = border_masks(first).double()
    k_lo, k_hi = (0.0, float(in_grid.levels)) if in_grid.zero_point is None else (-1.0 * in_grid.levels,
                                                                                  float(in_grid.levels))
    tap_min = torch.minimum(codes * k_lo, codes * k_hi).sum(1)
    tap_max = torch.maximum(codes * k_lo, codes * k_hi).sum(1)
    count = torch.einsum("okl,ckl->oc", codes.sum(1), masks)
    lo, hi = torch.einsum("okl,ckl->oc", tap_min, masks), torch.einsum("okl,ckl->oc", tap_max, masks)
    low = int(grid.codes(_apply(act, torch.tensor(-3.0e38))))
    top = _top_code(grid)
    steps = _steps(first, act, grid, lo, hi, count if first.padded_offset() else None, first.const_bias(), top)
    return _Tables(masks, count, lo, hi, steps, low, top)


def _intercepts(tables: _Tables, targets: Tensor, border: bool) -> tuple[Tensor, Tensor]:
    """Integer (B (C_o,), e (C_o, kh, kw)) with B + Σ_{taps inside} e closest to the targets (C_o, configs)
    (NaN: free); e = 0 without a border term."""
    n_out, configs = targets.shape
    taps = tables.masks.reshape(configs, -1)
    design = torch.cat([torch.ones(configs, 1, dtype=torch.float64), taps if border else taps[:, :0]], dim=1)
    free = torch.isnan(targets)
    rows = design.expand(n_out, -1, -1) * (~free).unsqueeze(-1)
    rhs = torch.round(torch.nan_to_num(targets, nan=0.0)).unsqueeze(-1)
    sol = torch.round(torch.linalg.lstsq(rows, rhs, driver="gelsd").solution[..., 0])
    e = sol[:, 1:] if border else torch.zeros(n_out, taps.shape[1], dtype=torch.float64)
    return sol[:, 0], e.reshape(n_out, *tables.masks.shape[1:])


def fit(first: nn.Module, act: nn.Module, grid: ActGrid) -> Requant | None:
    """The ``QLinearConv`` of ``first`` → ``act`` → ``grid``'s codes, or None where the rule (module docstring)
    is not met."""
    in_grid = first.grid
    if in_grid is None or first.groups != 1 or tuple(first.stride) != (1, 1):
        return None
    tables = _tables(first, act, grid)
    levels = torch.arange(tables.low + 1, tables.top + 1, dtype=torch.float64)
    lower, upper = _windows(tables.steps, tables.lo, tables.hi, tables.low)
    slope0 = float(grid.step()) / first.rescale()
    u, w_lo, w_hi = _best_slope(lower, upper, levels, slope0)
    if bool((w_hi <= w_lo).any()):
        return None
    half = 0.5 * u[:, None]
    c0 = torch.where(torch.isinf(w_lo), w_hi - half, torch.where(torch.isinf(w_hi), w_lo + half, (w_lo + w_hi) / 2))
    border = first.padded_offset()
    odm = in_grid.zero_point is None
    z = min(max(round(-in_grid.params[0] / float(in_grid.step())), 0), 191) if border else 0
    k = 127 // max(int(first.codes.codes.abs().max()), 1)
    bias, e = _intercepts(tables, k * (z * tables.count - c0), border)
    weight = first.codes.codes.to(torch.int32) * k
    const_values: tuple[int, ...] = ()
    if border:  # the two constant channels, then channels of value z (zero weight) to a multiple of 4 inputs
        e_hi = torch.round(e / CONST_VALUES[1])
        pad = -(weight.shape[1] + 2) % 4
        extra = [e - CONST_VALUES[1] * e_hi, e_hi] + [torch.zeros_like(e)] * pad
        weight = torch.cat([weight, torch.stack(extra, dim=1).to(torch.int32)], dim=1)
        const_values = tuple(z + v for v in CONST_VALUES) + (z,) * pad
    result = Requant(weight, (1.0 / (k * u)).float(), bias.to(torch.int32), z if odm else in_grid.zero_point,
                     const_values, tables.low, tables.top)
    ok = _verify(first, act, grid, tables, result, k, e, z if odm else 0)
    return result if ok and int(weight.abs().max()) <= 127 else None


def _verify(first, act, grid, tables: _Tables, req: Requant, k: int, e: Tensor, shift: int) -> bool:
    """The rule: ``QLinearConv``'s codes equal the reference's at the range ends and around every step, with
    margin, no float32/int32 overflow, no 16-bit pair saturation."""
    top = tables.top
    steps = tables.steps.clamp(max=tables.hi.unsqueeze(-1))
    acc = torch.cat([tables.lo.unsqueeze(-1), tables.hi.unsqueeze(-1), steps, steps - 1], dim=-1)
    acc = torch.maximum(acc, tables.lo.unsqueeze(-1))
    count = tables.count.unsqueeze(-1).expand(acc.shape)
    bias = first.const_bias()[:, None, None].expand(acc.shape)
    want = _codes_of(first, act, grid, acc, count if first.padded_offset() else None, bias)
    intercept = req.bias.double()[:, None] + torch.einsum("okl,ckl->oc", e, tables.masks)
    a = k * (acc - shift * count) + intercept.unsqueeze(-1)
    got = torch.round(a.float() * req.multiplier[:, None, None]).clamp(tables.low, top)
    exact = a * req.multiplier.double()[:, None, None]
    edges = torch.arange(tables.low + 1, top + 1, dtype=torch.float64) - 0.5
    margin = (exact.unsqueeze(-1) - edges).abs().amin(dim=-1)
    x_max = max((_top_code(first.grid), *req.const_values))
    return bool(torch.equal(got, want.to(got.dtype)) and margin.min() >= MARGIN and a.abs().max() < 2 ** 24
                and 2 * x_max * int(req.weight.abs().max()) < 2 ** 15)


class RequantPair(nn.Module):
    """``first`` → ``act`` → ``second`` with ``first`` as a requantizing ``QLinearConv`` (``fit``): in the graph,
    codes → QLinearConv → Clip → ``second``'s integer sums; in PyTorch, the unfused reference."""

    def __init__(self, first: nn.Module, act: nn.Module, second: nn.Module, req: Requant) -> None:
        super().__init__()
        self.first, self.act, self.second, self.req = first, act, second, req

    def forward(self, x: Tensor) -> Tensor:
        return _IntegerOp.apply(x, self)

    def reference(self, x: Tensor) -> Tensor:
        return self.second.reference(_apply(self.act, self.first.reference(x)))

    def emit(self, g, x):
        q = emit_qlinear(g, self.first.emit_codes(g, x), self.req, self.first._attrs())
        return self.second.emit_from_codes(g, q, q)


def emit_qlinear(g, codes, req: Requant, attrs: dict, clip: bool = True):
    """ONNX: uint8 ``codes`` [+ the constant channels] → ``QLinearConv`` (x and y scales 1, the multiplier as
    per-channel w scale, y zero point 0) [→ ``Clip`` to ``req.low`` … ``req.high``]."""

    def scalar(value, dtype):
        return _const(g, torch.tensor(value, dtype=dtype))

    if req.const_values:
        shape = g.op("Shape", codes)
        size = g.op("Concat", g.op("Slice", shape, _const(g, torch.tensor([0])), _const(g, torch.tensor([1]))),
                    _const(g, torch.tensor([len(req.const_values)])),
                    g.op("Slice", shape, _const(g, torch.tensor([2])), _const(g, torch.tensor([4]))), axis_i=0)
        values = torch.tensor(req.const_values, dtype=torch.uint8).reshape(1, -1, 1, 1)
        codes = g.op("Concat", codes, g.op("Expand", _const(g, values), size), axis_i=1)
    n_out = req.weight.shape[0]
    q = g.op("QLinearConv", codes, scalar(1.0, torch.float32), scalar(req.zero_point, torch.uint8),
             _const(g, req.weight.to(torch.int8)), _const(g, req.multiplier),
             _const(g, torch.zeros(n_out, dtype=torch.int8)), scalar(1.0, torch.float32),
             scalar(0, torch.uint8), _const(g, req.bias), **attrs)
    return g.op("Clip", q, scalar(req.low, torch.uint8), scalar(req.high, torch.uint8)) if clip else q


def simulate(req: Requant, codes: Tensor, attrs: dict) -> Tensor:
    """``emit_qlinear`` in PyTorch: the exact int32 sums (float64), ``round(float32(A)·M)`` (half to even, as ORT),
    the clip to ``req.low`` … ``req.high``; float32 codes."""
    x = codes.double()
    x = x - req.zero_point if req.zero_point else x  # ORT pads with z: zero padding of x − z (no x − 0: the
    # tracer's peephole pass drops it and fails)
    if req.const_values:
        const = torch.tensor(req.const_values, dtype=torch.float64) - req.zero_point
        x = torch.cat([x, const.reshape(1, -1, 1, 1).expand(x.shape[0], -1, *x.shape[2:])], dim=1)
    ph, pw = attrs["pads_i"][:2]
    a = F.conv2d(x, req.weight.double(), req.bias.double(), attrs["strides_i"], (ph, pw), attrs["dilations_i"])
    return torch.round(a.float() * req.multiplier.reshape(1, -1, 1, 1)).clamp(req.low, req.high)


def _apply(act: nn.Module, y: Tensor) -> Tensor:
    """The activation as a function (a module called inside the traced ``_IntegerOp`` breaks the tracer)."""
    if isinstance(act, nn.LeakyReLU):
        return F.leaky_relu(y, act.negative_slope)
    return torch.relu(y)


def _monotone(act: nn.Module) -> bool:
    return isinstance(act, nn.ReLU) or (isinstance(act, nn.LeakyReLU) and act.negative_slope >= 0)


def fuse_requant(model: nn.Module, conv_type: type[nn.Module]) -> list[str]:
    """In place: every ``conv_type`` (``integer.IntegerConv2d``, passed in: ``integer`` imports this module) →
    monotone activation → ``conv_type`` run of an ``nn.Sequential`` whose requantization meets the rule becomes a
    ``RequantPair``; returns the fused first layers' names."""
    fused = []
    for name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 2):
            first, act, second = seq[i], seq[i + 1], seq[i + 2]
            if not (isinstance(first, conv_type) and _monotone(act) and isinstance(second, conv_type)
                    and second.grid is not None):
                continue
            req = fit(first, act, second.grid)
            if req is not None:
                seq[i], seq[i + 1], seq[i + 2] = RequantPair(first, act, second, req), nn.Identity(), nn.Identity()
                fused.append(f"{name}.{i}")
    return fused
