"""The one function that swaps a model's layers for quantized ones (which layers: ``quant.backbones``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .layers import to_quantized


def all_conv_linear(model: nn.Module) -> list[str]:
    """Every conv/linear except MeanShift (full quantization, METHODS.md §4.5)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not n.endswith(("sub_mean", "add_mean"))]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace ``model.<name>`` in place (also inside a Sequential, keeping its index)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = new


QuantizerFactory = Callable[[str, nn.Module], tuple[nn.Module | None, nn.Module | None]]
# (name, float layer, act_quant, weight_quant) -> the quantized layer sharing the float layer's parameters
LayerFactory = Callable[[str, nn.Module, nn.Module | None, nn.Module | None], nn.Module]


def _twin(name: str, layer: nn.Module, act_q: nn.Module | None, w_q: nn.Module | None) -> nn.Module:
    return to_quantized(layer, act_q, w_q)


def swap_layers(model: nn.Module, names: list[str], make_quantizers: QuantizerFactory,
                make_layer: LayerFactory = _twin) -> nn.Module:
    """Swap each named conv/linear for its quantized twin; ``make_quantizers(name, layer)`` returns
    ``(act_quant, weight_quant)``, ``make_layer`` builds the twin (default ``layers.to_quantized``; FQSR's
    conv also quantizes its output). Returns the model (modified in place)."""
    for name in names:
        layer = model.get_submodule(name)
        act_q, w_q = make_quantizers(name, layer)
        replace_module(model, name, make_layer(name, layer, act_q, w_q))
    return model
