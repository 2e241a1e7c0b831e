"""The opt-in inexact fast mode of the integer graph (``odm-sr-export --mode fast-inexact``; EDSR family only).

The default graph (``--mode exact``) is exact (README "Deploy"); its speed is bounded by what must stay exact,
above all the second conv of each residual block, whose real-valued output feeds the residual add
(``ConvInteger`` + the float64 rescale: ~2x a ``QLinearConv``). This mode runs those on ``QLinearConv`` too,
**at a measured PSNR cost** (bench/README.md "Speed"). **The rule**:

- Each residual block's ``conv → ReLU → conv`` is one chain of two ``QLinearConv``: the first to the second's
  codes (the exact requantization of ``requant.fit`` where it holds, else the affine one below: a code can then
  differ at a rounding edge, and at the image border by the grid offset's residue δ·Σ w_outside,
  δ = l_a + z·s_a, |δ| ≤ s_a/2), the second to **8-bit codes of the branch output** on a uint8 grid whose range
  is the min/max of that output over the calibration images (values outside saturate), then
  ``DequantizeLinear``; the skip and the residual add stay float32.
- The body-end conv (float in the network) runs on 8-bit activations (a uint8 grid from the calibration
  min/max, zero included: zero padding stays exact) and 7-bit symmetric per-channel weights (±63: u8 × s8 pairs
  stay below AVX2's 16-bit saturation).
- The tail (upsampler, last conv, ``add_mean``) is the float32 tail of the default graph, one composed conv
  (``tail.py``). Until it was composed, this mode ran the upsampler convs on 8-bit codes and the last conv on
  their dequantized codes: the composed float tail is both faster (10x fewer MACs) and exact.
- The head conv is a plain float32 ``Conv`` (the exact graph's float64 im2col is dropped).
- Every ``QLinearConv`` is ``round(float32(A)·M)`` of an int32 ``A`` (weights scaled by the largest integer K
  that keeps them in int8 and the u8 × s8 pairs below 2^15), y zero point 0; ``simulate`` is its PyTorch
  twin, the forward of the fast model.

Calibration: ``--calib-images N`` whole LR images of the training set ``sr291`` (T91 + BSD200, evenly spaced,
MATLAB bicubic at the model's scale) through the exact integer model (``calibration_images``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from odm_sr.quant.backbones import backbone_of

from .graph_ops import ExactConv2d, _const, _IntegerOp, onnx_conv_attrs
from .requant import Requant, RequantPair, _monotone, emit_qlinear, simulate
from .spec import ActGrid, ExportError

EXACT, FAST = "exact", "fast-inexact"
MODES = (EXACT, FAST)
WEIGHT_LEVELS = 63  # 7-bit symmetric weights of the float convs
PAIR_LIMIT = 2 ** 14 - 1  # x·w of one u8 × s8 product: a pair of them stays below 2^15


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ExportError(f"export mode {mode!r}: expected one of {', '.join(MODES)} ({FAST}: opt-in, inexact)")
    return mode


@dataclass(frozen=True)
class Uint8Grid:
    """value = (q − zero)·scale, q ∈ 0…255 (``QuantizeLinear``/``DequantizeLinear``); zero is a level."""

    scale: float  # float32 value
    zero: int

    @classmethod
    def of_range(cls, lo: float, hi: float) -> Uint8Grid:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = float(torch.tensor((hi - lo) / 255.0 if hi > lo else 1.0, dtype=torch.float32))
        return cls(scale, min(max(round(-lo / scale), 0), 255))

    def quantize(self, x: Tensor) -> Tensor:
        """``QuantizeLinear`` (no x/1, x + 0, x − 0, x·1 or float32 → float32 cast here and in ``dequantize``: the
        tracer's peephole pass drops them from the traced forward and then fails)."""
        q = torch.round(x / self.scale if self.scale != 1.0 else x)
        return (q + self.zero if self.zero else q).clamp(0, 255)

    def dequantize(self, q: Tensor) -> Tensor:
        q = q - self.zero if self.zero else q
        return q * self.scale if self.scale != 1.0 else q


def affine_requant(codes: Tensor, unit: Tensor, const: Tensor, zero: int, x_max: int, lo: float, step: float,
                   low: int = 0, high: int = 255) -> Requant:
    """QLinearConv parameters of q = clamp(round((y − lo)/step), low, high), y_o = unit_o·Σ (x − zero)·codes_o
    + const_o (``unit``, ``const``: float64 (C_o,)); weights K·codes, K as large as int8 and the pair limit let."""
    w_max = max(int(codes.abs().max()), 1)
    k = max(1, min(127 // w_max, PAIR_LIMIT // (max(x_max, 1) * w_max)))
    bias = torch.round(k * (const - lo) / unit)
    if bool((bias.abs() >= 2 ** 31).any()):
        raise ExportError(f"{FAST}: an int32 bias overflows (range {lo}, step {step}); use --mode {EXACT}")
    return Requant((codes.to(torch.int32) * k), (unit / (k * step)).float(), bias.to(torch.int32), zero, (),
                   low, high)


def int7_weights(conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel weight codes in ±``WEIGHT_LEVELS`` and their float64 scales."""
    w = conv.weight.detach().double()
    scale = w.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12) / WEIGHT_LEVELS
    return torch.round(w / scale.reshape(-1, 1, 1, 1)).to(torch.int32), scale


@dataclass
class Stage:
    """One ``QLinearConv``."""

    req: Requant
    attrs: dict


class FastChain(nn.Module):
    """uint8 codes through ``stages`` of ``QLinearConv``, dequantized at the end (``out``). The codes come from
    ``source`` (an integer layer's code chain) or from a float input on the grid ``start`` (``QuantizeLinear``)."""

    def __init__(self, stages: list[Stage], out: Uint8Grid, source: nn.Module | None = None,
                 start: Uint8Grid | None = None) -> None:
        super().__init__()
        self.stages, self.out, self.source, self.start = stages, out, source, start

    def forward(self, x: Tensor) -> Tensor:
        return _IntegerOp.apply(x, self)

    def reference(self, x: Tensor) -> Tensor:
        q = self.source.grid.codes(x) if self.source is not None else self.start.quantize(x)
        for st in self.stages:
            q = simulate(st.req, q, st.attrs)
        return self.out.dequantize(q)

    def emit(self, g, x):
        if self.source is not None:
            q = self.source.emit_codes(g, x)
        else:
            q = g.op("QuantizeLinear", x, _const(g, torch.tensor(self.start.scale)),
                     _const(g, torch.tensor(self.start.zero, dtype=torch.uint8)))
        for st in self.stages:
            q = emit_qlinear(g, q, st.req, st.attrs, clip=(st.req.low, st.req.high) != (0, 255))
        return g.op("DequantizeLinear", q, _const(g, torch.tensor(self.out.scale)),
                    _const(g, torch.tensor(self.out.zero, dtype=torch.uint8)))


def grid_bounds(grid: ActGrid) -> tuple[float, float]:
    """(lowest value, step) of an activation grid: code = round((y − lo)/step) (PAMS: lo = −α)."""
    return (grid.params[0] if grid.kind == "odm" else -grid.params[0]), float(grid.step())


def code_requant(layer: nn.Module, lo: float, step: float, low: int, high: int) -> Requant:
    """The affine ``QLinearConv`` of an integer conv (``integer.IntegerConv2d``) from its input codes: ODM codes
    shifted by z = round(−l_a/s_a) (ORT pads with z: exact but for δ = l_a + z·s_a at the border), PAMS by Q."""
    grid, codes = layer.grid, layer.codes.codes
    r, sums = layer.rescale(), codes.double().sum(dim=(1, 2, 3))
    if grid.zero_point is not None:
        zero, const = grid.zero_point, layer.const_bias()
    else:
        zero = min(max(round(-grid.params[0] / float(grid.step())), 0), 127)
        const = layer.const_bias() + r * zero * sums + (layer.offset_scale() * sums if layer.padded_offset() else 0)
    top = grid.levels if grid.kind == "odm" else 2 * grid.levels
    return affine_requant(codes, torch.full_like(sums, r), const, zero, max(top, zero), lo, step, low, high)


def float_requant(conv: nn.Conv2d, start: Uint8Grid, lo: float, step: float) -> Requant:
    """The affine ``QLinearConv`` of a float conv on 8-bit codes (grid ``start``) to the uint8 grid (lo, step)."""
    codes, scale = int7_weights(conv)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(codes.shape[0], dtype=torch.float64)
    return affine_requant(codes, start.scale * scale, bias, start.zero, 255, lo, step)


def calibration_images(scale: int, count: int, pixel_range: float, data_root=None) -> list[Tensor]:
    """``count`` whole LR images of ``sr291`` (evenly spaced over T91 + BSD200), in the pixel range."""
    if count < 1:
        raise ExportError(f"--calib-images {count}: expected at least 1 calibration image")
    from odm_sr.data.registry import build_source

    source = build_source("sr291", "train", scale, data_root)
    picks = sorted({round(i * (len(source) - 1) / max(count - 1, 1)) for i in range(count)})
    return [source[i]["lr"][None] * pixel_range for i in picks]


def _ranges(model: nn.Module, modules: dict[str, nn.Module], calib: list[Tensor]) -> dict[str, tuple]:
    """(input min, input max, output min, output max) of each module over the calibration images."""
    stats: dict[str, list[float]] = {}

    def hook(name):
        def record(_, inputs, output):
            new = [float(inputs[0].min()), float(inputs[0].max()), float(output.min()), float(output.max())]
            old = stats.get(name, new)
            stats[name] = [min(old[0], new[0]), max(old[1], new[1]), min(old[2], new[2]), max(old[3], new[3])]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for x in calib:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: tuple(v) for n, v in stats.items()}


def _block_runs(model: nn.Module) -> list[tuple[nn.Sequential, int]]:
    """(Sequential, index) of every ``RequantPair`` and every unfused integer conv → ReLU → integer conv."""
    from .integer import IntegerConv2d

    runs = []
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 2):
            if isinstance(seq[i], RequantPair) or (
                    isinstance(seq[i], IntegerConv2d) and seq[i].grid is not None and _monotone(seq[i + 1])
                    and isinstance(seq[i + 2], IntegerConv2d) and seq[i + 2].grid is not None):
                runs.append((seq, i))
    return runs


def _check(model: nn.Module) -> None:
    family = backbone_of(model).family
    if family != "edsr":
        raise ExportError(f"--mode {FAST} is for EDSR-family networks only ({model.name} is {family}); "
                          f"export it with --mode {EXACT}")
    convs = [m for m in model.tail.modules() if hasattr(m, "weight") or hasattr(m, "codes")]
    if not all(type(m) is nn.Conv2d for m in convs) or type(model.body[-1]) is not nn.Conv2d:
        raise ExportError(f"--mode {FAST}: the body-end and tail convs must be float (a fully quantized model, "
                          f"e.g. ODM-FQ, has integer ones); export it with --mode {EXACT}")


def fast_model(int_model: nn.Module, calib: list[Tensor]) -> nn.Module:
    """A copy of the exact integer model (``integer.integer_model``) in the fast mode (module docstring); the
    8-bit ranges from ``calib`` (LR images in the pixel range) through the exact model."""
    from .requant import _apply, _top_code

    _check(int_model)
    out = copy.deepcopy(int_model)
    runs = _block_runs(out)
    watch = {f"run.{j}": seq[i] if isinstance(seq[i], RequantPair) else seq[i + 2] for j, (seq, i) in enumerate(runs)}
    watch["body_end"] = out.body[-1]
    ranges = _ranges(out, watch, calib)
    for j, (seq, i) in enumerate(runs):
        if isinstance(seq[i], RequantPair):
            first, second, req = seq[i].first, seq[i].second, seq[i].req
        else:
            first, act, second = seq[i], seq[i + 1], seq[i + 2]
            low = int(second.grid.codes(_apply(act, torch.tensor(-3.0e38))))
            req = code_requant(first, *grid_bounds(second.grid), low, _top_code(second.grid))
        res = Uint8Grid.of_range(*ranges[f"run.{j}"][2:])
        stages = [Stage(req, first._attrs()), Stage(code_requant(second, -res.zero * res.scale, res.scale, 0, 255),
                                                    second._attrs())]
        seq[i], seq[i + 1], seq[i + 2] = FastChain(stages, res, source=first), nn.Identity(), nn.Identity()
    end, (lo, hi, y_lo, y_hi) = out.body[-1], ranges["body_end"]
    start, res = Uint8Grid.of_range(lo, hi), Uint8Grid.of_range(y_lo, y_hi)
    attrs = onnx_conv_attrs(end.weight.shape[-2:], end.padding, end.stride, end.dilation)
    out.body[-1] = FastChain([Stage(float_requant(end, start, -res.zero * res.scale, res.scale), attrs)], res,
                             start=start)
    if isinstance(out.head[0], ExactConv2d):  # a plain float32 conv
        out.head[0] = _plain_conv(out.head[0])
    return out


def _plain_conv(exact: ExactConv2d) -> nn.Conv2d:
    c_out, c_in, kh, kw = exact.weight64.shape
    conv = nn.Conv2d(c_in, c_out, (kh, kw), exact.stride, exact.padding, exact.dilation, bias=exact.bias64 is not None)
    with torch.no_grad():
        conv.weight.copy_(exact.weight64.float())
        if exact.bias64 is not None:
            conv.bias.copy_(exact.bias64.float())
    return conv
