"""Mismatch loss and cooperative update (METHODS.md §5.4, §5.5, §5.7).

The plain functions are checked on hand-built numbers; ``ODM.backward`` on a tiny float64 EDSR against g_R and
g_M from two independent backward passes (L_M rebuilt from forward hooks, not from the registry).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_method

from odm_sr.models import build_model
from odm_sr.quant.base import Bits
from odm_sr.quant.layers import quantized_layers
from odm_sr.quant.mismatch import (
    MismatchRegistry,
    balance_by_group,
    combine_gradients,
    cooperative_weight,
    mismatch_loss,
)
from odm_sr.quant.odm import OdmActQuantizer

LAMBDA_R, LAMBDA_M = 0.7, 0.05
WEIGHT = {"half_cos": lambda c: (c + 1) / 2, "cos": lambda c: max(c, 0.0), "cos_signed": lambda c: c,
          "step": lambda c: float(c > 0), "one": lambda c: 1.0}
REACHED = {f"{layer}.{kind}" for layer in ("head.0", "body.0.body.0", "body.0.body.2", "body.1.body.0")
           for kind in ("weight", "bias")}




# -- plain functions ------------------------------------------------------------------------------------
def test_cooperative_weight_by_hand():
    c = torch.tensor([-0.5, 0.0, 0.3])
    assert cooperative_weight(c, "half_cos").tolist() == pytest.approx([0.25, 0.5, 0.65])
    assert cooperative_weight(c, "cos").tolist() == pytest.approx([0.0, 0.0, 0.3])
    assert cooperative_weight(c, "cos_signed").tolist() == pytest.approx([-0.5, 0.0, 0.3])
    assert cooperative_weight(c, "step").tolist() == [0.0, 0.0, 1.0]
    assert cooperative_weight(c, "one").tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="mr.weight_fn"):
        cooperative_weight(c, "tanh")


def test_mismatch_loss_norms_by_hand():
    x = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])]
    q = [torch.zeros(2), torch.zeros(2, 2)]
    assert mismatch_loss(x, q, "l2").item() == pytest.approx(5.0 + 2.0)
    assert mismatch_loss(x, q, "l2sq").item() == pytest.approx(25.0 + 4.0)
    assert mismatch_loss(x, q, "mse").item() == pytest.approx(12.5 + 1.0)
    assert mismatch_loss(x, q, "rms").item() == pytest.approx(5.0 / math.sqrt(2) + 1.0)
    z = torch.zeros(3, requires_grad=True)
    (g,) = torch.autograd.grad(mismatch_loss([z], [torch.zeros(3)], "l2"), z)
    assert torch.equal(g, torch.zeros(3))  # no NaN at zero mismatch


def test_combine_gradients_global_by_hand():
    g_r = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])]
    g_m = [torch.tensor([1.0, 1.0]), None]  # the second parameter is not reached by L_M
    combined, stats = combine_gradients(g_r, g_m, 2.0, 0.1, "half_cos")
    c = 1.0 / (math.sqrt(5) * math.sqrt(2))  # ⟨g_R, g_M⟩ = 1, ‖g_R‖ = √5 (unreached counted), ‖g_M‖ = √2
    w = (1 + c) / 2
    assert stats["cos"].item() == pytest.approx(c) and stats["weight"].item() == pytest.approx(w)
    assert stats["grad_norm_rec"].item() == pytest.approx(math.sqrt(5))
    assert stats["grad_norm_mismatch"].item() == pytest.approx(math.sqrt(2))
    assert combined[0].tolist() == pytest.approx([2.0 + 0.1 * w, 0.1 * w])
    assert combined[1].tolist() == pytest.approx([0.0, 4.0])
    _, reached_only = combine_gradients(g_r, g_m, 2.0, 0.1, "half_cos", include_unreached=False)
    assert reached_only["cos"].item() == pytest.approx(1 / math.sqrt(2))  # ‖g_R‖ over the reached one only


def test_combine_gradients_per_tensor_by_hand():
    g_r = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, -2.0]), torch.tensor([3.0])]
    g_m = [torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]), None]
    combined, stats = combine_gradients(g_r, g_m, 1.0, 1.0, "cos", scope="per_tensor")
    c0, c1 = 1 / math.sqrt(2), -1.0
    assert combined[0].tolist() == pytest.approx([1.0 + c0, c0])
    assert combined[1].tolist() == pytest.approx([0.0, -2.0])  # w = max(0, −1) = 0
    assert combined[2].tolist() == [3.0]
    assert stats["cos"].item() == pytest.approx((c0 + c1) / 2)
    assert stats["weight"].item() == pytest.approx(c0 / 2)


def test_balance_by_hand():
    # ‖g_R‖ = 5; g_M reaches the first parameter only: ⟨g_R, g_M⟩ = 4.5, ‖g_M‖ = 2.5, c = 0.36, w = 0.68
    g_r = [torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])]
    g_m = [torch.tensor([1.5, 2.0]), None]
    _, stats = combine_gradients(g_r, g_m, 1.0, 0.1, "half_cos")
    assert stats["weight"].item() == pytest.approx(0.68)
    assert stats["balance"].item() == pytest.approx(0.1 * 0.68 * 2.5 / 5)  # ρ = λ_M·w·‖g_M‖/‖g_R‖ = 0.034
    assert balance_by_group(stats, [0, 1], 2).tolist() == pytest.approx([0.1 * 0.68 * 2.5 / 3, 0.0])
    assert balance_by_group(stats, [-1, 0], 1).tolist() == [0.0]  # an ungrouped parameter counts nowhere
    _, doubled = combine_gradients(g_r, g_m, 2.0, 0.1, "half_cos")  # relative to λ_R·g_R
    assert doubled["balance"].item() == pytest.approx(0.034 / 2)
    _, per_tensor = combine_gradients(g_r, g_m, 1.0, 0.1, "cos", scope="per_tensor")
    c0 = 4.5 / (3 * 2.5)  # the first parameter's own cosine; w = max(0, c0)
    assert per_tensor["balance"].item() == pytest.approx(0.1 * c0 * 2.5 / 5)
    _, naive = combine_gradients(g_r, [torch.zeros(2), None], 1.0, 0.1, "one")
    assert naive["balance"].item() == 0.0


def test_sign_conflict_share():
    # elements where both are non-zero: 4 (the last two pairs have a zero); sign differs in 1 of them
    g_r = [torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([3.0, 1.0])]
    g_m = [torch.tensor([1.0, 1.0, 5.0, 1.0]), torch.tensor([2.0, 0.0])]
    _, stats = combine_gradients(g_r, g_m, 1.0, 1.0, "one")
    assert stats["sign_conflict"].item() == pytest.approx(1 / 4)


@pytest.mark.parametrize(("detach_target", "grad_to_qparams"), [(True, False), (False, False),
                                                                 (True, True), (False, True)])
def test_registry_target_gradients_by_hand(detach_target, grad_to_qparams):
    # l = 0, u = 3, 2 bits: x = 0.4, 2.6, 5 → q = 0, 3, 3; d = x − q = 0.4, −0.4, 2; M = ‖d‖
    quantizer = OdmActQuantizer(2).double()
    quantizer.set_range(0.0, 3.0)
    x = torch.tensor([0.4, 2.6, 5.0], dtype=torch.float64, requires_grad=True)
    with MismatchRegistry("l2", detach_target, grad_to_qparams) as registry:
        quantizer(x)
    m = registry.total()
    d = torch.tensor([0.4, -0.4, 2.0], dtype=torch.float64)
    assert m.item() == pytest.approx(math.sqrt(4.32))
    gx, gl, gu = torch.autograd.grad(m, (x, quantizer.lower, quantizer.upper), allow_unused=True)
    outside = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    # sg(q): every element pulled to its grid point; q with STE: only the clipped element is pulled
    assert torch.allclose(gx, d / m.item() * (1 if detach_target else outside))
    if grad_to_qparams:
        dq_du = torch.tensor([-0.4 / 3, 0.4 / 3, 1.0], dtype=torch.float64)  # (R − v)/n inside, 1 above
        assert gu.item() == pytest.approx(-(d / m.item() * dq_du).sum().item())
        assert gl is not None
    else:
        assert gl is None and gu is None


# -- ODM.backward on a tiny model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model("edsr", 2, n_resblocks=2, n_feats=8, res_scale=1.0)
    method = make_method("odm", {}, Bits(w=2, a=2))
    model = method.quantize(model)
    method.calibrate(model, [torch.rand(2, 3, 8, 8) * 255 for _ in range(2)])
    model = model.double()
    gen = torch.Generator().manual_seed(1)
    lr = torch.rand(2, 3, 8, 8, generator=gen, dtype=torch.float64) * 255
    hr = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64) * 255
    g_r = _grads(model, lambda: LAMBDA_R * F.l1_loss(model(lr), hr))
    g_m = _grads(model, lambda: _mismatch_by_hooks(model, lr))
    return model, lr, hr, g_r, g_m


def _grads(model, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _mismatch_by_hooks(model, lr):
    """L_M = Σ_i ‖X_i − sg(q(X_i))‖₂ from forward hooks on the activation quantizers."""
    terms = []
    hooks = [m.register_forward_hook(lambda _m, inp, out: terms.append(
        torch.sqrt(((inp[0] - out.detach()) ** 2).sum()))) for m in model.modules()
        if isinstance(m, OdmActQuantizer)]
    model(lr)
    for h in hooks:
        h.remove()
    return sum(terms)


def _theta(names):
    return [n for n in names if "quant" not in n]


def _run(model, lr, hr, cfg):
    method = make_method("odm", {"lambda_r": LAMBDA_R, "lambda_m": LAMBDA_M, **cfg}, Bits(w=2, a=2))
    model.zero_grad(set_to_none=True)
    out = method.training_losses(model, lr, hr, 0)
    logs = method.backward(out, model, lambda loss: loss.backward())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, logs


def test_reference_setup_is_meaningful(setup):
    _, _, _, g_r, g_m = setup
    theta = _theta(g_r)
    reached = {n for n in theta if g_m[n].abs().sum() > 0}
    assert reached == REACHED  # upstream of the last quantized input only
    assert any(g_m[n].abs().sum() > 0 for n in g_r if "quant" in n)  # L_M does reach quantizer parameters
    norm_r = torch.cat([g_r[n].flatten() for n in theta]).norm()
    norm_m = torch.cat([g_m[n].flatten() for n in theta]).norm()
    assert LAMBDA_M * norm_m > 0.05 * norm_r  # the g_M term is visible in the comparison


@pytest.mark.parametrize(("mode", "weight_fn"), [("coop", "half_cos"), ("coop", "cos"),
                                                 ("coop", "cos_signed"), ("coop", "step"), ("naive", "one")])
def test_coop_grad_equals_hand_combination(setup, mode, weight_fn):
    model, lr, hr, g_r, g_m = setup
    cfg = {"mr": {"mode": mode, "weight_fn": weight_fn if mode == "coop" else "half_cos"}}
    grads, logs = _run(model, lr, hr, cfg)
    theta = _theta(g_r)
    flat_r = torch.cat([g_r[n].flatten() for n in theta])
    flat_m = torch.cat([g_m[n].flatten() for n in theta])
    c = (flat_r @ flat_m / (flat_r.norm() * flat_m.norm())).item()
    w = WEIGHT[weight_fn](c)
    for name in theta:
        assert torch.allclose(grads[name], g_r[name] + LAMBDA_M * w * g_m[name], rtol=1e-9, atol=1e-12), name
    for name in (n for n in g_r if "quant" in n):  # l_a, u_a, γ_w: g_R only
        assert torch.allclose(grads[name], g_r[name], rtol=1e-9, atol=1e-12), name
    assert logs["cos"] == pytest.approx(c, rel=1e-5) and logs["weight"] == pytest.approx(w, rel=1e-5)
    assert logs["grad_norm_rec"] == pytest.approx(flat_r.norm().item(), rel=1e-5)
    assert logs["grad_norm_mismatch"] == pytest.approx(flat_m.norm().item(), rel=1e-5)
    conflict = ((flat_r.sign() * flat_m.sign()) < 0).sum() / ((flat_r != 0) & (flat_m != 0)).sum()
    assert logs["sign_conflict"] == pytest.approx(conflict.item(), rel=1e-5)
    assert set(logs) == {"cos", "weight", "grad_norm_rec", "grad_norm_mismatch", "sign_conflict", "loss_rec",
                         "loss_mismatch", "mr/rho"}
    assert logs["mr/rho"] == pytest.approx(LAMBDA_M * abs(w) * flat_m.norm().item() / flat_r.norm().item(), rel=1e-5)


def test_balance_per_layer_and_mismatch_terms_by_hooks(setup):
    """ρ_i of each quantized layer from independent autograd gradients, M_i from forward hooks."""
    model, lr, hr, g_r, g_m = setup
    method = make_method("odm", {"lambda_r": LAMBDA_R, "lambda_m": LAMBDA_M}, Bits(w=2, a=2))
    assert method.balance_stats() == {}  # nothing before the first step
    model.zero_grad(set_to_none=True)
    logs = method.backward(method.training_losses(model, lr, hr, 0), model, lambda loss: loss.backward())
    model.zero_grad(set_to_none=True)
    stats = method.balance_stats()
    w = float(logs["weight"])  # 0-d tensors since issue 10 (no host sync in the step)
    layers = quantized_layers(model)
    assert set(stats) == {f"{n}/rho" for n in layers} | {f"{n}/mismatch" for n in layers}
    for name in layers:
        keys = [k for k in g_r if k in (f"{name}.weight", f"{name}.bias")]
        norm_r = torch.cat([g_r[k].flatten() for k in keys]).norm().item()
        norm_m = torch.cat([g_m[k].flatten() for k in keys]).norm().item()
        assert stats[f"{name}/rho"].item() == pytest.approx(LAMBDA_M * w * norm_m / norm_r, rel=1e-6), name
    last = list(layers)[-1]  # upstream of no quantizer input: L_M does not reach it
    assert stats[f"{last}/rho"].item() == 0.0 and stats[f"{list(layers)[0]}/rho"].item() > 0
    inputs = {}
    hooks = [layer.act_quant.register_forward_hook(
        lambda _m, inp, out, n=name: inputs.__setitem__(n, (inp[0] - out).norm().item()))
        for name, layer in layers.items()]
    with torch.no_grad():
        model(lr)
    for h in hooks:
        h.remove()
    for name, value in inputs.items():
        assert stats[f"{name}/mismatch"].item() == pytest.approx(value, rel=1e-9), name


def test_per_tensor_scope_and_reached_only_cosine(setup):
    model, lr, hr, g_r, g_m = setup
    theta = _theta(g_r)
    grads, _ = _run(model, lr, hr, {"mr": {"cos_scope": "per_tensor"}})
    for name in theta:
        r, m = g_r[name].flatten(), g_m[name].flatten()
        w = (1 + (r @ m / (r.norm() * m.norm())).item()) / 2 if name in REACHED else 0.0
        assert torch.allclose(grads[name], g_r[name] + LAMBDA_M * w * g_m[name], rtol=1e-9, atol=1e-12), name
    _, logs = _run(model, lr, hr, {"mr": {"cos_include_unreached": False}})
    flat_r = torch.cat([g_r[n].flatten() for n in sorted(REACHED)])
    flat_m = torch.cat([g_m[n].flatten() for n in sorted(REACHED)])
    assert logs["cos"] == pytest.approx((flat_r @ flat_m / (flat_r.norm() * flat_m.norm())).item(), rel=1e-5)


def test_off_equals_plain_l1_training(setup):
    model, lr, hr, _, _ = setup
    method = make_method("odm", {"mr": {"mode": "off"}}, Bits(w=2, a=2))
    out = method.training_losses(model, lr, hr, 0)
    assert set(out.terms) == {"rec"}
    model.zero_grad(set_to_none=True)
    method.backward(out, model, lambda loss: loss.backward())
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    plain = _grads(model, lambda: F.l1_loss(model(lr), hr))
    assert set(got) == set(plain)
    assert all(torch.equal(got[n], plain[n]) for n in plain)


@pytest.mark.parametrize("mode", ["coop", "naive"])
def test_zero_lambda_m_is_exactly_mr_off(setup, mode):
    """λ_M = 0 adds nothing to θ.grad: the mr_scale sweep's λ_M = 0 job is the no-MR row (c) bit for bit."""
    model, lr, hr, _, _ = setup
    off, _ = _run(model, lr, hr, {"mr": {"mode": "off"}})
    zero, logs = _run(model, lr, hr, {"lambda_m": 0.0, "mr": {"mode": mode}})
    assert set(off) == set(zero) and all(torch.equal(off[n], zero[n]) for n in off)
    assert logs["mr/rho"] == 0.0


