"""Shared quantizer math (METHODS.md §3): level sets, hand-computed gradients, the custom autograd against the
composed autograd expression, percentiles against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from odm_sr.quant.functional import (
    grad_scale,
    percentile,
    round_ste,
    symmetric_quantize,
    uniform_quantize,
)


def _composed(x, lower, upper, bits):
    """q(X; l, u) written with plain autograd ops: Int((clip(X) − l)/s)·s + l with an STE round."""
    n = 2**bits - 1
    step = (upper - lower) / n
    clipped = torch.minimum(torch.maximum(x, lower), upper)
    return round_ste((clipped - lower) / step) * step + lower


def _grads_at(i, x, lower, upper, bits):
    """(∂q_i/∂x_i, ∂q_i/∂l, ∂q_i/∂u) for element i."""
    x = x.clone().requires_grad_(True)
    lower = torch.tensor(lower, dtype=torch.float64, requires_grad=True)
    upper = torch.tensor(upper, dtype=torch.float64, requires_grad=True)
    q = uniform_quantize(x, lower, upper, bits)
    gx, gl, gu = torch.autograd.grad(q[i], (x, lower, upper))
    return gx[i].item(), gl.item(), gu.item()


@pytest.mark.parametrize(("bits", "lower", "upper", "levels"), [
    (2, -1.0, 2.0, [-1.0, 0.0, 1.0, 2.0]),
    (3, 0.0, 7.0, [float(k) for k in range(8)]),
    (4, 0.0, 15.0, [float(k) for k in range(16)]),
    (4, -3.0, 12.0, [float(k) for k in range(-3, 13)]),
])
def test_uniform_level_set(bits, lower, upper, levels):
    x = torch.linspace(lower - 3, upper + 3, 1001, dtype=torch.float64)
    q = uniform_quantize(x, torch.tensor(lower), torch.tensor(upper), bits)
    assert torch.unique(q).tolist() == levels


def test_uniform_rounds_half_to_even():
    # l = −1, u = 2, 2 bits: s = 1, v = x + 1 → v = 0.5, 1.5, 2.5 round to 0, 2, 2
    q = uniform_quantize(torch.tensor([-0.5, 0.5, 1.5]), torch.tensor(-1.0), torch.tensor(2.0), 2)
    assert q.tolist() == [-1.0, 1.0, 1.0]


def test_uniform_gradients_by_hand():
    # l = 0, u = 3, 2 bits: n = 3, s = 1
    x = torch.tensor([0.4, -1.0, 5.0, 2.6], dtype=torch.float64)
    # inside, v = 0.4, R = 0: ∂q/∂X = 1, ∂q/∂u = (R − v)/n, ∂q/∂l = (v − R)/n
    assert _grads_at(0, x, 0.0, 3.0, 2) == pytest.approx((1.0, 0.4 / 3, -0.4 / 3))
    # below l: ∂q/∂X = 0, ∂q/∂l = 1, ∂q/∂u = 0
    assert _grads_at(1, x, 0.0, 3.0, 2) == pytest.approx((0.0, 1.0, 0.0))
    # above u: ∂q/∂X = 0, ∂q/∂l = 0, ∂q/∂u = 1
    assert _grads_at(2, x, 0.0, 3.0, 2) == pytest.approx((0.0, 0.0, 1.0))
    # inside, v = 2.6, R = 3: ∂q/∂u = 0.4/3, ∂q/∂l = −0.4/3
    assert _grads_at(3, x, 0.0, 3.0, 2) == pytest.approx((1.0, -0.4 / 3, 0.4 / 3))


def test_uniform_forward_value_by_hand():
    # l = −1, u = 0.5, 3 bits: s = 1.5/7; x = 0.1 → v = 1.1·7/1.5 = 5.1333 → R = 5 → q = −1 + 5·1.5/7
    q = uniform_quantize(torch.tensor([0.1], dtype=torch.float64), torch.tensor(-1.0), torch.tensor(0.5), 3)
    assert q.item() == pytest.approx(-1 + 5 * 1.5 / 7)


def test_per_channel_bounds_reduce_to_their_shape():
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 4, 5, dtype=torch.float64) * 2).requires_grad_(True)
    lower = torch.tensor([-1.0, -2.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1).requires_grad_(True)
    upper = torch.tensor([1.0, 0.5, 3.0], dtype=torch.float64).view(1, 3, 1, 1).requires_grad_(True)
    g_out = torch.randn_like(x)
    q = uniform_quantize(x, lower, upper, 2)
    gx, gl, gu = torch.autograd.grad((q * g_out).sum(), (x, lower, upper))
    assert gl.shape == (1, 3, 1, 1) and gu.shape == (1, 3, 1, 1)
    # by hand, channel c: ∂/∂u = Σ g·[1 above, (R − v)/n inside]; ∂/∂l = Σ g·[1 below, (v − R)/n inside]
    for c in range(3):
        l, u = lower[0, c, 0, 0].item(), upper[0, c, 0, 0].item()
        xc, gc = x.detach()[:, c], g_out[:, c]
        v = (xc.clamp(l, u) - l) / ((u - l) / 3)
        inside = (xc >= l) & (xc <= u)
        frac = (torch.round(v) - v) / 3
        assert gu[0, c, 0, 0].item() == pytest.approx((gc * ((xc > u) + inside * frac)).sum().item())
        assert gl[0, c, 0, 0].item() == pytest.approx((gc * ((xc < l).double() - inside * frac)).sum().item())
        assert torch.equal(gx[:, c], gc * inside)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("per_channel", [False, True])
def test_custom_autograd_equals_composed_expression(bits, per_channel):
    torch.manual_seed(bits)
    shape = (1, 4, 1, 1) if per_channel else ()
    x = (torch.randn(3, 4, 6, 6, dtype=torch.float64) * 1.5).requires_grad_(True)
    lower = (-torch.rand(shape, dtype=torch.float64) - 0.5).requires_grad_(True)
    upper = (torch.rand(shape, dtype=torch.float64) + 0.5).requires_grad_(True)
    g_out = torch.randn_like(x)
    q1 = uniform_quantize(x, lower, upper, bits)
    g1 = torch.autograd.grad((q1 * g_out).sum(), (x, lower, upper))
    q2 = _composed(x, lower, upper, bits)
    g2 = torch.autograd.grad((q2 * g_out).sum(), (x, lower, upper))
    assert torch.allclose(q1, q2, atol=1e-12)
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_symmetric_levels_and_gradients():
    u = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    dense = torch.linspace(-6, 6, 601, dtype=torch.float64)
    assert torch.unique(symmetric_quantize(dense, u, 2)).tolist() == [-3.0, -1.0, 1.0, 3.0]  # {±u/3, ±u}
    assert torch.unique(symmetric_quantize(dense, u, 3)).numel() == 8
    assert 0.0 not in torch.unique(symmetric_quantize(dense, u, 4)).tolist()  # no zero level
    x = torch.tensor([0.4, 5.0, -5.0, -2.5], dtype=torch.float64, requires_grad=True)
    q = symmetric_quantize(x, u, 2)
    assert q.tolist() == [1.0, 3.0, -3.0, -3.0]
    # 0.4: l = −3, s = 2, v = 1.7, R = 2 → ∂q/∂u = 2(R − v)/n = 0.2;  ±5: sign(X);
    # −2.5: v = 0.25, R = 0 → 2(0 − 0.25)/3
    expected_du = [0.2, 1.0, -1.0, -0.5 / 3]
    expected_dx = [1.0, 0.0, 0.0, 1.0]
    for i in range(4):
        gx, gu = torch.autograd.grad(q[i], (x, u), retain_graph=True)
        assert gu.item() == pytest.approx(expected_du[i])
        assert gx[i].item() == expected_dx[i]


def test_round_ste_and_grad_scale():
    x = torch.tensor([0.5, 1.5, 2.4], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0]
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx.tolist() == [1.0, 1.0, 1.0]
    s = torch.tensor(2.0, requires_grad=True)
    z = grad_scale(s, 0.25)
    assert z.item() == 2.0
    (gs,) = torch.autograd.grad(3 * z, s)
    assert gs.item() == pytest.approx(0.75)


def test_percentile_matches_numpy_linear():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 7, dtype=torch.float64)
    ref = np.percentile(x.numpy(), [1, 37.5, 99])
    got = percentile(x, (1, 37.5, 99))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)
    assert percentile(x, 99).item() == pytest.approx(ref[2], rel=1e-12)
    assert percentile(x, 100).item() == x.max().item() and percentile(x, 0).item() == x.min().item()
    assert percentile(x.float(), 99).item() == pytest.approx(ref[2], rel=1e-5)


def test_tail_percentile_makes_no_host_transfer():
    """WCC and DDTB take a weight percentile every step: it must not stop at the host (GPU readiness)."""
    from odm_sr.analysis.profiling import step_profile
    from odm_sr.quant.functional import percentile

    w = torch.randn(32, 32, 3, 3)
    with step_profile() as p:
        got = percentile(w.abs(), 99.0)
    assert p.total_syncs == 0
    assert got.item() == torch.quantile(w.abs().reshape(-1), torch.tensor(0.99)).item()
