"""The integer model: a trained static-quantized network with every quantized conv/linear replaced by an
integer layer (``IntegerConv2d`` / ``IntegerLinear``) whose ONNX form is ``ConvInteger`` / ``MatMulInteger``.

An integer layer with input grid offset + k·s_a (``spec.ActGrid``) and weight codes·s_w computes

    y = s_a·s_w·Σ k·code  +  offset·s_w·Σ_valid code  +  bias

The first sum is the int32 accumulator of ``ConvInteger(k, code)``. The second is the grid offset folded
exactly: at each output position it sums the integer weights over the kernel taps that fall inside the image,
because zero padding pads the value 0, not l_a. It is ``Conv(ones-mask, Σ_cin code)`` (a border map, constant
in the interior); for a linear layer or an unpadded conv it is one constant per output channel. PAMS grids have
zero as a level (code Q), so the offset goes into ``ConvInteger``'s zero point instead, which ONNX Runtime
also uses as the padding value.

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

from odm_sr.quant.blocks import QuantDenseLayer, QuantRDB, QuantResBlock
from odm_sr.quant.layers import QuantConv2d, QuantLinear, QuantMixin
from odm_sr.quant.placement import replace_module

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


def input_grids(model: nn.Module, spec: IntegerSpec) -> dict[str, ActGrid | None]:
    """The grid of each quantized layer's input: its own quantizer's, else the producing quantizer's."""
    fed: dict[int, str] = {}  # id(conv) -> name of the quantizer that produced its input
    for name, m in model.named_modules():
        if isinstance(m, QuantResBlock) and m.quant_act1 is not None and not m.conv1_raw_input:
            fed[id(m.body[0])] = f"{name}.quant_act1"
        elif isinstance(m, QuantRDB) and m.act_quant is not None:
            fed[id(m.convs[0].conv[0])] = f"{name}.act_quant"
        elif isinstance(m, QuantDenseLayer) and m.act_quant is not None:
            fed[id(m.conv[0])] = f"{name}.act_quant"
    grids: dict[str, ActGrid | None] = {}
    for name, layer in weight_layers(model).items():
        source = f"{name}.act_quant" if layer.act_quant is not None else fed.get(id(layer))
        grids[name] = spec.grids[source] if source is not None else None
    return grids


class _IntegerOp(torch.autograd.Function):
    """Torch: the layer's exact integer arithmetic (float64 reference); ONNX: ``layer.emit``."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: nn.Module) -> Tensor:
        return layer.reference(x)

    @staticmethod
    def symbolic(g, x, layer):
        return layer.emit(g, x)


class _IntegerLayer(nn.Module):
    """Shared state of the integer conv and linear: weight codes, input grid, bias."""

    def __init__(self, codes: WeightCodes, grid: ActGrid | None, bias: Tensor | None) -> None:
        super().__init__()
        self.codes, self.grid = codes, grid
        self.bias_fp = None if bias is None else bias.detach().float().clone()

    def forward(self, x: Tensor) -> Tensor:
        return _IntegerOp.apply(x, self)

    def input_values(self, x: Tensor) -> Tensor:
        """The float64 values the integer path sees: offset + k·s_a, or x itself (FP input)."""
        return x.double() if self.grid is None else self.grid.dequantize(self.grid.codes(x))

    def weight_values(self) -> Tensor:
        return self.codes.codes.double() * self.codes.scale

    def rescale(self) -> float:
        """s_a·s_w in float64 (rounded once to float32 in the graph)."""
        return float(self.grid.step()) * self.codes.scale

    def emit_codes(self, g, x):
        """ONNX: uint8 codes of x with the quantizer's float32 ops (``ActGrid.codes``)."""
        grid = self.grid
        if grid.kind == "odm":
            lower, upper = (_const(g, t) for t in grid.tensors())
            v = g.op("Min", g.op("Max", x, lower), upper)
            r = g.op("Round", g.op("Div", g.op("Sub", v, lower), _const(g, grid.step())))
        else:
            (alpha,) = grid.tensors()
            a, q = _const(g, alpha), _const(g, torch.tensor(float(grid.levels)))
            v = g.op("Min", g.op("Max", x, _const(g, -alpha)), a)
            r = g.op("Add", g.op("Round", g.op("Div", g.op("Mul", v, q), a)), q)
        return g.op("Cast", r, to_i=2)  # TensorProto.UINT8

    def zero_point(self, g) -> list:
        zp = self.grid.zero_point
        return [] if zp is None else [_const(g, torch.tensor(zp, dtype=torch.uint8))]

    def offset_weight_sum(self, dims: tuple[int, ...]) -> Tensor:
        """offset·s_w·Σ code over ``dims`` in float64 (0 for zero-point grids)."""
        if self.grid.zero_point is not None:
            return torch.zeros(())
        return self.codes.codes.double().sum(dim=dims) * (self.grid.params[0] * self.codes.scale)


def _const(g, value: Tensor):
    return g.op("Constant", value_t=value)


