"""The integer model: a trained static-quantized network with every quantized conv/linear replaced by an
integer layer (``IntegerConv2d`` / ``IntegerLinear``) whose ONNX form is ``ConvInteger`` / ``MatMulInteger``
(or, where ``requant``'s rule proves it exact, a ``QLinearConv`` straight to the next layer's codes).

Which kernel a layer runs on (ONNX Runtime, CPU), chosen by what keeps every code and output as the reference:

- conv → monotone activation → conv (EDSR's blocks): the first is a requantizing ``QLinearConv`` when
  ``requant.fit`` proves its uint8 output equal to the next layer's codes for every sum, channel and border
  configuration (2-bit grids: yes; 4-bit ODM: its windows are finer than int8 weights can place, so no).
- every other integer conv: ``ConvInteger`` with the weight codes as uint8 (code + 128, zero point 128): ORT's
  uint8 × uint8 kernel is ~5x faster than its int8-weight one on AVX2 CPUs, the int32 sum is the same integer;
  then the float64 rescale below (its output is real: a residual add, the body's end, the tail).
- linear layers: ``MatMulInteger`` with int8 weights (faster there than uint8).
- input codes: ``Sub``/``Mul`` → ``QuantizeLinear`` → ``Clip`` (``_IntegerLayer.emit_codes``: the quantizer's
  float32 ops, one fused kernel).

An integer layer with input grid offset + k·s_a (``spec.ActGrid``) and weight codes·s_w computes

    y = s_a·s_w·Σ k·code  +  offset·s_w·Σ_valid code  +  bias

The first sum is the int32 accumulator of ``ConvInteger(k, code)``. The second is the grid offset folded
exactly: at each output position it sums the integer weights over the kernel taps that fall inside the image,
because zero padding pads the value 0, not l_a. It is ``Conv(ones-mask, Σ_cin code)`` (an integer border count,
constant in the interior); for a linear layer or an unpadded conv it is one constant per output channel. PAMS
grids have zero as a level (code Q), so the offset goes into ``ConvInteger``'s zero point instead, which ONNX
Runtime also uses as the padding value.

The rescale runs in float64 and is rounded to float32 once, at the end: y = ((acc·r + count·c) + b) with
r = s_a·s_w, c = l_a·s_w and b the bias, all float64 (``Cast(acc, double)``, ``Mul``, ``Add``, ``Cast(float)``).
The layers' PyTorch forward (``reference``, used by ``odm-sr-eval eval.exact=true``) computes the same float64
ops in the same order on exact integer sums, so both give the same float32 y bit for bit: float32(exact y) up
to a float64 round-off. A float32 rescale (or float32 fake quant) is off by a few float32 ulps, and where an
activation lies that close to a rounding boundary of the next quantizer the two sides pick different codes
(``bench/export_flips.py``, bench/README.md).

The FP convs whose outputs reach a quantizer through the skips (EDSR ``head.0``, RDN ``SFENet1/2``:
``Backbone.exact_fp_convs``) and an integer layer with an FP input are exact in the same sense (``ExactConv2d``):
PyTorch (oneDNN) and ORT (MLAS) sum a float32 conv in different orders, a few ulps apart, which was the
origin of every > 1 grey level pixel of the trained 2-bit EDSR on B100 once the rescale was exact. Their
graph is an exact im2col (a float32 Conv with one-hot kernels copies the taps) and a float64 ``MatMul``.

Codes are computed in the graph with the quantizer's own float32 operations in the same order
(``ActGrid.codes``), so they equal fake quant's codes for the same input. Layers without an input quantizer
take the grid of the quantizer that produced their input (PAMS/DDTB pattern: ``QuantResBlock.quant_act1``
feeds conv1, the RDB and dense-layer quantizers feed the dense convs); a layer whose input is FP (ODM-FQ's
``head.0`` sees the image, ``fq.quantize_image_input=false``; PAMS quirk ``conv1_raw_input``) runs a float
conv on its dequantized b-bit weights, as in training. Quantizers on skip operands stay fake quant (float
Round/Clip), everything else is the float network.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from odm_sr.quant.backbones import backbone_of
from odm_sr.quant.blocks import QuantDenseLayer, QuantRDB, QuantResBlock
from odm_sr.quant.layers import QuantConv2d, QuantLinear, QuantMixin
from odm_sr.quant.placement import replace_module

from .exact import EXACT_FP_OPS
from .graph_ops import ExactConv2d, _const, _IntegerOp, conv_geometry, emit_exact_conv, exact_conv, onnx_conv_attrs
from .spec import ACT_QUANTIZERS, ActGrid, ExportError, WeightCodes, act_grid, check_static, weight_codes


@dataclass
class IntegerSpec:
    """What the integer model needs beyond the network's structure: weight codes per quantized layer, the
    grid of every activation quantizer, and the float parameters (everything else)."""

    weights: dict[str, WeightCodes] = field(default_factory=dict)
    grids: dict[str, ActGrid] = field(default_factory=dict)
    fp: dict[str, Tensor] = field(default_factory=dict)


def weight_layers(model: nn.Module) -> dict[str, QuantMixin]:
    """Quantized layers whose weight is quantized (``QuantConv2d`` / ``QuantLinear``), in module order."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_quant is not None}


