"""Quantized conv / linear layers that take their quantizers by composition.

A quantized layer is its float counterpart with two optional submodules, ``act_quant`` (applied to the input)
and ``weight_quant`` (applied to the weight). The float parameters keep their names, so official checkpoints
still load with ``strict=True`` (METHODS.md §2.2); the loader ignores the quantizer keys.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class QuantMixin:
    """Shared behaviour of quantized layers: apply the input and weight quantizers, then the float op."""

    act_quant: nn.Module | None
    weight_quant: nn.Module | None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # the float layer (or module) it is mixed into
        self.act_quant = None  # both always present: None until ``_attach`` (and where there is none)
        self.weight_quant = None

    def _attach(self, act_quant: nn.Module | None, weight_quant: nn.Module | None) -> None:
        self.act_quant = act_quant
        self.weight_quant = weight_quant

    def _adopt(self, layer: nn.Module, act_quant: nn.Module | None, weight_quant: nn.Module | None):
        """Take ``layer``'s weight and bias (the same Parameters) and attach the quantizers; returns self."""
        self.weight = layer.weight
        self.bias = layer.bias
        self._attach(act_quant, weight_quant)
        return self

    def quantized_input(self, x: Tensor) -> Tensor:
        return self.act_quant(x) if self.act_quant is not None else x

    def quantized_weight(self) -> Tensor:
        w = self.weight
        return self.weight_quant(w) if self.weight_quant is not None else w


class QuantConv2d(QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose input and weight pass through quantizers."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, act_quant: nn.Module | None, weight_quant: nn.Module | None):
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                device=conv.weight.device, dtype=conv.weight.dtype)
        return q._adopt(conv, act_quant, weight_quant)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` whose input and weight pass through quantizers."""

    @classmethod
    def from_float(cls, linear: nn.Linear, act_quant: nn.Module | None, weight_quant: nn.Module | None):
        q = cls(linear.in_features, linear.out_features, linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype)
        return q._adopt(linear, act_quant, weight_quant)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


def to_quantized(module: nn.Module, act_quant: nn.Module | None, weight_quant: nn.Module | None) -> nn.Module:
    """The quantized twin of a float conv/linear, sharing its parameters."""
    if isinstance(module, nn.Conv2d):
        return QuantConv2d.from_float(module, act_quant, weight_quant)
    if isinstance(module, nn.Linear):
        return QuantLinear.from_float(module, act_quant, weight_quant)
    raise TypeError(f"cannot quantize {type(module).__name__}: expected nn.Conv2d or nn.Linear")


def quantized_layers(model: nn.Module) -> dict[str, QuantMixin]:
    """All quantized layers of ``model`` by qualified name, in forward-definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantMixin)}
