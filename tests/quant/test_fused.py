"""The fused quantizer Functions (one forward, one backward each) against independent references written here
with plain autograd ops (the composed expressions they replace): values and every gradient to 1e-6 relative on
random inputs that include values outside the clip range and exactly on its bounds; the pass-aware backward
(``functional.wanted``) under ``autograd.grad``; DAQ's post-ReLU decision without a host sync per call."""

from __future__ import annotations

import math

import pytest
import torch

from odm_sr.analysis.profiling import step_profile
from odm_sr.quant.blocks import ActSite
from odm_sr.quant.daq import DaqActQuantizer
from odm_sr.quant.ddtb import DdtbActQuantizer, DdtbWeightQuantizer, gate_act_quantize, zero_anchored_quantize
from odm_sr.quant.fq import SkipQuantizer
from odm_sr.quant.functional import max_abs_weight_quantize, percentile, symmetric_quantize, uniform_quantize
from odm_sr.quant.lsq import LsqWeightQuantizer
from odm_sr.quant.odm import OdmActQuantizer, WeightClipQuantizer
from odm_sr.quant.pams import PamsActQuantizer, PamsWeightQuantizer, pams_act_quantize
from odm_sr.quant.quantizer import Quantizer, quantizers

RTOL = 1e-6
DT = torch.float64


def ste(x):
    return x + (torch.round(x) - x).detach()


def clip(x, lower, upper):
    """clip(X, l, u) whose gradient goes to X on l ≤ X ≤ u (bounds included) and to the bound outside."""
    return torch.where(x < lower, lower, torch.where(x > upper, upper, x))


def ref_uniform(x, lower, upper, bits):
    step = (upper - lower) / (2**bits - 1)
    return ste((clip(x, lower, upper) - lower) / step) * step + lower


def ref_zero_anchored(x, lower, upper, bits):
    sigma = (2**bits - 1) / (upper - lower)
    return ste(sigma * torch.max(torch.min(x, upper), lower)) / sigma


def ref_pams(x, alpha, bits):
    q = 2 ** (bits - 1) - 1
    return ste(clip(x, -alpha, alpha) * q / alpha) * alpha / q


def ref_lsq(w, s, bits, factor):
    scaled = s * factor
    s = (s - scaled).detach() + scaled
    return ste(torch.clamp(w / s, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)) * s


def ref_max_abs(w, bits):
    q = float(2 ** (bits - 1) - 1)
    m = w.detach().abs().max() + 1e-8
    return ste(w * (q / m)) * (m / q)


