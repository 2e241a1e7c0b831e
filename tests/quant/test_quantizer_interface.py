"""The declared ``Quantizer`` interface (bits, is_dynamic, level_grid, static_range, weight_clip_bound,
calibrates_range / set_range): every quantizer class of the package answers it, by hand for one ODM, one PAMS
and one DDTB quantizer, and on calibrated tiny models of every method it gives what the duck-typed analysis
code (``hasattr(q, "lower")``, ``"alpha_lower"``, ``"alpha"``, ``clip_bound``/``weight_stat``) gave."""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np
import pytest
import torch
from helpers import make_method
from torch import nn

import odm_sr.quant
from odm_sr.analysis.distributions import static_levels, weight_stats
from odm_sr.models import build_model
from odm_sr.quant.base import Bits
from odm_sr.quant.blocks import ActSite
from odm_sr.quant.calibration import range_quantized_layers
from odm_sr.quant.daq import DaqActQuantizer, DaqWeightQuantizer
from odm_sr.quant.ddtb import DdtbActQuantizer, DdtbWeightQuantizer
from odm_sr.quant.fq import SkipQuantizer
from odm_sr.quant.fqsr import FqsrQuantizer
from odm_sr.quant.layers import QuantMixin, quantized_layers
from odm_sr.quant.lsq import LsqWeightQuantizer
from odm_sr.quant.odm import OdmActQuantizer, WeightClipQuantizer
from odm_sr.quant.pams import PamsActQuantizer, PamsWeightQuantizer
from odm_sr.quant.quantizer import LEVEL_GRIDS, Quantizer, quantizers
from odm_sr.quant.quantsr import RlqActQuantizer, RlqWeightQuantizer

# class -> (level_grid, calibrates_range): a new quantizer class must be added here
DECLARED = {
    OdmActQuantizer: ("uniform", True),
    WeightClipQuantizer: (None, False),
    LsqWeightQuantizer: (None, False),
    PamsActQuantizer: ("symmetric_zero", False),
    PamsWeightQuantizer: (None, False),
    DdtbActQuantizer: ("zero_anchored", False),
    DdtbWeightQuantizer: (None, False),
    DaqActQuantizer: (None, False),
    DaqWeightQuantizer: (None, False),
    SkipQuantizer: (None, False),
    FqsrQuantizer: ("uniform", False),
    RlqActQuantizer: (None, False),  # per-input-channel shift: no single static grid
    RlqWeightQuantizer: (None, False),
}


def all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *all_subclasses(sub)}
    return out


def package_quantizer_classes() -> set[type]:
    for info in pkgutil.iter_modules(odm_sr.quant.__path__, "odm_sr.quant."):
        importlib.import_module(info.name)
    return {c for c in all_subclasses(Quantizer) if c.__module__.startswith("odm_sr.")}


# -- the duck-typed code the interface replaced (analysis/distributions.py before), as the reference --------
def legacy_static_levels(quantizer):
    bits = int(getattr(quantizer, "bits", 32))
    if quantizer is None or bits >= 32 or not getattr(quantizer, "enabled", True):
        return None
    n = 2 ** bits - 1
    if hasattr(quantizer, "lower") and hasattr(quantizer, "upper"):
        lower, upper = float(quantizer.lower.detach()), float(quantizer.upper.detach())
        return lower + np.arange(n + 1) * (upper - lower) / n
    if hasattr(quantizer, "alpha_lower") and not (getattr(quantizer, "is_dynamic", False)
                                                  and getattr(quantizer, "use_gate", False)):
        lower, upper = float(quantizer.alpha_lower.detach()), float(quantizer.alpha_upper.detach())
        sigma = n / (upper - lower)
        return np.arange(round(sigma * lower), round(sigma * upper) + 1) / sigma
    if hasattr(quantizer, "alpha"):
        q_max = 2 ** (bits - 1) - 1
        return float(quantizer.alpha.detach()) * np.arange(-q_max, q_max + 1) / q_max
    return None


def legacy_clip(layer):
    quantizer = getattr(layer, "weight_quant", None)
    bound = getattr(quantizer, "clip_bound", None)
    if not callable(bound):
        return None
    with torch.no_grad():
        return float(bound(layer.weight) if hasattr(quantizer, "weight_stat") else bound())