def act_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ACT_QUANTIZERS)}


def fp_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Parameters that stay float: all but quantized weights, quantizer parameters and MeanShift (rebuilt)."""
    from odm_sr.models.edsr import MeanShift

    skip = {id(m.weight) for m in weight_layers(model).values()}
    skip |= {id(p) for q in act_quantizers(model).values() for p in q.parameters()}
    skip |= {id(p) for m in model.modules() if isinstance(m, MeanShift) for p in m.parameters()}
    skip |= {id(p) for n, m in model.named_modules() if n.endswith("weight_quant") for p in m.parameters()}
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if id(p) not in skip}


def extract_spec(model: nn.Module) -> IntegerSpec:
    """The integer spec of a trained network (refuses DAQ/DDTB, ``spec.check_static``)."""
    check_static(model)
    layers = weight_layers(model)
    for name, m in model.named_modules():
        if isinstance(m, QuantMixin) and m.act_quant is not None and m.weight_quant is None \
                and isinstance(m, (QuantConv2d, QuantLinear)):
            raise ExportError(f"{name}: quantized input with a float weight (bits.w=32) has no integer form")
    if not layers:
        raise ExportError("the model has no quantized conv/linear layer (a float model: export it with "
                          "torch.onnx directly)")
    return IntegerSpec(weights={n: weight_codes(m) for n, m in layers.items()},
                       grids={n: act_grid(q) for n, q in act_quantizers(model).items()},
                       fp=fp_parameters(model))


def input_sources(model: nn.Module) -> dict[str, str | None]:
    """The quantizer that makes each quantized layer's input codes: its own, else the producing one (None: an
    FP input)."""
    fed: dict[int, str] = {}  # id(conv) -> name of the quantizer that produced its input
    for name, m in model.named_modules():
        if isinstance(m, QuantResBlock) and m.quant_act1 is not None and not m.conv1_raw_input:
            fed[id(m.body[0])] = f"{name}.quant_act1"
        elif isinstance(m, QuantRDB) and m.act_quant is not None:
            fed[id(m.convs[0].conv[0])] = f"{name}.act_quant"
        elif isinstance(m, QuantDenseLayer) and m.act_quant is not None:
            fed[id(m.conv[0])] = f"{name}.act_quant"
    return {name: f"{name}.act_quant" if layer.act_quant is not None else fed.get(id(layer))
            for name, layer in weight_layers(model).items()}


def input_grids(model: nn.Module, spec: IntegerSpec) -> dict[str, ActGrid | None]:
    """The grid of each quantized layer's input: its own quantizer's, else the producing quantizer's."""
    return {name: None if source is None else spec.grids[source]
            for name, source in input_sources(model).items()}


