"""DDTB (METHODS.md §3, §4.3): zero-anchored levels and gradients, weight clipping, bound init, gates,
choice of the dynamic quantizers, the stage schedule, training on a small EDSR."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import make_method

from odm_sr.models import build_model
from odm_sr.quant.base import Bits, frozen_copy
from odm_sr.quant.blocks import ActSite
from odm_sr.quant.ddtb import (
    DdtbActQuantizer,
    DdtbWeightQuantizer,
    select_dynamic,
    zero_anchored_quantize,
)
from odm_sr.quant.functional import round_ste

SITE = ActSite("q", 4, False)


def small_edsr(blocks: int = 2):
    torch.manual_seed(0)
    return build_model("edsr", 2, n_resblocks=blocks, n_feats=8)


def batch(n: int = 2, amplitude: float = 255.0):
    return torch.rand(n, 3, 6, 6) * amplitude, torch.rand(n, 3, 12, 12) * 255


# -- quantizer math -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, ks", [(2, range(-1, 3)), (3, range(-2, 6)), (4, range(-5, 11))])
def test_zero_anchored_levels(bits, ks):
    # l = −1, u = 2: σ = (2^b − 1)/3; levels k/σ for k = Int(σl) … Int(σu): 4 / 8 / 16, zero included
    sigma = (2 ** bits - 1) / 3
    out = zero_anchored_quantize(torch.linspace(-3, 4, 7001), torch.tensor(-1.0), torch.tensor(2.0), bits)
    assert torch.allclose(out.unique(), torch.tensor(list(ks)) / sigma, atol=1e-6)


def test_zero_anchored_gradients_by_hand():
    # l = −1, u = 2.2, 2 bits: n = 3, σ = 3/3.2 = 0.9375
    x = torch.tensor([0.5, 3.0, -2.0])
    # x = 0.5: v = 0.46875, R = 0 → ∂u = −v/3, ∂l = v/3, ∂x = 1
    # x = 3 (above): v = σu = 2.0625, R = 2 → ∂u = 1 − 0.0625/3, ∂l = 0.0625/3, ∂x = 0
    # x = −2 (below): v = σl = −0.9375, R = −1 → ∂u = −0.0625/3, ∂l = 1 + 0.0625/3, ∂x = 0
    expected = [(-0.15625, 0.15625, 1.0), (1 - 0.0625 / 3, 0.0625 / 3, 0.0),
                (-0.0625 / 3, 1 + 0.0625 / 3, 0.0)]
    for i, (du, dl, dx) in enumerate(expected):
        xi = x.clone().requires_grad_(True)
        lower, upper = torch.tensor(-1.0, requires_grad=True), torch.tensor(2.2, requires_grad=True)
        zero_anchored_quantize(xi, lower, upper, 2)[i].backward()
        assert upper.grad.item() == pytest.approx(du, abs=1e-6)
        assert lower.grad.item() == pytest.approx(dl, abs=1e-6)
        assert xi.grad[i].item() == dx


def test_zero_anchored_matches_released_zero_point_form():
    """`DDTB_quant_act_asym_dynamic_quantized`: ((Int(σ·clip − zp) + zp)/σ, zp = Int(σl) + 2^(b−1)."""
    torch.manual_seed(0)
    x1 = (torch.randn(200) * 3).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    l1, u1 = torch.tensor(-1.3, requires_grad=True), torch.tensor(2.7, requires_grad=True)
    l2, u2 = torch.tensor(-1.3, requires_grad=True), torch.tensor(2.7, requires_grad=True)
    w = torch.randn(200)
    out1 = zero_anchored_quantize(x1, l1, u1, 3)
    sigma = 7 / (u2 - l2)
    zero_point = round_ste(sigma * l2) + 4
    out2 = (round_ste(sigma * torch.max(torch.min(x2, u2), l2) - zero_point) + zero_point) / sigma
    assert torch.allclose(out1, out2, atol=1e-5)
    (out1 * w).sum().backward()
    (out2 * w).sum().backward()
    for a, b in ((x1.grad, x2.grad), (l1.grad, l2.grad), (u1.grad, u2.grad)):
        assert torch.allclose(a, b, atol=1e-4)


def test_weight_quantizer_clips_to_percentiles():
    w = torch.arange(101.0).requires_grad_(True)  # p1 = 1, p99 = 99
    out = DdtbWeightQuantizer(2, "percentile")(w)
    sigma = 3 / 98
    assert torch.allclose(out.unique(), torch.tensor([0.0, 1.0, 2.0, 3.0]) / sigma)
    out.sum().backward()
    # outside [p1, p99] 0, inside 1 (at the clip points themselves autograd's min/max ties give ½)
    assert w.grad[0] == 0 and w.grad[100] == 0 and torch.all(w.grad[2:99] == 1)
    w.grad = None
    DdtbWeightQuantizer(2, "minmax")(w).sum().backward()
    assert torch.all(w.grad[1:100] == 1)


def test_bounds_init_on_first_training_forward():
    x = torch.arange(1000.0).reshape(2, 4, 5, 25) - 300
    quant = DdtbActQuantizer(2, SITE, percentile_m=99.0).train()
    quant(x)
    lo, hi = np.percentile(x.numpy(), [1, 99])
    assert quant.alpha_lower.item() == pytest.approx(lo) and quant.alpha_upper.item() == pytest.approx(hi)
    quant(x * 10)  # only once
    assert quant.alpha_upper.item() == pytest.approx(hi)


@pytest.mark.parametrize("bits, quirk, calibrated", [(2, True, True), (3, True, False), (3, False, True)])
def test_bounds_pm10_quirk(bits, quirk, calibrated):
    model = small_edsr(1)
    cfg = {"quirks": {"bounds_pm10_above_2bit": quirk}, "stages": {"calib_epochs": 0}}
    method = make_method("ddtb", cfg, Bits(bits, bits))
    method.quantize(model)
    model.train()(batch()[0])
    quant = model.body[0].quant_act1
    assert (quant.alpha_upper.item() != 10.0) == calibrated


def test_gate_scales_bounds_per_image(monkeypatch):
    quant = DdtbActQuantizer(2, SITE).eval()
    quant.is_dynamic = True
    quant.use_gate = True
    logits = torch.tensor([[0.0, 0.0], [math.log(3), -math.log(3)]])  # 2·sigmoid: (1, 1) and (1.5, 0.5)
    monkeypatch.setattr(quant.gate, "forward", lambda pooled: logits)
    x = torch.randn(2, 4, 3, 3) * 20
    out = quant(x)
    lower, upper = quant.alpha_lower.detach(), quant.alpha_upper.detach()
    assert torch.allclose(out[0], zero_anchored_quantize(x[0], lower, upper, 2))
    assert torch.allclose(out[1], zero_anchored_quantize(x[1], 0.5 * lower, 1.5 * upper, 2))
    quant.use_gate = False  # gates not applied: the static bounds
    assert torch.allclose(quant(x), zero_anchored_quantize(x, lower, upper, 2))


@pytest.mark.parametrize("frozen", [False, True])
def test_gate_first_conv_learns_unless_quirk(frozen):
    torch.manual_seed(0)
    quant = DdtbActQuantizer(2, SITE, gate_frozen_first_conv=frozen).train()
    quant.is_dynamic = True
    quant.use_gate = True
    quant(torch.randn(4, 4, 3, 3) * 5).sum().backward()
    gate = quant.gate
    assert gate.conv2.weight.grad is not None and gate.conv2.weight.grad.abs().sum() > 0
    first = gate.conv1.weight.grad
    assert (first is None or first.abs().sum() == 0) == frozen


# -- choosing the dynamic quantizers --------------------------------------------------------------------
def test_select_dynamic_by_variance_of_max_and_min():
    spreads = {"a": 0.0, "b": 5.0, "c": 1.0, "d": 3.0, "e": 0.5}  # per-batch amplitude spread
    quants = {n: DdtbActQuantizer(2, SITE) for n in spreads}
    for q in quants.values():
        q.enabled, q.recording = False, True
    for i in range(4):
        for n, q in quants.items():
            q(torch.tensor([-1.0, 1.0]) * (1 + spreads[n] * i))
    assert sorted(select_dynamic(quants, 0.4)) == ["b", "d"]  # ⌊0.4·5⌋ = 2 largest var(max) + var(min)
    assert [q.is_dynamic for q in quants.values()] == [False, True, False, True, False]
    assert all(not q.max_history for q in quants.values())


def test_select_dynamic_gathers_the_records_on_the_quantizers_device(monkeypatch):
    """NCCL takes no CPU tensors: the records go to the collective on the quantizer's device (issue 14); the
    ``meta`` device stands in for a GPU (it holds shapes only, so the fake collective returns zeros)."""
    from odm_sr.quant import ddtb

    devices = []

    def fake_gather_cat(x, dim=0):
        devices.append(x.device)
        return torch.zeros(x.shape, dtype=x.dtype)

    monkeypatch.setattr(ddtb, "gather_cat", fake_gather_cat)
    quants = {n: DdtbActQuantizer(2, SITE).to("meta") for n in "ab"}
    for q in quants.values():
        q.max_history, q.min_history = [1.0, 2.0], [0.0, -1.0]
    select_dynamic(quants, 0.5)
    assert devices == [torch.device("meta")] * 2


def test_calibration_epoch_picks_the_high_variance_quantizer():
    model = small_edsr()
    teacher = frozen_copy(model)
    with torch.no_grad():  # the last residual branch now dwarfs every other quantizer input
        model.body[1].body[2].weight.mul_(1000.0)
    method = make_method("ddtb", {"iters_per_epoch": 3}, Bits(2, 2))
    method.quantize(model)
    for step, amplitude in enumerate((50.0, 255.0, 120.0)):
        assert method.training_losses(model, *batch(amplitude=amplitude), step, teacher=teacher) is None
    method.training_losses(model, *batch(), 3, teacher=teacher)
    dynamic = [n for n, q in method.act_quantizers(model).items() if q.is_dynamic]
    assert dynamic == ["body.1.quant_act3"]  # ⌊0.3·6⌋ = 1


# -- the schedule ---------------------------------------------------------------------------------------
def test_stages_switch_at_the_right_steps():
    model = small_edsr()
    teacher = frozen_copy(model)
    # default stages 1 + 4 epochs
    method = make_method("ddtb", {"iters_per_epoch": 1, "dynamic_ratio": 0.5}, Bits(2, 2))
    method.quantize(model)
    groups = method.param_groups(model, 1e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("net", 1e-4), ("alpha", 1e-2)]
    assert len(groups[1]["params"]) == 12  # l and u of 6 quantizers; the gates train at the base lr
    opt = torch.optim.Adam(groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    for step in range(7):
        lr, hr = batch()
        out = method.training_losses(model, lr, hr, step, teacher=teacher)
        quants = method.act_quantizers(model).values()
        if step == 0:  # epoch 0: calibration, the student is FP and nothing steps
            assert out is None
            with torch.no_grad():
                assert torch.allclose(model.eval()(lr), teacher(lr), atol=1e-3)
            model.train()
            continue
        assert sum(q.is_dynamic for q in quants) == 3
        gates_on = step >= 5
        assert ("reg" in out.terms) == (not gates_on)
        assert all(q.use_gate == gates_on for q in quants)
        loss = sum(out.terms.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "body.0.body.0.weight" in changed and "body.0.quant_act1.alpha_upper" in changed
    assert any(".gate.conv2." in n for n in changed)
    assert "lower/body.0.quant_act1" in method.log_stats(model)
    # the stage flags travel with the state dict (extra state), e.g. into a resumed or evaluated checkpoint
    restored = small_edsr()
    make_method("ddtb", {}, Bits(2, 2)).quantize(restored)
    assert not restored.load_state_dict(model.state_dict()).missing_keys
    flags = [(q.initialized, q.is_dynamic, q.use_gate) for q in method.act_quantizers(restored).values()]
    assert flags == [(q.initialized, q.is_dynamic, q.use_gate) for q in quants]
    assert all(f[0] and f[2] for f in flags) and sum(f[1] for f in flags) == 3


def test_calibrate_hook_when_no_calibration_epoch():
    model = small_edsr()
    method = make_method("ddtb", {"stages": {"calib_epochs": 0}}, Bits(2, 2))
    method.quantize(model)
    method.calibrate(model, [batch(amplitude=a)[0] for a in (20.0, 255.0)])
    assert sum(q.is_dynamic for q in method.act_quantizers(model).values()) == 1


def test_rdn_calibration_weights_quirk(monkeypatch):
    from odm_sr.models import rdn

    monkeypatch.setitem(rdn.RDN_CONFIGS, "tiny", (2, 3, 4))
    for quirk in (False, True):
        model = build_model("rdn", 2, config="tiny", G0=8)
        method = make_method("ddtb", {"quirks": {"rdn_calib_quantized_weights": quirk}}, Bits(2, 2))
        method.quantize(model)
        assert method.resolved() == {"dynamic_ratio": 0.5, "init_percentile": 95.0, "weight_clip": "minmax"}
        method._set_quantized(model, False)
        weight_quants = [m for m in model.modules() if isinstance(m, DdtbWeightQuantizer)]
        assert len(weight_quants) == 2 * 4 + 2 and all(q.enabled == quirk for q in weight_quants)


def test_config_validation():
    assert all(make_method("ddtb", {"official": True}, Bits(2, 2)).quirks.values())
    with pytest.raises(ValueError, match="dynamic_ratio"):
        make_method("ddtb", {"dynamic_ratio": 1.5}, Bits(2, 2))
    with pytest.raises(ValueError, match="calib_epochs"):
        make_method("ddtb", {"stages": {"calib_epochs": -1}}, Bits(2, 2))
    for value in ("image", "window"):  # one legal value ('image'), so not a key
        with pytest.raises(ValueError, match="unknown method config key 'gate_pool'; known: "):
            make_method("ddtb", {"gate_pool": value}, Bits(2, 2))
    with pytest.raises(ValueError, match="unknown method config key 'skt.feature'; known: weight"):
        make_method("ddtb", {"skt": {"feature": "pre_reconstruction"}}, Bits(2, 2))
    with pytest.raises(ValueError, match="weight_clip"):
        make_method("ddtb", {"weight_clip": "p95"}, Bits(2, 2))


@pytest.mark.parametrize(("cfg", "count", "dynamic"), [({}, 146, 73),
                                                       ({"quirks": {"rdn_gff3_fp_input": True}}, 145, 72),
                                                       ({"official": True}, 145, 72)])
def test_rdn_gff3_input_quirk_counts(cfg, count, dynamic):
    """Released RDN (×4, D=16, C=8): 16·(7 dense + 1 RDB input) + GFF.0 + GFF.1 = 146 activation quantizers; the
    release leaves the GFF 3×3 input (GFF.1) FP: 145. RDN's dynamic ratio 0.5 then chooses ⌊0.5·N⌋ of them."""
    model = build_model("rdn", 4)
    method = make_method("ddtb", cfg, Bits(2, 2))
    method.quantize(model)
    quants = method.act_quantizers(model)
    assert len(quants) == count
    assert (model.GFF[1].act_quant is None) == (count == 145)
    gen = torch.Generator().manual_seed(0)
    for q in quants.values():  # recorded max/min of two calibration batches: distinct variances
        q.max_history, q.min_history = torch.rand(2, generator=gen).tolist(), [0.0, 0.0]
    assert len(method._finish_calibration(model)) == dynamic
    assert sum(q.is_dynamic for q in quants.values()) == dynamic
