"""QuantSR-C's RLQ quantizers and learnable shortcut against hand-derived values (METHODS.md §4.6;
`htqin/QuantSR@d470ad6` `ours_operator.py`, `arch_util.py`)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_method

from odm_sr.models import build_model
from odm_sr.models.edsr import ResBlock
from odm_sr.quant.layers import quantized_layers
from odm_sr.quant.quantsr import LearnableShortcut, RlqActQuantizer, RlqWeightQuantizer, sech_round


def surrogate(v: float) -> float:
    """sech²(frac(v) − ½)/(2·tanh ½), from math's cosh (independent of the torch code)."""
    frac = v - math.floor(v)
    return 1.0 / math.cosh(frac - 0.5) ** 2 / (2.0 * math.tanh(0.5))


def test_surrogate_values_by_hand():
    # cosh(½)² = 1.2715..., 2·tanh(½) = 0.92423...: 1/(1.27151·0.92423) = 0.85092 at integers, 1/0.92423 at halves
    assert surrogate(3.0) == pytest.approx(0.850918, abs=1e-6)
    assert surrogate(0.5) == pytest.approx(1.081977, abs=1e-6)


@pytest.mark.parametrize(("v", "rounded"), [(0.0, 0.0), (0.5, 0.0), (1.5, 2.0), (-0.75, -1.0), (0.25, 0.0),
                                             (2.0, 2.0), (-2.5, -2.0), (0.9, 1.0)])
def test_sech_round_forward_is_exact_and_backward_is_the_sech2_surrogate(v, rounded):
    x = torch.tensor([v], dtype=torch.float64, requires_grad=True)
    y = sech_round(x)
    y.backward()
    assert y.item() == rounded  # half to even, as torch.round / the release's input.round()
    assert x.grad.item() == pytest.approx(surrogate(v), abs=1e-12)
    # -0.75: floor -1, frac 0.25 -> the same slope as 0.25 (1 - tanh(0.25)² = 0.940015, / 0.924234 = 1.017074)
    if v in (-0.75, 0.25):
        assert x.grad.item() == pytest.approx(1.017074, abs=1e-6)


# -- the activation quantizer ----------------------------------------------------------------------------------
SIGNED_BATCH = torch.tensor([[[[-2.0, -1.0, 0.0, 1.0]], [[2.0, 3.0, 0.5, -0.5]]]])  # (1, 2 channels, 1, 4)


def test_signed_batch_decides_a_signed_grid_and_its_init():
    q = RlqActQuantizer(2, channels=2)
    out = q(SIGNED_BATCH)
    # min -2 < -1e-5: signed, Q_N = 2, Q_P = 1; mean|x| = 10/8 = 1.25 -> α = 2·1.25/√1 = 2.5
    assert bool(q.signed) and bool(q.initialized) and q.levels() == (2, 1)
    assert q.step.item() == pytest.approx(2.5)
    # x/α: ch0 [-0.8, -0.4, 0, 0.4] -> [-1, 0, 0, 0]; ch1 [0.8, 1.2 -> clip 1, 0.2, -0.2] -> [1, 1, 0, 0]
    expected = 2.5 * torch.tensor([[[[-1.0, 0.0, 0.0, 0.0]], [[1.0, 1.0, 0.0, 0.0]]]])
    assert torch.equal(out, expected)


@pytest.mark.parametrize(("low", "signed"), [(-1e-6, False), (0.0, False), (-2e-5, True)])
def test_sign_threshold_is_minus_1e5(low, signed):
    q = RlqActQuantizer(2, channels=1)
    q(torch.tensor([[[[low, 1.0, 2.0, 3.0]]]]))
    assert bool(q.signed) is signed


def test_unsigned_batch_decides_an_unsigned_grid_and_its_init():
    q = RlqActQuantizer(2, channels=1)
    out = q(torch.tensor([[[[0.0, 1.0, 2.0, 3.0]]]]))
    # unsigned: Q_N = 0, Q_P = 3; mean|x| = 1.5 -> α = 2·1.5/√3 = √3; x/α = [0, 0.577, 1.155, 1.732] -> [0, 1, 1, 2]
    assert not bool(q.signed) and q.levels() == (0, 3)
    assert q.step.item() == pytest.approx(math.sqrt(3.0), rel=1e-6)
    assert torch.allclose(out, math.sqrt(3.0) * torch.tensor([[[[0.0, 1.0, 1.0, 2.0]]]]))


