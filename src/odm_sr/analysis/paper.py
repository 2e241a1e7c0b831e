"""The paper's reference numbers (METHODS.md §8) as data, and the lookup the result tables use.

Each entry is keyed by (model, scale, method, bits) with our config names: ``model.name`` (``edsr_baseline``,
``edsr``, ``rdn``, ``swinir_light``, ``hat_s``), ``model.scale``, ``method.name`` and ``fp32`` / ``w{W}a{A}``
from ``bits``. Values are {set: (PSNR, SSIM or None)}; a "–" in METHODS.md is left out, a PSNR-only cell has
SSIM None. Model attribution: the DDTB README, S1 and S2 "EDSR" rows use EDSR-baseline (their FP rows equal
EDSR-baseline's 32.10 at ×4); S3 is EDSR (full); S1's SwinIR is SwinIR-light (FP ×2 Set5 38.14); S5 is HAT-S.
The DAQ README's SRResNet ×4 rows are ``srresnet`` (the paper's QuantSR comparison gives a margin, no cells).

Conditions. ``when`` holds config values (dotted keys) an entry requires: the EDSR-baseline ×4 2-bit ODM rows
are the supplement defaults (λ_M, β⁰, j, weight clipping correction, cooperative ½(cos + 1) weighting), and the
S6 / S11 / ablation rows are those defaults with one change. ``schedule='300k'`` (S2, S3's ODM row) matches only
runs with ``trainer.max_steps`` ≥ 300000; such runs fall back to the default-schedule entries where there is no
300K one. Entries earlier in ``PAPER`` win over later duplicates (the READMEs repeat main-table rows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SETS = ("Set5", "Set14", "B100", "Urban100")
LONG_SCHEDULE_STEPS = 300_000

Cell = tuple[float, float | None]
Key = tuple[str, int, str, str]


@dataclass(frozen=True)
class PaperEntry:
    """One row of a paper table: {set: (PSNR, SSIM or None)} for (model, scale, method, bits)."""

    model: str
    scale: int
    method: str
    bits: str
    sets: dict[str, Cell]
    source: str
    when: dict[str, Any] = field(default_factory=dict)
    schedule: str | None = None

    @property
    def key(self) -> Key:
        return (self.model, self.scale, self.method, self.bits)


def _cell(text: str) -> Cell | None:
    """'31.50/0.882' -> (31.50, 0.882); '28.20/–' and '27.27' -> (PSNR, None); '–' -> None."""
    psnr, _, ssim = text.partition("/")
    if psnr in ("–", "-"):
        return None
    return float(psnr), (float(ssim) if ssim and ssim not in ("–", "-") else None)


def _table(source: str, model: str, scale: int, rows: list[tuple[str, str, str]], sets=SETS,
           **extra: Any) -> list[PaperEntry]:
    """Entries from (method, bits, 'cell cell cell cell') rows, the cells in the order of ``sets``."""
    out = []
    for method, bits, cells in rows:
        parsed = {s: c for s, text in zip(sets, cells.split(), strict=True) if (c := _cell(text)) is not None}
        out.append(PaperEntry(model, scale, method, bits, parsed, source, **extra))
    return out


# The supplement defaults behind the EDSR-baseline ×4 2-bit ODM rows (METHODS.md §8 "Supplement defaults").
ODM_DEFAULTS: dict[str, Any] = {
    "method.init.j": 99.0, "method.lambda_m": 1e-5, "optim.lr": 1e-4, "method.weight_quantizer": "wcc",
    "method.wcc.learn_gamma": True, "method.wcc.stat": "p99_abs", "method.mr.mode": "coop",
    "method.mr.weight_fn": "half_cos",
}
_ODM = {"when": ODM_DEFAULTS}
_FP = ("fp", "fp32")
_EDSR_X4_FP = "32.10/0.894 28.58/0.781 27.56/0.736 26.04/0.785"
_EDSR_X2_FP = "37.93/0.960 33.46/0.916 32.10/0.899 31.71/0.925"


def _variants(source: str, rows: list[tuple[dict[str, Any], str]], sets=SETS) -> list[PaperEntry]:
    """EDSR-baseline ×4 2-bit ODM rows that change the defaults by ``delta``."""
    return [e for delta, cells in rows
            for e in _table(source, "edsr_baseline", 4, [("odm", "w2a2", cells)], sets,
                            when={**ODM_DEFAULTS, **delta})]


PAPER: list[PaperEntry] = [
    # Main table, EDSR-baseline ×4 [summary]; FP completed from S2, B100 of ODM 2-bit from S6's default row.
    *_table("main", "edsr_baseline", 4, [(*_FP, _EDSR_X4_FP),
                                          ("pams", "w4a4", "31.59/0.885 28.20/– – 25.32/0.762"),
                                          ("daq", "w4a4", "31.85/0.887 28.38/0.776 27.42/0.732 25.73/0.772"),
                                          ("ddtb", "w4a4", "31.85/0.889 28.39/0.777 27.44/0.732 25.69/0.774"),
                                          ("pams", "w2a2", "29.51/0.835 26.79/– – 23.72/0.688"),
                                          ("daq", "w2a2", "31.01/0.871 27.89/0.762 27.09/0.719 24.88/0.740"),
                                          ("ddtb", "w2a2", "30.97/0.876 27.87/0.764 27.09/0.719 24.82/0.742")]),
    *_table("main", "edsr_baseline", 4, [("odm", "w4a4", "32.00/0.891 28.47/– – 25.80/0.778"),
                                          ("odm", "w2a2", "31.50/0.882 28.14/– 27.27 25.17/0.755")], **_ODM),
    # DDTB README (MATLAB Y)
    *_table("DDTB README", "edsr_baseline", 4, [("ddtb", "w3a3", "31.52/0.883 28.18/0.771 27.30/0.727 25.33/0.761")]),
    *_table("DDTB README", "edsr_baseline", 2, [
        ("ddtb", "w2a2", "37.25/0.958 32.87/0.911 31.67/0.893 30.34/0.910"),
        ("ddtb", "w3a3", "37.51/0.958 33.17/0.914 31.89/0.896 31.01/0.919"),
        ("ddtb", "w4a4", "37.72/0.959 33.35/0.916 32.01/0.898 31.39/0.922")]),
    *_table("DDTB README", "rdn", 4, [
        ("ddtb", "w2a2", "30.57/0.867 27.56/0.757 26.91/0.714 24.50/0.728"),
        ("ddtb", "w3a3", "31.49/0.883 28.17/0.772 27.30/0.728 25.35/0.764"),
        ("ddtb", "w4a4", "31.97/0.891 28.49/0.780 27.49/0.735 25.90/0.783")]),
    *_table("DDTB README", "rdn", 2, [
        ("ddtb", "w2a2", "36.76/0.955 32.54/0.908 31.44/0.890 29.77/0.903"),
        ("ddtb", "w3a3", "37.61/0.959 33.26/0.915 31.91/0.897 31.10/0.920"),
        ("ddtb", "w4a4", "37.88/0.960 33.51/0.917 32.12/0.899 31.76/0.926")]),
    # DAQ README (×4, 60 epochs)
    *_table("DAQ README", "edsr_baseline", 4, [("daq", "w3a3", "31.66/0.884 28.19/0.771 27.28/0.728 25.40/0.762")]),
    *_table("DAQ README", "rdn", 4, [
        (*_FP, "32.24/0.896 28.67/0.784 27.63/0.738 26.29/0.792"),
        ("daq", "w4a4", "31.91/0.889 28.38/0.775 27.38/0.733 25.81/0.779"),
        ("daq", "w3a3", "31.57/0.883 28.18/0.771 27.27/0.728 25.47/0.765"),
        ("daq", "w2a2", "30.71/0.866 27.61/0.755 26.93/0.715 24.71/0.731")]),
    *_table("DAQ README", "srresnet", 4, [  # SRResNet (model=srresnet); ODM's +0.51 dB over QuantSR has no cells
        (*_FP, "32.07/0.893 28.50/0.780 27.52/0.735 25.86/0.779"),
        ("daq", "w4a4", "31.85/0.889 28.41/0.777 27.45/0.732 25.70/0.772"),
        ("daq", "w3a3", "31.81/0.889 28.35/0.776 27.40/0.733 25.63/0.772"),
        ("daq", "w2a2", "31.57/0.886 28.19/0.773 27.30/0.729 25.39/0.765")]),
    # Table S1, ×2, 2-bit [paper]
    *_table("S1", "edsr_baseline", 2, [(*_FP, _EDSR_X2_FP),
                                        ("pams", "w2a2", "35.30/0.946 31.63/0.899 30.66/0.879 28.11/0.875"),
                                        ("daq", "w2a2", "36.82/0.955 32.50/0.908 31.34/0.891 29.85/0.905"),
                                        ("odm", "w2a2", "37.53/0.958 33.06/0.913 31.81/0.895 30.81/0.915")]),
    *_table("S1", "rdn", 2, [(*_FP, "38.05/0.961 33.59/0.917 32.20/0.900 32.13/0.927"),
                              ("pams", "w2a2", "35.45/0.946 31.67/0.899 30.69/0.879 28.14/0.874"),
                              ("daq", "w2a2", "37.23/0.957 32.84/0.910 31.66/0.893 30.46/0.908"),
                              ("odm", "w2a2", "37.50/0.958 33.03/0.913 31.80/0.895 30.57/0.913")]),
    *_table("S1", "swinir_light", 2, [(*_FP, "38.14/0.961 33.86/0.921 32.31/0.901 32.76/0.934"),
                                       ("pams", "w2a2", "35.38/0.947 31.63/0.899 30.65/0.880 28.07/0.873"),
                                       ("daq", "w2a2", "34.98/0.943 31.38/0.896 30.47/0.876 27.83/0.869"),
                                       ("ddtb", "w2a2", "37.17/0.957 32.78/0.911 31.42/0.888 30.24/0.908"),
                                       ("odm", "w2a2", "37.42/0.958 33.03/0.913 31.79/0.895 30.76/0.914")]),
    # Table S2, EDSR-baseline ×4, 300K iterations
    *_table("S2", "edsr_baseline", 4, [("pams", "w2a2", "30.05/0.852 27.17/0.744 26.70/0.705 24.09/0.707"),
                                        ("daq", "w2a2", "31.11/0.874 27.98/0.765 27.14/0.720 24.96/0.745"),
                                        ("ddtb", "w2a2", "31.19/0.878 27.97/0.767 27.14/0.723 25.01/0.749")],
            schedule="300k"),
    *_table("S2", "edsr_baseline", 4, [("odm", "w2a2", "31.56/0.884 28.15/0.771 27.30/0.728 25.24/0.758")],
            schedule="300k", **_ODM),
    # Table S3, EDSR (full) ×4
    *_table("S3", "edsr", 4, [(*_FP, "32.46/0.897 28.80/0.788 27.72/0.742 26.64/0.803"),
                               ("daq", "w2a2", "32.05/0.890 28.53/0.778 27.50/0.733 25.97/0.781")]),
    *_table("S3", "edsr", 4, [("odm", "w2a2", "32.15/0.893 28.56/0.781 27.57/0.737 26.04/0.786")], schedule="300k"),
    # Table S4, W/A 4-bit + skip connections 8-bit (full quantization): method=fqsr (FQSR as released) and odm_fq
    *_table("S4", "edsr_baseline", 4, [("fqsr", "w4a4", "30.93/0.870 27.82/0.761 27.07/0.715 24.93/0.744"),
                                        ("odm_fq", "w4a4", "31.99/0.890 28.42/0.777 27.47/0.733 25.70/0.775")],
            when={"bits.sc": 8}),
    *_table("S4", "edsr_baseline", 2, [("fqsr", "w4a4", "37.04/0.951 32.84/0.908 31.67/0.889 30.65/0.911"),
                                        ("odm_fq", "w4a4", "37.86/0.960 33.42/0.916 32.08/0.898 31.71/0.924")],
            when={"bits.sc": 8}),
    # Table S5, HAT-S ×4, 2-bit
    *_table("S5", "hat_s", 4, [(*_FP, "32.92/0.905 29.15/0.796 27.97/0.751 27.87/0.835"),
                                ("pams", "w2a2", "30.30/0.859 27.35/0.750 26.78/0.710 24.23/0.713"),
                                ("daq", "w2a2", "30.21/0.856 27.29/0.747 26.74/0.708 24.14/0.708"),
                                ("ddtb", "w2a2", "31.23/0.878 27.96/0.766 27.16/0.724 25.08/0.751"),
                                ("odm", "w2a2", "32.06/0.891 28.56/0.780 27.53/0.736 26.10/0.787")]),
    # Table S6 (PSNR only): one setting changed from the defaults (β⁰ is optim.lr)
    *_variants("S6", [({"method.init.j": 100.0}, "29.63 26.86 26.53 23.82"),
                      ({"method.init.j": 95.0}, "31.51 28.13 27.27 25.18"),
                      ({"method.lambda_m": 2e-5}, "31.40 28.07 27.22 25.09"),
                      ({"method.lambda_m": 1e-6}, "31.48 28.15 27.28 25.18"),
                      ({"optim.lr": 1e-3}, "30.82 27.72 27.01 24.63"),
                      ({"optim.lr": 1e-5}, "31.17 27.96 27.14 24.93")]),
    # Table S7: LSQ + cooperative MR (method=lsq); Table S11: the cooperative weighting w(cos)
    *_table("S7", "edsr_baseline", 4, [("lsq", "w2a2", "31.26/0.877 25.02/0.746")], sets=("Set5", "Urban100")),
    *_variants("S11", [({"method.mr.weight_fn": "cos"}, "31.46/0.881 25.14/0.755"),
                       ({"method.mr.weight_fn": "step"}, "31.49/0.883 25.15/0.756")], sets=("Set5", "Urban100")),
    # Ablation rows (a)-(d) of METHODS.md §5.8; (e) is the default row above
    *_variants("ablation", [
        ({"method.wcc.learn_gamma": False, "method.wcc.stat": "max_abs", "method.mr.mode": "off"},
         "29.94/0.848 23.99/0.703"),
        ({"method.wcc.learn_gamma": False, "method.wcc.stat": "max_abs"}, "30.34/0.859 24.27/0.715"),
        ({"method.mr.mode": "off"}, "31.12/0.876 24.91/0.746"),
        ({"method.mr.mode": "naive"}, "30.99/0.871 24.79/0.735")], sets=("Set5", "Urban100")),
]

# S9: (image-wise, channel-wise) feature variance; S10: (Var[mean], Var[std], average mismatch), EDSR ×4 2-bit;
# S12: training hours on one RTX 2080Ti (EDSR).
S9_VARIANCE: dict[tuple[str, int], tuple[float, float]] = {("edsr_baseline", 4): (15.08, 40.29),
                                                          ("rdn", 4): (6.40, 58.14)}
S10_MISMATCH: dict[str, tuple[float, float, float]] = {
    "before": (0.28, 3.60, 2.41e2), "odm": (0.25, 1.02, 1.37e2), "pams": (0.29, 2.34, 4.04e2),
    "ddtb": (2.54, 1.67, 5.46e5), "daq": (2.14, 6.59, 6.10e6)}
S12_HOURS: dict[str, float] = {"pams": 1.5, "daq": 3.7, "ddtb": 2.5, "odm": 2.4}
S12_GPU = "RTX 2080Ti"
SUPPLEMENT_MODEL = ("edsr_baseline", 4)  # S10 and S12 are EDSR ×4 (FP 32.10 in S2)


def s9_reference(model: str, scale: int) -> tuple[float, float] | None:
    """S9's (image-wise, channel-wise) variance for the backbone, if the paper has it."""
    return S9_VARIANCE.get((str(model), int(scale)))


