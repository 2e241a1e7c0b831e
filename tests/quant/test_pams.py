"""PAMS (METHODS.md §3, §4.1): quantizer levels and gradients, the epoch-1 α rule, placement, training."""

from __future__ import annotations

import pytest
import torch
from helpers import make_method

from odm_sr.models import build_model
from odm_sr.quant.base import Bits, frozen_copy
from odm_sr.quant.blocks import ActSite, QuantResBlock
from odm_sr.quant.functional import round_ste
from odm_sr.quant.layers import QuantConv2d, quantized_layers
from odm_sr.quant.pams import PamsActQuantizer, max_abs_weight_quantize, pams_act_quantize

SITE = ActSite("q", 4, False)


def small_edsr(blocks: int = 2):
    torch.manual_seed(0)
    return build_model("edsr", 2, n_resblocks=blocks, n_feats=8)


# -- weights --------------------------------------------------------------------------------------------
def test_weight_levels_by_hand():
    w = torch.tensor([-1.0, -0.6, -0.4, 0.2, 0.45, 0.8])
    m = 1.0 + 1e-8
    # 2 bits, Q = 1: ternary Int(w/m)·m
    assert torch.allclose(max_abs_weight_quantize(w, 2), torch.tensor([-1.0, -1, 0, 0, 0, 1]) * m)
    # 3 bits, Q = 3: w·3 = [-3, -1.8, -1.2, 0.6, 1.35, 2.4] → [-3, -2, -1, 1, 1, 2]
    assert torch.allclose(max_abs_weight_quantize(w, 3), torch.tensor([-3.0, -2, -1, 1, 1, 2]) * m / 3)
    # 4 bits, Q = 7: w·7 = [-7, -4.2, -2.8, 1.4, 3.15, 5.6] → [-7, -4, -3, 1, 3, 6]
    assert torch.allclose(max_abs_weight_quantize(w, 4), torch.tensor([-7.0, -4, -3, 1, 3, 6]) * m / 7)


@pytest.mark.parametrize("bits, levels", [(2, 3), (3, 7), (4, 15)])
def test_weight_level_count_and_ste(bits, levels):
    w = torch.linspace(-2, 2, 4001, requires_grad=True)
    q = max_abs_weight_quantize(w, bits)
    assert q.detach().unique().numel() == levels
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # STE, no clipping


# -- activations ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, q_max", [(2, 1), (3, 3), (4, 7)])
def test_activation_levels(bits, q_max):
    alpha = torch.tensor(1.5)
    x = torch.linspace(-3, 3, 6001)
    out = pams_act_quantize(x, alpha, bits).unique()
    assert torch.allclose(out, torch.arange(-q_max, q_max + 1) * 1.5 / q_max)  # 2^b − 1 levels in [−α, α]
    post_relu = pams_act_quantize(x.clamp_min(0), alpha, bits).unique()
    assert post_relu.numel() == q_max + 1  # 2 / 4 / 8


def test_activation_gradients_by_hand():
    # α = 2, 3 bits (Q = 3): v = 1.5x
    x = torch.tensor([0.5, 1.1, 2.5, -3.0, -1.9])
    expected_alpha = [(1 - 0.75) / 3, (2 - 1.65) / 3, 1.0, -1.0, (-3 + 2.85) / 3]
    expected_x = [1.0, 1.0, 0.0, 0.0, 1.0]
    for i in range(len(x)):
        xi = x.clone().requires_grad_(True)
        alpha = torch.tensor(2.0, requires_grad=True)
        pams_act_quantize(xi, alpha, 3)[i].backward()
        assert alpha.grad.item() == pytest.approx(expected_alpha[i], abs=1e-6)
        assert xi.grad[i].item() == expected_x[i]


def test_activation_gradients_match_composed_reference():
    torch.manual_seed(1)
    x1 = (torch.randn(64) * 2).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    a1, a2 = torch.tensor(1.7, requires_grad=True), torch.tensor(1.7, requires_grad=True)
    weights = torch.randn(64)
    (pams_act_quantize(x1, a1, 4) * weights).sum().backward()
    clipped = torch.maximum(torch.minimum(x2, a2), -a2)  # `pams_quant_act` as released
    (round_ste(clipped * 7 / a2) * a2 / 7 * weights).sum().backward()
    assert torch.allclose(x1.grad, x2.grad) and torch.allclose(a1.grad, a2.grad, atol=1e-5)


