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

FQSR as released (``billhhh/FQSR@24cb67a``, ``method=fqsr``, ``fqsr.py``) differs: one quantizer shared by both
operands of an add, output quantizers, a learnable symmetric clip.

Checkpoint keys stay official (§2.2): blocks are replaced at their own index and keep ``body`` and
``res_scale``; the model's class becomes ``FullyQuantizedEDSR`` in place (``quantize_fully``, the surgery
FQSR shares, ``fqsr.py``); the skip quantizers live in
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
from .placement import LayerFactory, QuantizerFactory, all_conv_linear, swap_layers
from .quantizer import Quantizer

SC_OPERANDS = ("both", "identity")
IMAGE_INPUT_LAYER = "head.0"  # EDSR's first conv: its input is the mean-shifted image

SkipQuantizerFactory = Callable[[], nn.Module]
SkipFactory = Callable[[str], tuple[nn.Module | None, nn.Module | None]]


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


def quantize_fully(model: nn.Module, make_quantizers: QuantizerFactory, make_skips: SkipFactory | None,
                   make_layer: LayerFactory | None = None) -> nn.Module:
    """Full-quantization surgery on a float EDSR, in place (ODM-FQ here, FQSR in ``fqsr.py``); returns the model.

    Every conv head to tail (``placement.all_conv_linear``) gets ``make_quantizers(name, layer)``'s
    ``(act_quant, weight_quant)`` and is built by ``make_layer`` (default: ``layers.to_quantized``). Each add
    gets ``make_skips(site)``'s ``(res_quant, skip_quant)`` for its operands, ``site`` being the block's name
    (``body.{i}``) or ``""`` for the global skip; a None operand stays FP, the same module twice is one
    quantizer shared by both operands (FQSR). ``make_skips=None`` leaves every add FP.
    """
    if not isinstance(model, EDSR) or isinstance(model, FullyQuantizedEDSR):
        raise ValueError(f"fully-quantized mode is implemented for EDSR only (METHODS.md §4.5, Table S4), and "
                         f"needs a float model; got {type(model).__name__}")
    swap_layers(model, all_conv_linear(model), make_quantizers, *([make_layer] if make_layer else []))
    if make_skips is not None:
        for name, block in list(model.body.named_children()):
            if isinstance(block, ResBlock):
                model.body._modules[name] = FullyQuantizedResBlock(block, *make_skips(f"body.{name}"))
        model.__class__ = FullyQuantizedEDSR
        model.global_res_quant, model.global_skip_quant = make_skips("")
    return model


def quantize_odm_fq(model: nn.Module, fq: dict, make_quantizers: QuantizerFactory,
                    make_skip_quantizer: SkipQuantizerFactory | None) -> nn.Module:
    """ODM-FQ (module docstring): ``quantize_fully`` with ODM's quantizers, ``head.0``'s input left FP unless
    ``fq.quantize_image_input``, and a ``SkipQuantizer`` of its own on each operand of every add
    (``fq.sc_operands=both``; ``make_skip_quantizer=None``, e.g. ``bits.sc=32``, leaves the adds FP)."""
    def conv_quantizers(name: str, layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        act, weight = make_quantizers(name, layer)
        if name == IMAGE_INPUT_LAYER and not fq["quantize_image_input"]:
            act = None
        return act, weight

    def hosts(site: str) -> tuple[nn.Module, nn.Module]:
        return (SkipQuantizer(make_skip_quantizer(), fq["sc_in_mismatch"]),
                SkipQuantizer(make_skip_quantizer(), fq["sc_in_mismatch"]))

    both = fq["sc_operands"] == "both" and make_skip_quantizer is not None
    return quantize_fully(model, conv_quantizers, hosts if both else None)


def skip_quantizers(model: nn.Module) -> dict[str, SkipQuantizer]:
    """Every skip-operand quantizer host by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SkipQuantizer)}


__all__ = ["FullyQuantizedEDSR", "FullyQuantizedResBlock", "SkipQuantizer", "check_fq_config",
           "quantize_fully", "quantize_odm_fq", "skip_quantizers"]
