"""What the rest of odm_sr takes from the quantization core: ``build_method`` (the method a config names, at its
bits), ``make_bits`` / ``Bits``, and the method interface (``QuantMethod``, ``StepOutput``, ``FullPrecision``).

The package holds the quantizer math (``functional``, ``quantizer``), the quantized layers (``layers``), the
backbone table and placement (``backbones``, ``placement``, ``blocks``), calibration and DDP helpers
(``calibration``, ``distributed``) and one file per method: ``odm`` (ODM, with ``mismatch`` / ``cooperative``),
``fq`` (ODM-FQ, and the full-quantization surgery FQSR shares), ``fqsr`` (FQSR as released), ``lsq`` (ODM's LSQ
weight quantizer), ``pams``, ``daq``, ``ddtb``, ``skt`` (what PAMS and DDTB share)."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException

from odm_sr.checks import check_choice
from odm_sr.config import instantiate

from .base import Bits, FullPrecision, QuantMethod, StepOutput, to_dict

VALID_BITS = (2, 3, 4, 8, 32)


def make_bits(bits_cfg: Any) -> Bits:
    """Bits from a config with keys w, a (and sc); each must be one of 2, 3, 4, 8, 32."""
    cfg = to_dict(bits_cfg)
    values = {k: cfg.get(k, 32) for k in ("w", "a", "sc")}
    return Bits(**{key: int(check_choice(values, key, VALID_BITS, "bits.")) for key in values})


def build_method(method_cfg: Any, bits_cfg: Any = None) -> QuantMethod:
    """``hydra.utils.instantiate`` of the method class named by ``method_cfg._target_`` (e.g.
    ``odm_sr.quant.odm.ODM``, the ``_target_`` of every ``conf/method/*.yaml``), its other keys as options.
    A bad value raises the method's own ValueError."""
    cfg = to_dict(method_cfg)
    target = cfg.setdefault("_target_", "odm_sr.quant.base.FullPrecision")
    bits = make_bits(bits_cfg)
    try:
        return instantiate(cfg, bits=bits, _convert_="object")
    except InstantiationException as err:  # the target could not be imported
        raise ValueError(f"method._target_={target!r} cannot be imported: {err}") from err


__all__ = ["Bits", "FullPrecision", "QuantMethod", "StepOutput", "VALID_BITS", "build_method", "make_bits"]