def test_alpha_epoch1_rule_then_clip_and_learn():
    quant = PamsActQuantizer(2, SITE).train()
    assert quant.alpha.item() == 10.0
    x1 = torch.zeros(2, 4, 3, 3)
    x1[0, 1, 0, 0], x1[1, 2, 1, 1] = -3.0, 5.0  # per-image max|x| = 3, 5
    quant(x1)
    assert quant.alpha.item() == pytest.approx(4.0)  # first batch: mean of per-image max
    x2 = torch.zeros(2, 4, 3, 3)
    x2[:, 0, 0, 0] = 10.0
    x2[0, 0, 1, 1] = 9.0
    out = quant(x2)
    alpha = 0.9997 * 4.0 + 0.0003 * 10.0
    assert quant.alpha.item() == pytest.approx(alpha)
    assert out.max().item() == pytest.approx(round(10.0 / alpha) * alpha)  # nothing clipped in epoch 1
    assert quant.alpha.grad is None
    quant.tracking = False  # epoch 2: α clips and learns
    x3 = x2.clone().requires_grad_(True)
    out = quant(x3)
    assert out.max().item() == pytest.approx(alpha)
    out.sum().backward()
    assert quant.alpha.grad.item() > 0  # the clipped entries pull α up
    assert quant.alpha.item() == pytest.approx(alpha)  # no longer overwritten


def test_alpha_last_batch_quirk():
    quant = PamsActQuantizer(2, SITE, last_batch=True).train()
    quant(torch.full((1, 4, 2, 2), 4.0))
    quant(torch.full((1, 4, 2, 2), 10.0))
    assert quant.alpha.item() == pytest.approx(10.0)


def test_alpha_grad_while_tracking_quirk_by_hand():
    """Released `pams_quant_act` in its EMA epoch: α.data ← the batch statistic, then q = Int(x·Q/α)·α/Q with the
    live α and an identity-STE round, so ∂q/∂α = (Int(v) − v)/Q with v = x·Q/α and nothing clipped."""
    x = torch.zeros(1, 4, 1, 3)
    x[0, 0] = torch.tensor([0.5, -1.2, 2.0])
    x[0, 1] = torch.tensor([0.9, 3.1, -0.4])  # max|x| = 3.1 = α; Q = 3 at 3 bits
    grad_out = torch.arange(12, dtype=torch.float32).reshape(1, 4, 1, 3) / 10 - 0.3
    quant = PamsActQuantizer(3, SITE, live_alpha=True).train()
    out = quant(x.clone().requires_grad_(True))
    out.backward(grad_out)
    v = x * 3 / 3.1
    assert torch.allclose(out, torch.round(v) * 3.1 / 3)
    assert quant.alpha.item() == pytest.approx(3.1)
    assert quant.alpha.grad.item() == pytest.approx(float((grad_out * (torch.round(v) - v) / 3).sum()), rel=1e-5)
    default = PamsActQuantizer(3, SITE).train()
    default(x.clone().requires_grad_(True)).backward(grad_out)
    assert default.alpha.grad is None


@pytest.mark.parametrize("cfg", [{"official": True}, {"quirks": {"alpha_grad_while_tracking": True}}])
def test_alpha_tracking_quirk_builds_adam_moments(cfg):
    """Under the quirk Adam sees α's gradient from the first step on (and moves it; the next batch overwrites)."""
    model = small_edsr(1)
    teacher = frozen_copy(model)
    method = make_method("pams", {**cfg, "iters_per_epoch": 2}, Bits(2, 2))
    method.quantize(model)
    opt = torch.optim.Adam(method.param_groups(model, 1e-4))
    quant = model.body[0].quant_act1
    torch.manual_seed(2)
    lr, hr = torch.rand(2, 3, 6, 6) * 255, torch.rand(2, 3, 12, 12) * 255
    out = method.training_losses(model, lr, hr, 0, teacher=teacher)
    stat_alpha = quant.alpha.item()
    sum(out.terms.values()).backward()
    assert quant.tracking and quant.alpha.grad is not None and quant.alpha.grad.item() != 0
    opt.step()
    assert opt.state[quant.alpha]["exp_avg"].abs().item() > 0
    assert abs(quant.alpha.item() - stat_alpha) == pytest.approx(1e-2, rel=1e-3)  # Adam's first step: lr·sign(g)


# -- the method -----------------------------------------------------------------------------------------
def test_edsr_placement_and_checkpoint_keys():
    model = small_edsr()
    fp_state = model.state_dict()
    make_method("pams", {}, Bits(2, 2)).quantize(model)
    assert isinstance(model.body[0], QuantResBlock) and isinstance(model.body[1], QuantResBlock)
    layers = quantized_layers(model)
    assert sorted(layers) == [f"body.{i}.body.{j}" for i in range(2) for j in (0, 2)]
    assert all(layers[n].act_quant is None for n in layers if n.endswith(".0"))
    assert all(isinstance(layers[n].act_quant, PamsActQuantizer) for n in layers if n.endswith(".2"))
    assert all(isinstance(model.body[i].quant_act1, PamsActQuantizer) for i in range(2))
    missing, unexpected = model.load_state_dict(fp_state, strict=False)
    assert not unexpected and all("quant" in k for k in missing)