def with_edges(shape, lower, upper, seed=0):
    """Random values over 1.5× the range, with some exactly on each bound and some far outside."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=DT) * (upper - lower) * 1.5 + lower - 0.25 * (upper - lower)
    flat = x.view(-1)
    flat[:5] = lower
    flat[5:10] = upper
    flat[10], flat[11] = lower - 10.0, upper + 10.0
    return x


def compare(fused, ref, inputs):
    """Values and the gradients of every input that requires one, for the same random output gradient."""
    a = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    b = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    qa, qb = fused(*a), ref(*b)
    torch.testing.assert_close(qa, qb, rtol=RTOL, atol=0)
    g = torch.randn(qa.shape, generator=torch.Generator().manual_seed(1), dtype=qa.dtype)
    want = [t for t in a if t.requires_grad]
    ga = torch.autograd.grad(qa, want, g)
    gb = torch.autograd.grad(qb, [t for t in b if t.requires_grad], g)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=1e-12)
    return ga


@pytest.mark.parametrize("bits", [2, 4])
def test_uniform_matches_composed(bits):
    x = with_edges((2, 3, 6, 6), -0.5, 1.5)
    lower, upper = torch.tensor(-0.5, dtype=DT, requires_grad=True), torch.tensor(1.5, dtype=DT, requires_grad=True)
    gx, gl, gu = compare(lambda *t: uniform_quantize(*t, bits), lambda *t: ref_uniform(*t, bits),
                         [x.requires_grad_(), lower, upper])
    assert gx.view(-1)[10] == 0 and gx.view(-1)[0] != 0  # outside: no gradient; on the bound: inside
    # per-channel bounds take the broadcast path of ``row_grads``
    lo = torch.full((1, 3, 1, 1), -0.5, dtype=DT, requires_grad=True)
    hi = torch.tensor([1.5, 1.0, 0.7], dtype=DT).reshape(1, 3, 1, 1).requires_grad_()
    compare(lambda *t: uniform_quantize(*t, bits), lambda *t: ref_uniform(*t, bits), [x, lo, hi])


@pytest.mark.parametrize("bits", [2, 3])
def test_symmetric_and_wcc_match_composed(bits):
    w = with_edges((8, 4, 3, 3), -0.8, 0.8, seed=2).requires_grad_()
    u = torch.tensor(0.8, dtype=DT, requires_grad=True)
    compare(lambda x, b: symmetric_quantize(x, b, bits), lambda x, b: ref_uniform(x, -b, b, bits), [w, u])
    wcc = WeightClipQuantizer(bits).double()

    def ref_wcc(x, gamma):
        b = percentile(x.detach().abs(), 99.0).to(x.dtype) * gamma
        return ref_uniform(x, -b, b, bits)

    compare(lambda x, gamma: symmetric_quantize(x, wcc.weight_stat(x) * gamma, bits), ref_wcc,
            [w, torch.tensor(0.9, dtype=DT, requires_grad=True)])
    with torch.no_grad():
        wcc.gamma.fill_(0.9)
    out = wcc(w)
    out.backward(torch.ones_like(out))
    gamma_grad = wcc.gamma.grad.clone()
    gamma = torch.tensor(0.9, dtype=DT, requires_grad=True)
    ref_wcc(w.detach(), gamma).sum().backward()
    torch.testing.assert_close(gamma_grad, gamma.grad, rtol=RTOL, atol=0)


@pytest.mark.parametrize("grid", ["lsq_integer", "odm_symmetric"])
@pytest.mark.parametrize("grad_scale", [True, False])
def test_lsq_matches_composed(grid, grad_scale):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3, dtype=DT) * 0.1
    lsq = LsqWeightQuantizer(2, w, grid=grid, use_grad_scale=grad_scale).double()
    s = lsq.scale.detach()
    w.view(-1)[:4] = -2 * s  # exactly −Q_N·s and Q_P·s (2 bits: Q_N = 2, Q_P = 1)
    w.view(-1)[4:8] = s
    w.view(-1)[8] = 10.0
    if grid == "lsq_integer":
        def ref(x, scale):
            return ref_lsq(x, scale, 2, lsq.grad_factor)
    else:
        def ref(x, scale):
            scaled = scale * lsq.grad_factor
            b = (scale - scaled).detach() + scaled
            return ref_uniform(x, -b, b, 2)

    def fused(x, scale):
        with torch.no_grad():
            lsq.scale.copy_(scale)
        lsq.scale.grad = None
        out = lsq(x)
        return out + 0 * scale  # keep ``scale`` in the graph; its gradient is read from lsq.scale below

    x = w.clone().requires_grad_()
    out = lsq(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    gx, gs = torch.autograd.grad(out, (x, lsq.scale), g)
    x2, s2 = w.clone().requires_grad_(), s.clone().requires_grad_()
    out2 = ref(x2, s2)
    torch.testing.assert_close(out, out2, rtol=RTOL, atol=0)
    gx2, gs2 = torch.autograd.grad(out2, (x2, s2), g)
    torch.testing.assert_close(gx, gx2, rtol=RTOL, atol=1e-12)
    torch.testing.assert_close(gs, gs2, rtol=RTOL, atol=0)
    assert not hasattr(lsq, "enabled")


@pytest.mark.parametrize("bits", [2, 4])
def test_pams_act_and_weight_match_composed(bits):
    x = with_edges((2, 3, 5, 5), -1.2, 1.2, seed=3).requires_grad_()
    alpha = torch.tensor(1.2, dtype=DT, requires_grad=True)
    compare(lambda a, b: pams_act_quantize(a, b, bits), lambda a, b: ref_pams(a, b, bits), [x, alpha])
    w = torch.randn(8, 4, 3, 3, dtype=DT, requires_grad=True)
    compare(lambda t: max_abs_weight_quantize(t, bits), lambda t: ref_max_abs(t, bits), [w])
    compare(PamsWeightQuantizer(bits), lambda t: ref_max_abs(t, bits), [w])


@pytest.mark.parametrize("live", [True, False])
def test_pams_tracking_epoch_matches_composed(live):
    site = ActSite("q", 3, False)
    x = torch.randn(2, 3, 5, 5, dtype=DT, generator=torch.Generator().manual_seed(5)) * 2
    quant = PamsActQuantizer(3, site, live_alpha=live).double().train()  # tracking: α ← this batch's statistic
    out = quant(x.clone().requires_grad_())
    alpha = quant.alpha.detach().clone().requires_grad_(live)

    def ref(t, a):
        a = a if live else a.detach().clamp_min(1e-8)
        return ste(t * 3 / a) * a / 3

    def fused(t, a):  # the module with the same α (already tracked: a second call tracks the same batch again)
        with torch.no_grad():
            quant.alpha.copy_(a)
        return quant(t) if not live else torch.func.functional_call(quant, {"alpha": a}, (t,))

    torch.testing.assert_close(out, ref(x, alpha), rtol=RTOL, atol=0)
    compare(fused, ref, [x.clone().requires_grad_(), alpha])


@pytest.mark.parametrize("bits", [2, 4])
def test_zero_anchored_matches_composed_with_ties(bits):
    x = with_edges((2, 3, 5, 5), 0.0, 2.0, seed=4)
    x.view(-1)[20:40] = 0.0  # post-ReLU zeros tie with l = 0: half the gradient to X, half to l
    x.requires_grad_()
    lower, upper = torch.tensor(0.0, dtype=DT, requires_grad=True), torch.tensor(2.0, dtype=DT, requires_grad=True)
    gx, _, _ = compare(lambda *t: zero_anchored_quantize(*t, bits), lambda *t: ref_zero_anchored(*t, bits),
                       [x, lower, upper])
    assert gx.view(-1)[20].abs() > 0 and gx.view(-1)[10] == 0
    # per-image bounds (DDTB's gated quantizers): x grouped (B, C, N), bounds (B, 1, 1)
    grouped = x.detach().reshape(2, 3, -1).requires_grad_()
    lo = torch.tensor([0.0, -0.1], dtype=DT).reshape(2, 1, 1).requires_grad_()
    hi = torch.tensor([2.0, 1.1], dtype=DT).reshape(2, 1, 1).requires_grad_()
    compare(lambda *t: zero_anchored_quantize(*t, bits), lambda *t: ref_zero_anchored(*t, bits), [grouped, lo, hi])
    # detached bounds (DDTB's weights): only ∂/∂X
    lo_w, hi_w = torch.tensor(0.0, dtype=DT), torch.tensor(2.0, dtype=DT)
    compare(lambda t: zero_anchored_quantize(t, lo_w, hi_w, bits), lambda t: ref_zero_anchored(t, lo_w, hi_w, bits),
            [x])


@pytest.mark.parametrize("detach", [True, False])
def test_ddtb_gate_quantizer_matches_composed(detach):
    x = torch.randn(2, 32, 1, 1, dtype=DT, requires_grad=True)

    def ref(t):
        lo, hi = t.detach().min(), t.detach().max()
        sigma = 3 / (hi - lo).clamp_min(1e-8)
        q = torch.round(sigma * t.detach()) / sigma
        return q if detach else t + (q - t).detach()

    if detach:
        torch.testing.assert_close(gate_act_quantize(x, 2, True), ref(x), rtol=RTOL, atol=0)
    else:
        compare(lambda t: gate_act_quantize(t, 2, False), ref, [x])


def test_ddtb_weight_quantizer_matches_composed():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3, dtype=DT, requires_grad=True)

    def ref(t):
        lo, hi = percentile(t, (1.0, 99.0))
        return ref_zero_anchored(t, lo, hi, 2)

    compare(DdtbWeightQuantizer(2), ref, [w])


def test_backward_skips_what_the_pass_does_not_reach():
    """ODM's g_M pass (``autograd.grad(L_M, θ)``) needs no bound gradients: the fused backward leaves them out,
    and every gradient a pass asks for is the reference's."""
    torch.manual_seed(0)
    x = with_edges((2, 3, 4, 4), -0.5, 1.5).requires_grad_()
    w = torch.randn(3, 3, 1, 1, dtype=DT, requires_grad=True)
    lower, upper = torch.tensor(-0.5, dtype=DT, requires_grad=True), torch.tensor(1.5, dtype=DT, requires_grad=True)
    gamma = torch.tensor(1.0, dtype=DT, requires_grad=True)

    def net(quant, wq):
        return torch.nn.functional.conv2d(quant(x, lower * 1.0, upper * gamma, 2), wq).square().sum()

    fused, ref = net(uniform_quantize, w), net(ref_uniform, w)
    for inputs in ([w], [x], [lower], [gamma], [w, lower, upper, gamma]):
        got = torch.autograd.grad(fused, inputs, retain_graph=True)
        want = torch.autograd.grad(ref, inputs, retain_graph=True)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-12)
    with step_profile() as only_x:
        torch.autograd.grad(fused, [x], retain_graph=True)
    with step_profile() as all_params:
        torch.autograd.grad(fused, [w, x, lower, upper, gamma], retain_graph=True)
    assert "aten.mv" not in only_x.ops  # the bounds' gradients were not computed
    assert all_params.ops["aten.mv"] == 1


