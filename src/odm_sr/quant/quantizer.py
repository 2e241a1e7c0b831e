"""The base class of every weight and activation quantizer (ODM, LSQ, PAMS, DAQ, DDTB and ODM-FQ's skip hosts).

Code that looks for quantizers (analysis, export, the methods) tests ``isinstance(m, Quantizer)`` instead of
matching class or module names. The base adds no parameters, buffers or state, so state-dict keys are those of
the subclasses.
"""

from __future__ import annotations

from torch import nn


class Quantizer(nn.Module):
    """A module that fake-quantizes a weight or an activation tensor (``forward(x) -> q(x)``)."""


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every quantizer module of ``model`` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Quantizer)}