def _decided(bits: int, signed: bool, step: float, shift: list[float]) -> RlqActQuantizer:
    q = RlqActQuantizer(bits, channels=len(shift)).double()
    q.load_state_dict({"shift": torch.tensor(shift, dtype=torch.float64).view(1, -1, 1, 1),
                       "step": torch.tensor(step, dtype=torch.float64),
                       "signed": torch.tensor(signed), "initialized": torch.tensor(True)})
    return q


def test_activation_gradients_of_x_shift_and_step_by_hand():
    q = _decided(2, True, 1.0, [0.25, 0.0])  # signed 2-bit: clip to [-2, 1]; α = 1
    x = torch.tensor([[[[0.25, -3.0]], [[0.9, 1.5]]]], dtype=torch.float64, requires_grad=True)
    out = q(x)
    # x' = x + shift: ch0 [0.5, -2.75], ch1 [0.9, 1.5]; R(clip) = [0 (half to even), -2 (clipped), 1, 1 (clipped)]
    assert out.detach().flatten().tolist() == [0.0, -2.0, 1.0, 1.0]
    out.backward(torch.ones_like(out))
    r_half, r_09 = surrogate(0.5), surrogate(0.9)  # 1.081977, 0.925779
    assert x.grad.flatten().tolist() == pytest.approx([r_half, 0.0, r_09, 0.0], abs=1e-12)
    assert q.shift.grad.flatten().tolist() == pytest.approx([r_half, r_09], abs=1e-12)
    # ∂q/∂α: inside R − R'(v)·v, outside the bound (−Q_N = −2, Q_P = 1); g = 1/√(numel·Q_P) = 1/√4 = 0.5
    by_hand = 0.5 * ((0.0 - r_half * 0.5) + (-2.0) + (1.0 - r_09 * 0.9) + 1.0)
    assert by_hand == pytest.approx(-0.687096, abs=1e-6)
    assert q.step.grad.item() == pytest.approx(by_hand, abs=1e-12)


def test_unsigned_activation_step_gradient_uses_unsigned_q_p():
    q = _decided(2, False, 0.5, [0.0])  # unsigned 2-bit: clip to [0, 3], α = 0.5
    x = torch.tensor([[[[0.6, -0.1, 2.0]]]], dtype=torch.float64, requires_grad=True)
    out = q(x)
    # v = [1.2, -0.2 -> clip 0, 4 -> clip 3]; R = [1, 0, 3] -> q = [0.5, 0, 1.5]
    assert out.detach().flatten().tolist() == [0.5, 0.0, 1.5]
    out.backward(torch.ones_like(out))
    g = 1.0 / math.sqrt(3 * 3)  # numel 3, Q_P 3
    assert q.step.grad.item() == pytest.approx(g * ((1.0 - surrogate(1.2) * 1.2) + 0.0 + 3.0), abs=1e-12)
    assert x.grad.flatten().tolist() == pytest.approx([surrogate(1.2), 0.0, 0.0], abs=1e-12)


def test_decision_and_init_survive_a_state_dict_round_trip():
    q = RlqActQuantizer(2, channels=2)
    q(SIGNED_BATCH)
    fresh = RlqActQuantizer(2, channels=2)
    fresh.load_state_dict(q.state_dict())
    positive = torch.ones(1, 2, 1, 4) * 7.0
    fresh(positive)  # a positive batch after the load must neither re-decide the sign nor re-initialise α
    assert bool(fresh.signed) and fresh.levels() == (2, 1) and fresh.step.item() == pytest.approx(2.5)