def test_daq_post_relu_branch_is_decided_once_without_host_syncs():
    site = ActSite("q", 3, False)
    torch.manual_seed(0)
    relu, signed = torch.relu(torch.randn(2, 3, 5, 5)), torch.randn(2, 3, 5, 5)
    for x in (relu, signed):
        quant = DaqActQuantizer(2, site, sigma_bits=4)
        first = quant(x)
        assert quant.post_relu == bool(x.min() == 0)
        with step_profile() as later:
            again = quant(x)
        assert later.total_syncs == 0
        assert torch.equal(first, again)


def test_every_quantizer_derives_from_the_base_class():
    site = ActSite("q", 4, False)
    w = torch.randn(4, 4, 3, 3)
    made = [OdmActQuantizer(2), WeightClipQuantizer(2), LsqWeightQuantizer(2, w), PamsActQuantizer(2, site),
            PamsWeightQuantizer(2), DaqActQuantizer(2, site), DdtbActQuantizer(2, site), DdtbWeightQuantizer(2),
            SkipQuantizer(OdmActQuantizer(2))]
    assert all(isinstance(m, Quantizer) for m in made)
    assert all(type(m).__name__.endswith("Quantizer") for m in made)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), SkipQuantizer(OdmActQuantizer(2)))
    assert list(quantizers(model)) == ["1", "1.act_quant"]
    assert math.isclose(float(OdmActQuantizer(2).upper), 1.0)