def test_every_package_quantizer_class_declares_the_interface():
    classes = package_quantizer_classes()
    assert classes == set(DECLARED), "a Quantizer subclass is missing from DECLARED (or was removed)"
    for cls, (grid, calibrates) in DECLARED.items():
        assert cls.level_grid == grid and cls.calibrates_range is calibrates, cls.__name__
        assert grid is None or grid in LEVEL_GRIDS
        if not calibrates:
            assert cls.set_range is Quantizer.set_range, f"{cls.__name__} has set_range but calibrates_range=False"
    site = ActSite("conv", 3, False)
    w = torch.linspace(-1.0, 1.0, 201).reshape(201, 1)
    made = [OdmActQuantizer(2), WeightClipQuantizer(2), LsqWeightQuantizer(2, w), PamsActQuantizer(2, site),
            PamsWeightQuantizer(2), DdtbActQuantizer(2, site), DdtbWeightQuantizer(2), DaqActQuantizer(2, site),
            DaqWeightQuantizer(2), SkipQuantizer(OdmActQuantizer(2)), FqsrQuantizer(2, stable=0),
            RlqActQuantizer(2, 4), RlqWeightQuantizer(2, w)]
    assert {type(q) for q in made} == set(DECLARED)
    for q in made:
        assert isinstance(q.bits, int) and q.is_dynamic in (None, False)
        assert (q.static_range() is None) == (q.level_grid is None), type(q).__name__
        if q.static_range() is None:
            assert static_levels(q) is None
    assert SkipQuantizer(OdmActQuantizer(2)).bits == 32  # a host: it quantizes through its act_quant
    assert DdtbActQuantizer(2, site).is_dynamic is False


def test_static_range_by_hand():
    odm = OdmActQuantizer(2)
    odm.set_range(0.1, 0.7)
    assert odm.static_range() == pytest.approx((0.1, 0.7))
    np.testing.assert_allclose(static_levels(odm), [0.1, 0.3, 0.5, 0.7], atol=1e-6)

    pams = PamsActQuantizer(3, ActSite("conv", 3, False), alpha_init=1.5)
    assert pams.static_range() == (-1.5, 1.5)
    np.testing.assert_allclose(static_levels(pams), 1.5 * np.arange(-3, 4) / 3)  # Q = 2^(3−1) − 1 = 3

    fqsr = FqsrQuantizer(2, stable=0)
    with torch.no_grad():
        fqsr.clip.fill_(-1.5)  # the release quantizes with |c|
    np.testing.assert_allclose(static_levels(fqsr), [-1.5, -0.5, 0.5, 1.5], atol=1e-6)
    assert FqsrQuantizer(2).static_range() is None  # passes its input through while it tracks

    ddtb = DdtbActQuantizer(2, ActSite("conv", 3, False))
    with torch.no_grad():
        ddtb.alpha_lower.fill_(-1.0)
        ddtb.alpha_upper.fill_(2.0)
    assert ddtb.static_range() == (-1.0, 2.0)
    np.testing.assert_allclose(static_levels(ddtb), [-1.0, 0.0, 1.0, 2.0])  # σ = 3/3: k/σ, k = −1..2
    ddtb.is_dynamic = True
    assert ddtb.static_range() == (-1.0, 2.0)  # the gate runs (L_reg) but does not rescale without use_gate
    ddtb.use_gate = True
    assert ddtb.static_range() is None and static_levels(ddtb) is None
    ddtb.is_dynamic, ddtb.use_gate, ddtb.enabled = False, False, False
    assert ddtb.static_range() is None and static_levels(ddtb) is None

    daq = DaqActQuantizer(2, ActSite("conv", 3, False))
    assert daq.static_range() is None and daq.level_grid is None


def test_weight_clip_bound_by_hand():
    w = torch.arange(1.0, 101.0).reshape(10, 10)  # |W| = 1..100: P_99 (linear) = 1 + 0.99·99 = 99.01
    wcc = WeightClipQuantizer(2)
    with torch.no_grad():
        wcc.gamma.fill_(0.5)
    assert float(wcc.weight_clip_bound(w).detach()) == pytest.approx(0.5 * 99.01)
    assert float(WeightClipQuantizer(2, stat="max_abs").weight_clip_bound(w)) == 100.0
    lsq = LsqWeightQuantizer(3, w)  # s = 2·mean|W|/√Q_P = 2·50.5/√3, bound Q_N·s, Q_N = 4
    assert float(lsq.weight_clip_bound(w)) == pytest.approx(4 * 2 * 50.5 / 3 ** 0.5, rel=1e-6)
    for q in (PamsWeightQuantizer(2), DaqWeightQuantizer(2), DdtbWeightQuantizer(2), OdmActQuantizer(2)):
        assert q.weight_clip_bound(w) is None