def s10_reference(model: str, scale: int, method: str) -> tuple[float, float, float] | None:
    """S10's (Var[mean], Var[std], mismatch) for EDSR-baseline ×4 and ``method`` ('before' = FP + ODM init)."""
    return S10_MISMATCH.get(method) if (str(model), int(scale)) == SUPPLEMENT_MODEL else None


def s12_reference(model: str, scale: int, method: str) -> float | None:
    """S12's training hours (one RTX 2080Ti) for EDSR-baseline ×4 and ``method``."""
    return S12_HOURS.get(method) if (str(model), int(scale)) == SUPPLEMENT_MODEL else None


# -- lookup --------------------------------------------------------------------------------------------------
def bits_label(bits: Mapping[str, Any] | None) -> str:
    """'fp32' when weights and activations are float, else 'w{W}a{A}'."""
    w, a = int((bits or {}).get("w", 32)), int((bits or {}).get("a", 32))
    return "fp32" if w >= 32 and a >= 32 else f"w{w}a{a}"


def config_value(config: Mapping[str, Any], dotted: str) -> Any:
    """``config['a']['b']`` for 'a.b'; KeyError if absent."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def config_value_or(config: Mapping[str, Any], dotted: str, default: Any) -> Any:
    try:
        return config_value(config, dotted)
    except KeyError:
        return default


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def matches(entry: PaperEntry, config: Mapping[str, Any]) -> bool:
    """Every ``when`` condition of ``entry`` holds in ``config`` (a missing key fails)."""
    try:
        return all(_same(config_value(config, k), v) for k, v in entry.when.items())
    except KeyError:
        return False


def paper_entry(model: str, scale: int, method: str, bits: str,
                config: Mapping[str, Any] | None = None) -> PaperEntry | None:
    """The paper entry for a run, or None. With ``config`` (a run's resolved config) the ``when`` conditions and
    the schedule are checked, and a run with ``model.kwargs`` (a resized backbone) gets none; without it, the
    first default-schedule entry for the key."""
    if config is not None and (config_value_or(config, "model.kwargs", None) or {}):
        return None
    long_run = config is not None and int(config_value_or(config, "trainer.max_steps", 0) or 0) >= LONG_SCHEDULE_STEPS
    found = [e for e in PAPER if e.key == (model, int(scale), method, bits)
             and (config is None or matches(e, config))]
    preferred = [e for e in found if e.schedule == ("300k" if long_run else None)]
    fallback = [e for e in found if e.schedule is None]
    return (preferred or fallback or [None])[0]