def test_gamma_moves_only_with_reconstruction_loss(setup):
    model, lr, hr, g_r, _ = setup
    small, _ = _run(model, lr, hr, {"lambda_m": 1e-5})
    large, _ = _run(model, lr, hr, {"lambda_m": 0.5})
    gammas = [n for n in g_r if n.endswith("weight_quant.gamma")]
    assert len(gammas) == 4
    for name in gammas:
        assert g_r[name].abs().item() > 0
        assert torch.equal(small[name], large[name])
        assert torch.allclose(small[name], g_r[name], rtol=1e-9)  # ∂(λ_R L_R)/∂γ_w


def test_grad_to_qparams_adds_mismatch_gradient(setup):
    model, lr, hr, g_r, g_m = setup
    grads, _ = _run(model, lr, hr, {"mr": {"grad_to_qparams": True}})
    for name in (n for n in g_r if "quant" in n):
        # the registry target differs only in carrying bound gradients: sg(X) still holds
        expected = g_r[name] + LAMBDA_M * (g_m[name] + _target_bound_grad(model, lr, name))
        assert torch.allclose(grads[name], expected, rtol=1e-8, atol=1e-12), name


def _target_bound_grad(model, lr, name):
    """Extra ∂L_M/∂(l_a, u_a) of a target q(sg(X); l_a, u_a) for the quantizer owning ``name``."""
    if not name.endswith(("act_quant.lower", "act_quant.upper")):
        return torch.zeros(())
    param = model.get_parameter(name)
    quantizer = model.get_submodule(name.rsplit(".", 1)[0])
    captured = []
    hook = quantizer.register_forward_hook(lambda _m, inp, out: captured.append((inp[0], out)))
    model(lr)
    hook.remove()
    x, q = captured[0]
    from odm_sr.quant.functional import uniform_quantize
    target = uniform_quantize(x.detach(), quantizer.lower, quantizer.upper, quantizer.bits)
    diff = (x - q).detach()
    return torch.autograd.grad((-(diff / diff.norm()) * target).sum(), param)[0]