class IntegerConv2d(_IntegerLayer):
    def __init__(self, conv: nn.Conv2d, codes: WeightCodes, grid: ActGrid | None) -> None:
        super().__init__(codes, grid, conv.bias)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ExportError(f"conv padding {conv.padding!r}/{conv.padding_mode!r}: only explicit zero padding")
        self.stride, self.padding = tuple(conv.stride), tuple(conv.padding)
        self.dilation, self.groups = tuple(conv.dilation), conv.groups

    def _conv(self, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def reference(self, x: Tensor) -> Tensor:
        bias = None if self.bias_fp is None else self.bias_fp.double()
        return self._conv(self.input_values(x), self.weight_values(), bias).float()

    def _attrs(self) -> dict:
        kh, kw = self.codes.codes.shape[-2:]
        ph, pw = self.padding
        return {"kernel_shape_i": [kh, kw], "pads_i": [ph, pw, ph, pw], "strides_i": list(self.stride),
                "dilations_i": list(self.dilation)}

    def emit(self, g, x):
        attrs = self._attrs()
        bias = torch.zeros(self.codes.codes.shape[0], dtype=torch.float64)
        if self.bias_fp is not None:
            bias = bias + self.bias_fp.double()
        if self.grid is None:  # FP input: float conv on the dequantized b-bit weight
            w = _const(g, self.weight_values().float())
            return g.op("Conv", x, w, _const(g, bias.float()), group_i=self.groups, **attrs)
        acc = g.op("ConvInteger", self.emit_codes(g, x), _const(g, self.codes.codes), *self.zero_point(g),
                   group_i=self.groups, **attrs)
        y = g.op("Mul", g.op("Cast", acc, to_i=1), _const(g, torch.tensor(self.rescale(), dtype=torch.float32)))
        if self.grid.zero_point is None:
            border = self.offset_weight_sum((1,))[:, None]  # (C_o, 1, kh, kw): Σ_cin code · l_a·s_w
            if any(self.padding):
                y = g.op("Add", y, self._border_map(g, x, border, attrs))
            else:  # no padding: every tap is inside, the fold is a constant per channel
                bias = bias + border.sum(dim=(1, 2, 3))
        return g.op("Add", y, _const(g, bias.float().reshape(1, -1, 1, 1)))

    def _border_map(self, g, x, border: Tensor, attrs: dict):
        """Conv(ones (1, 1, H, W), border kernel): the folded offset at each output position."""
        shape = g.op("Shape", x)
        hw = g.op("Slice", shape, _const(g, torch.tensor([2])), _const(g, torch.tensor([4])))
        size = g.op("Concat", _const(g, torch.tensor([1, 1])), hw, axis_i=0)
        ones = g.op("ConstantOfShape", size, value_t=torch.tensor([1.0]))
        return g.op("Conv", ones, _const(g, border.float()), **attrs)


class IntegerLinear(_IntegerLayer):
    def __init__(self, linear: nn.Linear, codes: WeightCodes, grid: ActGrid | None) -> None:
        super().__init__(codes, grid, linear.bias)

    def reference(self, x: Tensor) -> Tensor:
        bias = None if self.bias_fp is None else self.bias_fp.double()
        return F.linear(self.input_values(x), self.weight_values(), bias).float()

    def emit(self, g, x):
        bias = torch.zeros(self.codes.codes.shape[0], dtype=torch.float64)
        if self.bias_fp is not None:
            bias = bias + self.bias_fp.double()
        if self.grid is None:
            y = g.op("MatMul", x, _const(g, self.weight_values().float().t().contiguous()))
            return g.op("Add", y, _const(g, bias.float()))
        acc = g.op("MatMulInteger", self.emit_codes(g, x), _const(g, self.codes.codes.t().contiguous()),
                   *self.zero_point(g))
        y = g.op("Mul", g.op("Cast", acc, to_i=1), _const(g, torch.tensor(self.rescale(), dtype=torch.float32)))
        return g.op("Add", y, _const(g, (bias + self.offset_weight_sum((1,))).float()))


class FakeQuant(nn.Module):
    """A quantizer that stays fake quant (skip operands): the quantizer's float ops, traced as Round/Clip."""

    def __init__(self, grid: ActGrid) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: Tensor) -> Tensor:
        return self.grid.fake(x)


def integer_model(model: nn.Module, spec: IntegerSpec) -> nn.Module:
    """A copy of ``model`` (the quantized structure) running on ``spec``: integer layers + fake-quant skips."""
    grids = input_grids(model, spec)
    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        params = dict(out.named_parameters())
        for name, value in spec.fp.items():
            params[name].copy_(value)
    for name, layer in weight_layers(out).items():
        cls = IntegerConv2d if isinstance(layer, nn.Conv2d) else IntegerLinear
        replace_module(out, name, cls(layer, spec.weights[name], grids[name]))
    for name in act_quantizers(out):
        if not _is_consumed(name, spec):
            replace_module(out, name, FakeQuant(spec.grids[name]))
    return out


def _is_consumed(quantizer: str, spec: IntegerSpec) -> bool:
    """True for a layer's own input quantizer (inside the integer layer now)."""
    owner, _, leaf = quantizer.rpartition(".")
    return leaf == "act_quant" and owner in spec.weights
