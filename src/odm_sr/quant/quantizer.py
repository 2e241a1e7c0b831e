"""The base class of every weight and activation quantizer (ODM, LSQ, PAMS, DAQ, DDTB and ODM-FQ's skip hosts).

Code that looks for quantizers (analysis, export, the methods) tests ``isinstance(m, Quantizer)`` instead of
matching class or module names, and reads what it needs through the interface declared here (each attribute
and method has its default in this class, overridden by the quantizers it does not fit), never by probing for
attributes. The base adds no parameters, buffers or state, so state-dict keys are those of the subclasses.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

LEVEL_GRIDS = ("uniform", "zero_anchored", "symmetric_zero")


class Quantizer(nn.Module):
    """A module that fake-quantizes a weight or an activation tensor (``forward(x) -> q(x)``).

    Interface (defaults for a quantizer that has none of it):

    - ``bits``: the bit width b; 32 = not quantized (``SkipQuantizer``, a host, quantizes through its
      ``act_quant``).
    - ``is_dynamic``: whether a gated quantizer currently runs its gate (DDTB); None for quantizers without
      a switchable gate.
    - ``level_grid``: the level layout of :meth:`static_range` (one of ``LEVEL_GRIDS``): ``uniform``
      l + k·(u − l)/(2^b − 1) (ODM); ``zero_anchored`` k/σ, σ = (2^b − 1)/(u − l), k from round(σ·l) to
      round(σ·u) (DDTB); ``symmetric_zero`` α·k/Q, |k| ≤ Q = 2^(b−1) − 1 on [−α, α] (PAMS). None without a static range.
    - :meth:`static_range`: the fixed clipping range (l, u) of an activation quantizer, None where the range
      is per image or per forward (DAQ, a gated DDTB layer), for weight quantizers and while the quantizer
      passes its input through (DDTB's ``enabled=False`` calibration epoch).
    - :meth:`weight_clip_bound`: the clip bound u_w of a weight quantizer that has one (ODM WCC, LSQ).
    - ``calibrates_range`` / :meth:`set_range`: whether activation-range calibration (``quant.calibration``)
      sets this quantizer's (l, u), and the setter it calls (ODM).
    - ``export_refusal``: why the integer export cannot reproduce this quantizer (one line, naming the reason);
      empty where it can or where ``export.spec`` decides by type (DAQ, DDTB).
    """

    bits: int = 32
    is_dynamic: bool | None = None
    level_grid: ClassVar[str | None] = None
    calibrates_range: ClassVar[bool] = False
    export_refusal: ClassVar[str] = ""

    def static_range(self) -> tuple[float, float] | None:
        """(l, u) of the static activation grid (see the class docstring); None by default."""
        return None

    def weight_clip_bound(self, weight: Tensor) -> Tensor | None:
        """u_w of ``weight`` (a weight quantizer with a clip bound), else None (the default)."""
        return None

    def set_range(self, lower: float, upper: float) -> None:
        """Set (l, u) from calibration; only where ``calibrates_range``."""
        raise NotImplementedError(f"{type(self).__name__} has no calibrated range (calibrates_range=False)")


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every quantizer module of ``model`` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Quantizer)}


def quantizer_prefixes(model: nn.Module) -> tuple[str, ...]:
    """``"<name>."`` of every ``Quantizer`` module in ``model``: its own quantizer state-dict keys start with one
    (``models.weights.load_pretrained(..., skip_prefixes=...)`` leaves them out)."""
    return tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, Quantizer))