def test_backward_accumulates_like_autograd(setup):
    model, lr, hr, _, _ = setup
    method = make_method("odm", {"lambda_r": LAMBDA_R, "lambda_m": LAMBDA_M}, Bits(w=2, a=2))
    model.zero_grad(set_to_none=True)
    for _ in range(2):
        method.backward(method.training_losses(model, lr, hr, 0), model, lambda loss: loss.backward())
    twice = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    once, _ = _run(model, lr, hr, {})
    assert all(torch.allclose(twice[n], 2 * once[n], rtol=1e-12) for n in once)


def _reference_combination(g_r, g_m, lambda_r, lambda_m, weight_fn, scope):
    """The per-parameter loop of METHODS.md §5.7, written plainly (independent of the flattened code)."""
    pairs = [(r, m) for r, m in zip(g_r, g_m, strict=True) if r is not None and m is not None]
    if scope == "global":
        dot = sum(float((r * m).sum()) for r, m in pairs)
        nr = sum(float((r * r).sum()) for r in g_r if r is not None) ** 0.5
        nm = sum(float((m * m).sum()) for m in g_m if m is not None) ** 0.5
        w = WEIGHT[weight_fn](dot / (nr * nm + 1e-12))
        return [None if r is None and m is None else
                (lambda_r * r if m is None else (lambda_m * w * m if r is None else lambda_r * r + lambda_m * w * m))
                for r, m in zip(g_r, g_m, strict=True)]
    out = []
    for r, m in zip(g_r, g_m, strict=True):
        if r is None or m is None:
            out.append(None if r is None else lambda_r * r)
            continue
        c = float((r * m).sum()) / (float(r.norm()) * float(m.norm()) + 1e-12)
        out.append(lambda_r * r + lambda_m * WEIGHT[weight_fn](c) * m)
    return out


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("weight_fn", ["half_cos", "cos", "step"])
def test_flat_combination_equals_the_per_parameter_loop(scope, weight_fn):
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 3, 3, 3), (4,), (2, 4, 1, 1), (2,), (5, 2), (5,)]
    g_r = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    g_m = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    g_m[4] = g_m[5] = None  # not reached by L_M
    g_r[3] = None  # reached by L_M only
    combined, _ = combine_gradients(g_r, g_m, 0.7, 0.3, weight_fn, scope)
    for got, want, shape in zip(combined, _reference_combination(g_r, g_m, 0.7, 0.3, weight_fn, scope), shapes,
                                strict=True):
        if want is None:
            assert got is None
        else:
            assert got.shape == shape and torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_flat_combination_launches_a_fixed_number_of_kernels():
    """The cooperative combination is a few dozen aten ops whatever the number of parameters (GPU readiness:
    a per-parameter loop launched ~40 per parameter)."""
    from odm_sr.analysis.profiling import step_profile

    counts = []
    for n in (8, 64):
        g_r = [torch.randn(16, 3, 3, 3) for _ in range(n)] + [torch.randn(16)]
        g_m = [torch.randn(16, 3, 3, 3) for _ in range(n)] + [None]
        combine_gradients(g_r, g_m, 1.0, 1e-5, "half_cos")  # the segment layout is cached after the first call
        with step_profile() as p:
            combine_gradients(g_r, g_m, 1.0, 1e-5, "half_cos")
        counts.append(p.total_ops)
        assert p.total_syncs == 0
    assert counts[0] == counts[1] <= 60, counts