class _IntegerLayer(nn.Module):
    """Shared state of the integer conv and linear: weight codes, input grid, bias."""

    def __init__(self, codes: WeightCodes, grid: ActGrid | None, bias: Tensor | None) -> None:
        super().__init__()
        self.codes, self.grid = codes, grid
        self.bias_fp = None if bias is None else bias.detach().float().clone()

    def forward(self, x: Tensor) -> Tensor:
        return _IntegerOp.apply(x, self)

    def weight_values(self) -> Tensor:
        return self.codes.codes.double() * self.codes.scale

    def rescale(self) -> float:
        """r = s_a·s_w in float64 (the grid's float32 step times the weight scale)."""
        return float(self.grid.step()) * self.codes.scale

    def offset_scale(self) -> float:
        """c = l_a·s_w in float64 (0 for zero-point grids)."""
        return 0.0 if self.grid.zero_point is not None else self.grid.params[0] * self.codes.scale

    def bias64(self, folded: Tensor | None = None) -> Tensor:
        """Per-output-channel float64 constant: the bias, plus ``folded``·c (the offset of the taps that are
        all inside: unpadded conv, linear)."""
        bias = torch.zeros(self.codes.codes.shape[0], dtype=torch.float64)
        if self.bias_fp is not None:
            bias = bias + self.bias_fp.double()
        if folded is not None and self.grid is not None and self.grid.zero_point is None:
            bias = bias + folded * self.offset_scale()
        return bias

    def centred_codes(self, x: Tensor) -> Tensor:
        """k − zero point in float64 (exact small integers)."""
        k = self.grid.codes(x).double()
        return k if self.grid.zero_point is None else k - float(self.grid.zero_point)

    def finish(self, g, acc, count=None, bias: Tensor | None = None):
        """ONNX: float32(((double(acc)·r + double(count)·c) + b)), the float64 ops of ``reference``."""
        y = g.op("Mul", g.op("Cast", acc, to_i=11), _const(g, torch.tensor(self.rescale(), dtype=torch.float64)))
        if count is not None:
            c = _const(g, torch.tensor(self.offset_scale(), dtype=torch.float64))
            y = g.op("Add", y, g.op("Mul", g.op("Cast", count, to_i=11), c))
        return g.op("Cast", g.op("Add", y, _const(g, bias)), to_i=1)  # 11: DOUBLE, 1: FLOAT

    def emit_codes(self, g, x):
        """ONNX: uint8 codes of x with the quantizer's float32 ops (``ActGrid.codes``): ``Sub`` (ODM: x − l_a) or
        ``Mul`` (PAMS: x·Q), then ``QuantizeLinear`` (ORT divides by the scale and rounds half to even, as the
        quantizer does: ``(x − l_a)/s_a``, ``(x·Q)/α``) and a ``Clip`` to the codes; the clip of x to the range
        comes out the same after rounding where the range's ends give the end codes (checked here), else the
        quantizer's own Max → Min → Sub → Div → Round → Cast chain."""
        grid = self.grid
        if grid.kind == "odm":
            lower, upper = (_const(g, t) for t in grid.tensors())
            if not quantize_linear_ok(grid):
                v = g.op("Min", g.op("Max", x, lower), upper)
                r = g.op("Round", g.op("Div", g.op("Sub", v, lower), _const(g, grid.step())))
                return g.op("Cast", r, to_i=2)  # TensorProto.UINT8
            shifted, scale, zero = g.op("Sub", x, lower), grid.step(), 0
        else:
            (alpha,) = grid.tensors()
            a, q = _const(g, alpha), _const(g, torch.tensor(float(grid.levels)))
            if not quantize_linear_ok(grid):
                v = g.op("Min", g.op("Max", x, _const(g, -alpha)), a)
                return g.op("Cast", g.op("Add", g.op("Round", g.op("Div", g.op("Mul", v, q), a)), q), to_i=2)
            shifted, scale, zero = g.op("Mul", x, q), alpha, grid.levels
        codes = g.op("QuantizeLinear", shifted, _const(g, scale), _const(g, torch.tensor(zero, dtype=torch.uint8)))
        top = grid.levels if grid.kind == "odm" else 2 * grid.levels
        return g.op("Clip", codes, _const(g, torch.tensor(0, dtype=torch.uint8)),
                    _const(g, torch.tensor(top, dtype=torch.uint8)))

    def integer_operands(self, g, weight: Tensor, shifted: bool) -> list:
        """ONNX: (weight, x zero point[, weight zero point]) of ``ConvInteger``/``MatMulInteger``. ``shifted``: the
        weight codes as uint8 code + 128 with zero point 128 (ORT's uint8 × uint8 ``ConvInteger`` is ~5x faster
        than its int8-weight one on AVX2 CPUs, the same exact integer sum; ``MatMulInteger`` is faster with int8).
        The input's zero point: PAMS Q, ODM 0 (the offset is folded)."""
        x_zero = [_const(g, torch.tensor(self.grid.zero_point or 0, dtype=torch.uint8))]
        if not shifted:
            return [_const(g, weight), *(x_zero if self.grid.zero_point is not None else [])]
        codes = (weight.to(torch.int16) + WEIGHT_ZERO_POINT).to(torch.uint8)
        return [_const(g, codes), *x_zero, _const(g, torch.tensor(WEIGHT_ZERO_POINT, dtype=torch.uint8))]


