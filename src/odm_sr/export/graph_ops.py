"""The traced integer op and the exact float conv shared by the integer layers (``integer``) and the requantizing
pairs (``requant``).

``_IntegerOp`` runs a layer's ``reference`` in PyTorch and emits its ``emit`` nodes in the ONNX graph.
``ExactConv2d``: an FP conv computed exactly in both (an exact im2col and a float64 ``MatMul``, rounded to
float32 once), for the FP convs whose outputs reach a quantizer (EDSR ``head.0``, RDN ``SFENet1/2``) and the
integer layers with an FP input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .spec import ExportError


class _IntegerOp(torch.autograd.Function):
    """Torch: the layer's exact integer arithmetic (``layer.reference``, float64); ONNX: ``layer.emit``."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: nn.Module) -> Tensor:
        return layer.reference(x)

    @staticmethod
    def symbolic(g, x, layer):
        return layer.emit(g, x)


def _const(g, value: Tensor):
    return g.op("Constant", value_t=value)


def onnx_conv_attrs(kernel_hw, padding, stride, dilation) -> dict:
    """ONNX ``Conv``-family attributes (symmetric padding) of a 2-d conv's geometry."""
    ph, pw = padding
    return {"kernel_shape_i": list(kernel_hw), "pads_i": [ph, pw, ph, pw], "strides_i": list(stride),
            "dilations_i": list(dilation)}


def conv_geometry(conv: nn.Conv2d) -> tuple[tuple, tuple, tuple, int]:
    """(stride, padding, dilation, groups) of a conv with explicit zero padding (else ExportError)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ExportError(f"conv padding {conv.padding!r}/{conv.padding_mode!r}: only explicit zero padding")
    return tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups


def exact_conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation) -> Tensor:
    """float32(conv(x, weight) + bias) with float64 sums (``weight``, ``bias``: float64)."""
    return F.conv2d(x.double(), weight, bias, stride, padding, dilation).float()


def emit_exact_conv(g, x, weight: Tensor, bias: Tensor | None, attrs: dict):
    """ONNX of ``exact_conv``: the taps copied by a float32 Conv with one-hot kernels (exact: x·1 + 0s), then
    a float64 MatMul with the weight and the float64 bias, rounded to float32 once."""
    c_out, c_in, kh, kw = weight.shape
    taps = c_in * kh * kw
    one_hot = torch.eye(taps, dtype=torch.float32).reshape(taps, c_in, kh, kw)
    patches = g.op("Transpose", g.op("Cast", g.op("Conv", x, _const(g, one_hot), **attrs), to_i=11),
                   perm_i=[0, 2, 3, 1])  # (N, H', W', taps), float64
    y = g.op("MatMul", patches, _const(g, weight.reshape(c_out, taps).t().contiguous()))
    if bias is not None:
        y = g.op("Add", y, _const(g, bias))
    return g.op("Cast", g.op("Transpose", y, perm_i=[0, 3, 1, 2]), to_i=1)


class ExactConv2d(nn.Module):
    """An FP conv computed exactly (``exact_conv``) in PyTorch and in the graph (``emit_exact_conv``)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, groups = conv_geometry(conv)
        if groups != 1:
            raise ExportError("ExactConv2d: groups > 1")
        self.weight64 = conv.weight.detach().double().clone()
        self.bias64 = None if conv.bias is None else conv.bias.detach().double().clone()

    def forward(self, x: Tensor) -> Tensor:
        return _IntegerOp.apply(x, self)

    def reference(self, x: Tensor) -> Tensor:
        return exact_conv(x, self.weight64, self.bias64, self.stride, self.padding, self.dilation)

    def emit(self, g, x):
        kh, kw = self.weight64.shape[-2:]
        ph, pw = self.padding
        attrs = {"kernel_shape_i": [kh, kw], "pads_i": [ph, pw, ph, pw], "strides_i": list(self.stride),
                 "dilations_i": list(self.dilation)}
        return emit_exact_conv(g, x, self.weight64, self.bias64, attrs)