def tiny_edsr() -> nn.Module:
    torch.manual_seed(0)
    return build_model("edsr_baseline", 2, n_resblocks=2, n_feats=8)


METHODS = {
    "odm": lambda: make_method("odm", None, Bits(w=2, a=2)),
    "lsq": lambda: make_method("odm", {"weight_quantizer": "lsq"}, Bits(w=2, a=2)),
    "odm_fq": lambda: make_method("odm", {"fq": {"enabled": True}}, Bits(w=4, a=4, sc=4)),
    "pams": lambda: make_method("pams", None, Bits(w=3, a=3)),
    "ddtb": lambda: make_method("ddtb", None, Bits(w=2, a=2)),
    "daq": lambda: make_method("daq", None, Bits(w=2, a=2)),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_interface_matches_the_duck_typed_code_on_calibrated_models(method):
    net = tiny_edsr()
    qmethod = METHODS[method]()
    qmethod.quantize(net)
    torch.manual_seed(1)
    batches = [torch.rand(2, 3, 8, 8) * net.pixel_range for _ in range(2)]
    qmethod.calibrate(net, batches)
    net.train()
    with torch.no_grad():
        net(batches[0])  # PAMS tracks α, DDTB initialises (l, u) on the first training forward
    act = {n: q for n, q in quantizers(net).items() if not n.endswith("weight_quant") and q.bits < 32}
    assert act, "nothing was quantized"
    if method == "ddtb":  # one gated layer: no static range
        gated = next(iter(q for q in act.values() if isinstance(q, DdtbActQuantizer)))
        gated.is_dynamic = gated.use_gate = True
    static = 0
    for name, q in act.items():
        expected, got = legacy_static_levels(q), static_levels(q)
        assert (got is None) == (expected is None), name
        if expected is not None:
            np.testing.assert_array_equal(got, expected)
            static += 1
    assert static == (0 if method == "daq" else len(act) - (method == "ddtb"))
    rows = {r["layer"]: r["clip"] for r in weight_stats(net)}
    layers = quantized_layers(net)
    for name, clip in rows.items():
        assert clip == legacy_clip(layers[name]), name
    assert any(c is not None for c in rows.values()) == (method in ("odm", "lsq", "odm_fq"))
    calibrated = {n for n, m in net.named_modules()  # the old test: a set_range of the quantizer's own class
                  if isinstance(m, QuantMixin) and "set_range" in vars(type(m.act_quant))}
    assert set(range_quantized_layers(net)) == calibrated
    assert bool(calibrated) == method.startswith(("odm", "lsq"))
    if method == "odm_fq":
        assert any(isinstance(m, SkipQuantizer) for m in net.modules())


def test_quant_layers_always_have_both_quantizer_slots():
    from odm_sr.quant.layers import QuantConv2d, QuantLinear

    for layer in (QuantConv2d(3, 4, 3), QuantLinear(3, 4)):
        assert layer.act_quant is None and layer.weight_quant is None
        assert set(layer.state_dict()) == {"weight", "bias"}
    conv = QuantConv2d.from_float(nn.Conv2d(3, 4, 3), OdmActQuantizer(2), WeightClipQuantizer(2))
    assert isinstance(conv.act_quant, OdmActQuantizer) and isinstance(conv.weight_quant, WeightClipQuantizer)
    assert set(dict(conv.named_children())) == {"act_quant", "weight_quant"}
    host = SkipQuantizer(OdmActQuantizer(2))
    assert isinstance(host.act_quant, OdmActQuantizer) and host.weight_quant is None


def test_rlq_weight_clip_bound_is_q_n_times_its_step():
    w = torch.linspace(-1.0, 1.0, 201).reshape(201, 1)  # mean|W| = 101/201; 2 bits: Q_N = 2, Q_P = 1
    q = RlqWeightQuantizer(2, w)
    assert float(q.weight_clip_bound(w)) == pytest.approx(2 * 2 * (101 / 201) / 1.0, rel=1e-6)  # Q_N·2·mean|W|/√Q_P