WEIGHT_ZERO_POINT = 128  # int8 codes ±127 as uint8 1…255


def quantize_linear_ok(grid: ActGrid) -> bool:
    """True when the grid's range ends give its end codes (0 and n, or 0 and 2Q) with the quantizer's own ops,
    so that a value past an end rounds to at least (at most) that code and a ``Clip`` of the codes replaces
    the clip of the value; and the codes fit uint8."""
    ends = torch.stack(grid.tensors()) if grid.kind == "odm" else torch.cat([-grid.tensors()[0][None],
                                                                             grid.tensors()[0][None]])
    top = grid.levels if grid.kind == "odm" else 2 * grid.levels
    return top <= 255 and grid.codes(ends).tolist() == [0.0, float(top)]


class IntegerConv2d(_IntegerLayer):
    def __init__(self, conv: nn.Conv2d, codes: WeightCodes, grid: ActGrid | None) -> None:
        super().__init__(codes, grid, conv.bias)
        self.stride, self.padding, self.dilation, self.groups = conv_geometry(conv)
        if grid is None and self.groups != 1:
            raise ExportError("an integer layer with an FP input and groups > 1 has no exact form")

    def _conv(self, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def code_sums(self) -> Tensor:
        """Σ_cin code per output channel and tap, (C_o, 1, kh, kw), float64 integers."""
        return self.codes.codes.double().sum(dim=1, keepdim=True)

    def padded_offset(self) -> bool:
        """True when the offset needs a border count (an ODM grid with l_a ≠ 0 and some zero padding)."""
        return self.grid is not None and self.grid.zero_point is None and any(self.padding) \
            and self.grid.params[0] != 0.0

    def const_bias(self) -> Tensor:
        """The float64 per-channel constant: bias, plus the whole offset of an unpadded conv."""
        folded = None if self.padded_offset() else self.code_sums().sum(dim=(1, 2, 3))
        return self.bias64(folded)

    def reference(self, x: Tensor) -> Tensor:
        """The layer in PyTorch: the exact integer sums (float64 conv of integers), then ``finish``'s float64
        ops in the same order; an FP input (no grid): a float64 conv on the dequantized weights."""
        if self.grid is None:
            return exact_conv(x, self.weight_values(), self.bias64(), self.stride, self.padding, self.dilation)
        acc = self._conv(self.centred_codes(x), self.codes.codes.double())
        count = None
        if self.padded_offset():
            count = self._conv(torch.ones(1, 1, *x.shape[-2:], dtype=torch.float64), self.code_sums())
        return self.finish_sums(acc, count, self.const_bias().reshape(1, -1, 1, 1))

    def finish_sums(self, acc: Tensor, count: Tensor | None, bias: Tensor) -> Tensor:
        """float32(((acc·r + count·c) + b)) in float64 from the exact integer sums (float64 tensors): the ops of
        ``finish``, in its order (also the per-channel requantization tables of ``requant``)."""
        y = acc * self.rescale()
        if count is not None:
            y = y + count * self.offset_scale()
        return (y + bias).float()

    def _attrs(self) -> dict:
        return onnx_conv_attrs(self.codes.codes.shape[-2:], self.padding, self.stride, self.dilation)

    def emit(self, g, x):
        attrs = self._attrs()
        if self.grid is None:  # FP input: exact conv (float64 sums) on the dequantized b-bit weight
            return emit_exact_conv(g, x, self.weight_values(), self.bias64(), attrs)
        return self.emit_from_codes(g, self.emit_codes(g, x), x)

    def emit_from_codes(self, g, codes, x):
        """ONNX of the layer on its uint8 input codes (``x``: any tensor of the input's spatial size)."""
        attrs = self._attrs()
        operands = self.integer_operands(g, self.codes.codes, True)
        acc = g.op("ConvInteger", codes, *operands, group_i=self.groups, **attrs)
        count = self._border_count(g, x, attrs) if self.padded_offset() else None
        return self.finish(g, acc, count, self.const_bias().reshape(1, -1, 1, 1))

    def _border_count(self, g, x, attrs: dict):
        """Conv(ones (1, 1, H, W), Σ_cin code): at each output position the sum of the weight codes over the
        taps inside the image (float32 Conv of small integers: exact)."""
        shape = g.op("Shape", x)
        hw = g.op("Slice", shape, _const(g, torch.tensor([2])), _const(g, torch.tensor([4])))
        size = g.op("Concat", _const(g, torch.tensor([1, 1])), hw, axis_i=0)
        ones = g.op("ConstantOfShape", size, value_t=torch.tensor([1.0]))
        return g.op("Conv", ones, _const(g, self.code_sums().float()), **attrs)


class IntegerLinear(_IntegerLayer):
    def __init__(self, linear: nn.Linear, codes: WeightCodes, grid: ActGrid | None) -> None:
        super().__init__(codes, grid, linear.bias)

    def const_bias(self) -> Tensor:
        """The float64 per-output constant: bias + l_a·s_w·Σ code (every input is inside)."""
        return self.bias64(self.codes.codes.double().sum(dim=1))

    def reference(self, x: Tensor) -> Tensor:
        if self.grid is None:
            return F.linear(x.double(), self.weight_values(), self.bias64()).float()
        y = F.linear(self.centred_codes(x), self.codes.codes.double()) * self.rescale()
        return (y + self.const_bias()).float()

    def emit(self, g, x):
        if self.grid is None:
            y = g.op("MatMul", x, _const(g, self.weight_values().float().t().contiguous()))
            return g.op("Add", y, _const(g, self.bias64().float()))
        acc = g.op("MatMulInteger", self.emit_codes(g, x),
                   *self.integer_operands(g, self.codes.codes.t().contiguous(), False))
        return self.finish(g, acc, None, self.const_bias())


class FakeQuant(nn.Module):
    """A quantizer that stays fake quant (skip operands): the quantizer's float ops, traced as Round/Clip."""

    def __init__(self, grid: ActGrid) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: Tensor) -> Tensor:
        return self.grid.fake(x)