# -- the weight quantizer ------------------------------------------------------------------------------------------
def test_weight_init_levels_and_step_gradient_by_hand():
    w = torch.tensor([[0.1, -0.3], [0.5, -0.9]], dtype=torch.float64)
    q = RlqWeightQuantizer(2, w).double()
    assert q.step.item() == pytest.approx(2 * 0.45 / math.sqrt(1))  # mean|W| = 0.45, Q_P = 1 at 2 bits
    assert RlqWeightQuantizer(4, w).step.item() == pytest.approx(2 * 0.45 / math.sqrt(7), rel=1e-6)
    wp = w.clone().requires_grad_(True)
    out = q(wp)
    # W/α = [0.111, -0.333, 0.556, -1.0] -> R = [0, 0, 1, -1] (all inside [-2, 1])
    assert out.detach().flatten().tolist() == pytest.approx([0.0, 0.0, 0.9, -0.9], abs=1e-12)
    out.backward(torch.ones_like(out))
    v = [0.1 / 0.9, -0.3 / 0.9, 0.5 / 0.9, -1.0]
    rounded = [0.0, 0.0, 1.0, -1.0]
    g = 1.0 / math.sqrt(4 * 1)
    by_hand = g * sum(r - surrogate(vi) * vi for r, vi in zip(rounded, v, strict=True))
    assert q.step.grad.item() == pytest.approx(by_hand, abs=1e-12)
    assert wp.grad.flatten().tolist() == pytest.approx([surrogate(vi) for vi in v], abs=1e-12)


# -- the learnable shortcut ---------------------------------------------------------------------------------------
def test_learnable_shortcut_is_s_x_plus_residual_with_its_gradient():
    torch.manual_seed(0)
    block = ResBlock(4).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    residual = block.body(x)
    wrapped = LearnableShortcut(block).double()
    assert torch.equal(wrapped(x), block(x))  # s = 1: the block unchanged
    assert set(wrapped.state_dict()) == {f"body.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")} | {
        "learnable_shortcut"}
    with torch.no_grad():
        wrapped.learnable_shortcut.fill_(0.5)
    out = wrapped(x)
    assert torch.allclose(out, 0.5 * x + residual, atol=1e-12)
    gout = torch.randn_like(out)
    out.backward(gout)
    assert wrapped.learnable_shortcut.grad.item() == pytest.approx((gout * x).sum().item(), abs=1e-9)


# -- the method on a backbone -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "kwargs", "layers", "blocks"),
                         [("edsr", {"n_resblocks": 2, "n_feats": 8}, 4, 2),
                          ("srresnet", {"n_resblocks": 3, "n_feats": 8}, 6, 3)])
def test_quantize_places_rlq_on_block_convs_and_wraps_every_block(model, kwargs, layers, blocks):
    net = build_model(model, 2, **kwargs)
    fp_keys = set(net.state_dict())
    method = make_method("quantsr", bits={"w": 2, "a": 2})
    net = method.quantize(net)
    names = list(quantized_layers(net))
    assert len(names) == layers and all(".body." in n or ".conv" in n for n in names)
    assert sum(isinstance(m, LearnableShortcut) for m in net.modules()) == blocks
    keys = set(net.state_dict())
    assert fp_keys <= keys  # the backbone's own keys are unchanged
    extra = {k.rsplit(".", 1)[1] for k in keys - fp_keys}
    assert extra == {"learnable_shortcut", "shift", "step", "signed", "initialized"}
    groups = {g["name"]: len(g["params"]) for g in method.param_groups(net, 1e-4)}
    assert groups["qparams"] == 3 * layers  # shift + α_a + α_w per layer


def test_without_the_shortcut_and_at_fp_bits():
    net = make_method("quantsr", {"learnable_shortcut": False}, {"w": 2, "a": 2}).quantize(
        build_model("srresnet", 2, n_resblocks=1, n_feats=8))
    assert not any(isinstance(m, LearnableShortcut) for m in net.modules()) and len(quantized_layers(net)) == 2
    fp = make_method("quantsr").quantize(build_model("srresnet", 2, n_resblocks=1, n_feats=8))
    assert not quantized_layers(fp)


def test_a_backbone_without_residual_blocks_is_refused_naming_the_switch():
    with pytest.raises(ValueError, match="learnable_shortcut=false"):
        make_method("quantsr", bits={"w": 2, "a": 2}).quantize(build_model("rdn", 2, D=1, C=1, G=8, G0=8))


def test_bad_option_is_refused():
    with pytest.raises(ValueError, match="qparam_lr_mult"):
        make_method("quantsr", {"qparam_lr_mult": 0.0})


def test_export_refuses_quantsr_naming_the_quantizer():
    from odm_sr.export.spec import ExportError, check_static

    net = build_model("srresnet", 2, n_resblocks=1, n_feats=8)
    net = make_method("quantsr", bits={"w": 2, "a": 2}).quantize(net)
    with pytest.raises(ExportError, match=r"body\.0\.conv1\.act_quant \(RlqActQuantizer\): QuantSR's per-input"):
        check_static(net)
