"""ODM-FQ: ODM's fully-quantized mode of EDSR (Table S4, ``method=odm_fq``): METHODS.md §4.5; every point is a
[decision] key ``fq.*``.

- **Convs.** Every conv from head to tail gets the method's W + A quantizers: ``head.0``,
  ``body.{i}.body.{0,2}``, ``body.{R}``, ``tail.0.*``, ``tail.1`` (not MeanShift;
  ``placement.all_conv_linear``).
  ``fq.quantize_image_input=false``: ``head.0``'s input, the mean-shifted 8-bit image, is not re-quantized
  (its weight is).
- **Skip connections** (``fq.sc_operands=both``): each ResBlock computes q_res(res_scale·body(x)) + q_skip(x),
  the top level q_res(body(x)) + q_skip(x); every q is its own activation quantizer at ``bits.sc``.
  ``identity`` leaves both operands of every add FP.
- **No output quantizers** (fixed, so not a key).
- ``fq.sc_in_mismatch``: the skip quantizers report M_i to the active ``MismatchRegistry`` (L_M, §5.4) or not.

FQSR as released (``billhhh/FQSR@24cb67a``) differs: one quantizer shared by both operands of an add, output
quantizers, a learnable symmetric clip.

Checkpoint keys stay official (§2.2): blocks are replaced at their own index and keep ``body`` and
``res_scale``; the model's class becomes ``FullyQuantizedEDSR`` in place; the skip quantizers live in
modules named ``*_quant``, which the loader ignores. Each one is hosted by a ``SkipQuantizer``, a
``QuantMixin`` with an ``act_quant`` and no weight, so percentile calibration (§5.2) and ``quantizers_off``
handle it like a layer input without any change to ``calibration.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from odm_sr.models.edsr import EDSR, ResBlock

from .base import check_bool, check_choice
from .layers import QuantMixin
from .mismatch import MismatchRegistry, active_registry
from .placement import QuantizerFactory, all_conv_linear, swap_layers
from .quantizer import Quantizer

SC_OPERANDS = ("both", "identity")
IMAGE_INPUT_LAYER = "head.0"  # EDSR's first conv: its input is the mean-shifted image

SkipQuantizerFactory = Callable[[], nn.Module]


def check_fq_config(fq: dict) -> None:
    """Validate the ``fq`` block (defaults: ``fq`` in ``conf/method/odm.yaml``); ValueError names the offending key."""
    for key in ("enabled", "quantize_image_input", "sc_in_mismatch"):
        check_bool(fq, key, "fq.")
    check_choice(fq, "sc_operands", SC_OPERANDS, "fq.")


class _MutedRegistry(MismatchRegistry):
    """A registry that drops every M_i: quantizers running inside it stay out of L_M."""

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass


class SkipQuantizer(QuantMixin, Quantizer):
    """Quantizes one operand of a residual add: ``act_quant(x)``, no weight.

    A ``QuantMixin`` so that calibration finds ``act_quant`` (``set_range``) and records this module's input.
    ``in_mismatch=False`` (``fq.sc_in_mismatch=false``) hides ``act_quant`` from the active mismatch registry.
    """

    def __init__(self, act_quant: nn.Module, in_mismatch: bool = True):
        super().__init__()
        self._attach(act_quant, None)
        self.in_mismatch = bool(in_mismatch)

    def forward(self, x: Tensor) -> Tensor:
        if self.in_mismatch or active_registry() is None:
            return self.quantized_input(x)
        with _MutedRegistry():
            return self.quantized_input(x)

    def extra_repr(self) -> str:
        return f"in_mismatch={self.in_mismatch}"


def _operand(quantizer: nn.Module | None, x: Tensor) -> Tensor:
    return quantizer(x) if quantizer is not None else x


class FullyQuantizedResBlock(nn.Module):
    """EDSR ResBlock with quantized add operands: q_res(res_scale·body(x)) + q_skip(x) (§4.5).

    ``body`` and ``res_scale`` are the wrapped block's own, so the keys stay ``body.{i}.body.{0,2}``.
    """

    def __init__(self, block: ResBlock, res_quant: nn.Module | None, skip_quant: nn.Module | None):
        super().__init__()
        self.body = block.body
        self.res_scale = block.res_scale
        self.res_quant = res_quant
        self.skip_quant = skip_quant

    def forward(self, x: Tensor) -> Tensor:
        res = self.body(x).mul(self.res_scale)
        return _operand(self.res_quant, res) + _operand(self.skip_quant, x)


class FullyQuantizedEDSR(EDSR):
    """EDSR whose global skip add quantizes both operands: q_res(body(x)) + q_skip(x) (§4.5).

    Not built directly: ``quantize_fully`` swaps a float EDSR's class to it, keeping every module and key.
    """

    global_res_quant: nn.Module | None
    global_skip_quant: nn.Module | None

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.sub_mean(x))
        x = _operand(self.global_res_quant, self.body(x)) + _operand(self.global_skip_quant, x)
        return self.add_mean(self.tail(x))


def quantize_fully(model: nn.Module, fq: dict, make_quantizers: QuantizerFactory,
                   make_skip_quantizer: SkipQuantizerFactory | None) -> nn.Module:
    """ODM-FQ surgery on a float EDSR, in place (module docstring); returns the model.

    ``make_quantizers(name, layer)`` gives a conv's ``(act_quant, weight_quant)``; ``make_skip_quantizer()``
    one skip-operand quantizer (None: skips stay FP, e.g. ``bits.sc=32``).
    """
    if not isinstance(model, EDSR) or isinstance(model, FullyQuantizedEDSR):
        raise ValueError(f"fq.enabled=true: fully-quantized mode is implemented for EDSR only (METHODS.md "
                         f"§4.5, Table S4), and needs a float model; got {type(model).__name__}")

    def conv_quantizers(name: str, layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        act, weight = make_quantizers(name, layer)
        if name == IMAGE_INPUT_LAYER and not fq["quantize_image_input"]:
            act = None
        return act, weight

    swap_layers(model, all_conv_linear(model), conv_quantizers)
    if fq["sc_operands"] == "both" and make_skip_quantizer is not None:
        _quantize_skips(model, make_skip_quantizer, fq["sc_in_mismatch"])
    return model


def _quantize_skips(model: EDSR, make_skip_quantizer: SkipQuantizerFactory, in_mismatch: bool) -> None:
    def host() -> SkipQuantizer:
        return SkipQuantizer(make_skip_quantizer(), in_mismatch)

    for name, block in list(model.body.named_children()):
        if isinstance(block, ResBlock):
            model.body._modules[name] = FullyQuantizedResBlock(block, host(), host())
    model.__class__ = FullyQuantizedEDSR
    model.global_res_quant = host()
    model.global_skip_quant = host()


def skip_quantizers(model: nn.Module) -> dict[str, SkipQuantizer]:
    """Every skip-operand quantizer host by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SkipQuantizer)}


__all__ = ["FullyQuantizedEDSR", "FullyQuantizedResBlock", "SkipQuantizer", "check_fq_config",
           "quantize_fully", "skip_quantizers"]
