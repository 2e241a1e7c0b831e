"""The one style of every config check: ``ValueError("<prefix><key>=<value!r>: expected ...")``.

Used by the methods' options (``quant/*.py``), ``make_bits`` and ``train.check_values``; ``cfg`` is a dict or a
DictConfig, read with ``cfg[key]``. Imports nothing from odm_sr, so every layer can use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _fail(prefix: str, key: str, value: Any, expected: str, hint: str) -> None:
    raise ValueError(f"{prefix}{key}={value!r}: expected {expected}" + (f"; {hint}" if hint else ""))


def check_choice(cfg: Any, key: str, allowed: Sequence, prefix: str = "", hint: str = "") -> Any:
    """``cfg[key]``, one of ``allowed`` (a bool only where ``allowed`` holds bools)."""
    value = cfg[key]
    bool_ok = any(isinstance(a, bool) for a in allowed)
    if value not in allowed or (isinstance(value, bool) and not bool_ok):
        _fail(prefix, key, value, f"one of {tuple(allowed)}", hint)
    return value


def check_choices(cfg: Any, key: str, allowed: Sequence, prefix: str = "") -> list:
    """``cfg[key]``, a list whose every item is one of ``allowed``."""
    values = list(cfg[key])
    unknown = [v for v in values if v not in allowed]
    if unknown:
        _fail(prefix, key, values, f"items of {tuple(allowed)}", f"{unknown} are not")
    return values


def check_bool(cfg: Any, key: str, prefix: str = "") -> bool:
    """``cfg[key]``, true or false."""
    if not isinstance(cfg[key], bool):
        _fail(prefix, key, cfg[key], "true or false", "")
    return cfg[key]


def check_number(cfg: Any, key: str, prefix: str = "", positive: bool = False, integer: bool = False,
                 hint: str = "") -> Any:
    """``cfg[key]``, a finite number ≥ 0 (> 0 with ``positive``; an int with ``integer``)."""
    value = cfg[key]
    number = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if not number or not math.isfinite(value) or value < 0 or (positive and value == 0):
        kind = "positive" if positive else "non-negative"
        _fail(prefix, key, value, f"a {kind} {'integer' if integer else 'number'}", hint)
    return value


def check_range(cfg: Any, key: str, low: float, high: float, prefix: str = "", *, open_low: bool = False,
                open_high: bool = False, auto: bool = False, hint: str = "") -> Any:
    """``cfg[key]``, a number in the interval from ``low`` to ``high`` (ends open as given); ``'auto'`` passes
    with ``auto``."""
    value = cfg[key]
    if auto and value == "auto":
        return value
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    inside = number and (low < value if open_low else low <= value) and (value < high if open_high else value <= high)
    if not inside:
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        either = "'auto' or " if auto else ""
        _fail(prefix, key, value, f"{either}a number in {interval}", hint)
    return value
