"""Quantization core: quantizer math, quantized layers, placement rules, calibration, one file per method."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException

from odm_sr.config import instantiate

from .base import Bits, FullPrecision, QuantMethod, StepOutput, to_dict

VALID_BITS = (2, 3, 4, 8, 32)


def make_bits(bits_cfg: Any) -> Bits:
    """Bits from a config with keys w, a (and sc); each must be one of 2, 3, 4, 8, 32."""
    cfg = to_dict(bits_cfg)
    values = {k: int(cfg.get(k, 32)) for k in ("w", "a", "sc")}
    for key, value in values.items():
        if value not in VALID_BITS:
            raise ValueError(f"bits.{key}={value}: expected one of {VALID_BITS}")
    return Bits(**values)


def build_method(method_cfg: Any, bits_cfg: Any = None) -> QuantMethod:
    """``hydra.utils.instantiate`` of the method class named by ``method_cfg.target`` (e.g.
    ``odm_sr.quant.odm.ODM``; ``target`` is also a key of every ``conf/method/*.yaml``), its keys as options.
    A bad value raises the method's own ValueError."""
    cfg = to_dict(method_cfg)
    target = cfg.get("target", "odm_sr.quant.base.FullPrecision")
    bits = make_bits(bits_cfg)
    try:
        return instantiate({"_target_": target, **cfg}, bits=bits, _convert_="object")
    except InstantiationException as err:  # the target could not be imported
        raise ValueError(f"method.target={target!r} cannot be imported: {err}") from err


__all__ = ["Bits", "FullPrecision", "QuantMethod", "StepOutput", "VALID_BITS", "build_method", "make_bits"]