def integer_model(model: nn.Module, spec: IntegerSpec, requant: bool = True) -> nn.Module:
    """A copy of ``model`` (the quantized structure) running on ``spec``: integer layers + fake-quant skips;
    with ``requant``, the conv → activation → conv runs that meet ``requant``'s rule as ``QLinearConv``."""
    grids = input_grids(model, spec)
    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        params = dict(out.named_parameters())
        for name, value in spec.fp.items():
            params[name].copy_(value)
    for name, layer in weight_layers(out).items():
        cls = IntegerConv2d if isinstance(layer, nn.Conv2d) else IntegerLinear
        replace_module(out, name, cls(layer, spec.weights[name], grids[name]))
    modules = dict(out.named_modules())
    backbone = backbone_of(out)
    for name in backbone.exact_fp_convs:
        if type(modules.get(name)) is nn.Conv2d:  # a quantized one is an integer layer already
            replace_module(out, name, ExactConv2d(modules[name]))
    if backbone.family in EXACT_FP_OPS:  # SwinIR: LayerNorm, attention, GELU before the quantizers
        EXACT_FP_OPS[backbone.family](out)
    for name in act_quantizers(out):
        if not _is_consumed(name, spec):
            replace_module(out, name, FakeQuant(spec.grids[name]))
    if requant:
        from .requant import fuse_requant

        fuse_requant(out, IntegerConv2d)
    return out


def _is_consumed(quantizer: str, spec: IntegerSpec) -> bool:
    """True for a layer's own input quantizer (inside the integer layer now)."""
    owner, _, leaf = quantizer.rpartition(".")
    return leaf == "act_quant" and owner in spec.weights