@pytest.mark.parametrize("raw", [False, True])
def test_conv1_input(raw):
    model = small_edsr(1)
    make_method("pams", {"quirks": {"conv1_raw_input": raw}}, Bits(2, 2)).quantize(model)
    block = model.body[0]
    seen = {}
    block.body[0].register_forward_pre_hook(lambda m, a: seen.update(conv1=a[0]))
    block.quant_act1.register_forward_hook(lambda m, a, out: seen.update(block_in=a[0], skip=out))
    model(torch.rand(1, 3, 6, 6) * 255)
    assert torch.equal(seen["conv1"], seen["block_in"] if raw else seen["skip"])
    assert not torch.equal(seen["block_in"], seen["skip"])


def test_config_validation_and_official():
    method = make_method("pams", {"official": True}, Bits(2, 2))
    assert all(method.quirks.values()) and method.init_from_fp is False
    assert make_method("pams", {}, Bits(2, 2)).init_from_fp is True
    with pytest.raises(ValueError, match="typo_quirk"):
        make_method("pams", {"quirks": {"typo_quirk": True}}, Bits(2, 2))
    with pytest.raises(ValueError, match="alpha_init"):
        make_method("pams", {"alpha_init": 0}, Bits(2, 2))
    with pytest.raises(ValueError, match="ema_decay"):
        make_method("pams", {"ema_decay": 1.5}, Bits(2, 2))
    with pytest.raises(ValueError, match="placement.edsr"):
        make_method("pams", {"placement": {"edsr": "everything"}}, Bits(2, 2)).quantize(small_edsr(1))


def test_training_steps_follow_the_alpha_schedule():
    model = small_edsr()
    teacher = frozen_copy(model)
    method = make_method("pams", {"iters_per_epoch": 2}, Bits(2, 2))
    method.quantize(model)
    groups = method.param_groups(model, 1e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("net", 1e-4), ("alpha", 1e-2)]
    assert len(groups[1]["params"]) == 6  # 3 quantizers per block
    opt = torch.optim.Adam(groups)
    quant = model.body[0].quant_act1
    torch.manual_seed(2)
    before = model.body[0].body[0].weight.detach().clone()
    for step in range(5):
        lr, hr = torch.rand(2, 3, 6, 6) * 255, torch.rand(2, 3, 12, 12) * 255
        out = method.training_losses(model, lr, hr, step, teacher=teacher)
        assert set(out.terms) == {"rec", "skt"} and torch.isfinite(sum(out.terms.values()))
        stat_alpha = quant.alpha.item()
        opt.zero_grad()
        sum(out.terms.values()).backward()
        opt.step()
        if step < 2:  # epoch 1: α is the data statistic, not learned
            assert quant.tracking and quant.alpha.grad is None
        else:
            assert not quant.tracking and quant.alpha.item() != stat_alpha
    assert not torch.equal(before, model.body[0].body[0].weight)
    assert set(method.log_stats(model)) >= {"alpha/mean", "alpha/body.0.quant_act1"}


def test_rdn_official_placement(monkeypatch):
    from odm_sr.models import rdn

    monkeypatch.setitem(rdn.RDN_CONFIGS, "tiny", (2, 3, 4))
    model = build_model("rdn", 2, config="tiny", G0=8)
    fp_state = model.state_dict()
    make_method("pams", {}, Bits(4, 4)).quantize(model)
    acts = [n for n, m in model.named_modules() if isinstance(m, PamsActQuantizer)]
    # per RDB: input, dense concats c = 1, 2, LFF input; then GFF.0 and GFF.1 inputs
    assert len(acts) == 2 * 4 + 2
    expected = {"RDBs.0.act_quant", "RDBs.0.convs.1.act_quant", "RDBs.1.LFF.act_quant", "GFF.1.act_quant"}
    assert expected <= set(acts)
    assert len(quantized_layers(model)) == 2 * 4 + 2
    assert not model.load_state_dict(fp_state, strict=False).unexpected_keys
    seen = {}
    dense = model.RDBs[0].convs[1]
    dense.act_quant.register_forward_hook(lambda m, a, out: seen.update(quantized=out))
    dense.register_forward_hook(lambda m, a, out: seen.update(concat=out))
    out = model(torch.rand(1, 3, 5, 5) * 255)
    assert out.shape == (1, 3, 10, 10)
    # the dense layer concatenates its quantized input (released RDB_Conv_in), not the FP one
    assert torch.equal(seen["concat"][:, : seen["quantized"].shape[1]], seen["quantized"])

    model = build_model("rdn", 2, config="tiny", G0=8)
    make_method("pams", {"quirks": {"rdn_gff3_fp_input": True}}, Bits(4, 4)).quantize(model)
    assert isinstance(model.GFF[1], QuantConv2d) and model.GFF[1].act_quant is None


def test_transformer_uses_odm_layers():
    from odm_sr.quant.backbones import select_layers

    kwargs = dict(img_size=8, embed_dim=12, depths=(2,), num_heads=(2,), window_size=4)
    expected = select_layers(build_model("swinir_light", 2, **kwargs))
    model = build_model("swinir_light", 2, **kwargs)
    make_method("pams", {}, Bits(4, 4)).quantize(model)
    assert sorted(quantized_layers(model)) == sorted(expected)
