"""DAQ (METHODS.md §3, §4.2): mid-rise levels, per-image/per-channel statistics against numpy, σ_c = 0,
identity STE, transformer layout, the method on a small EDSR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_method

from odm_sr.models import build_model
from odm_sr.quant.backbones import backbone_of
from odm_sr.quant.base import Bits
from odm_sr.quant.blocks import ActSite, ImageCount
from odm_sr.quant.daq import GAUSSIAN_STEPS, DaqActQuantizer, DaqWeightQuantizer
from odm_sr.quant.layers import quantized_layers

CONV = ActSite("q", 3, False)
T = {2: 1.596, 3: 0.996, 4: 0.586, 8: 0.057}


def np_midrise(v, step, bits):
    thr = (2 ** (bits - 1) - 0.5) * step
    return np.clip((np.round(v / step + 0.5) - 0.5) * step, -thr, thr)


def heavy_tailed() -> torch.Tensor:
    """Symmetric (mean 0) values: many ±1 and a dense ramp to ±10, so every level of 2–4 bits is hit."""
    return torch.cat([torch.ones(5000), -torch.ones(5000), torch.linspace(-10, 10, 201)])


def test_step_table():
    assert [GAUSSIAN_STEPS[b] for b in range(1, 10)] == [2.0, 1.596, 0.996, 0.586, 0.335, 0.188, 0.104, 0.057,
                                                          0.031]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weight_midrise_levels(bits):
    w = heavy_tailed().requires_grad_(True)
    step = T[bits] * w.detach().std()
    q = DaqWeightQuantizer(bits)(w)
    k = torch.arange(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) + 1)
    assert torch.allclose(q.detach().unique(), (k - 0.5) * step, atol=1e-5)  # 2^b levels, no zero
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # identity STE, also where clamped


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_signed_activation_levels(bits):
    # one image, one channel: μ = 0 by symmetry, σ = its std; output on (k − ½)Δ around μ
    x = heavy_tailed().reshape(1, 1, 1, -1)
    quant = DaqActQuantizer(bits, ActSite("q", 1, False))
    step = T[bits] * x.std()
    k = torch.arange(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) + 1)
    assert torch.allclose(quant(x).unique(), (k - 0.5) * step, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("unbounded", [False, True])
def test_post_relu_levels_are_multiples_of_step(bits, unbounded):
    x = torch.cat([torch.zeros(50), torch.linspace(0.01, 4, 400), torch.tensor([60.0])]).reshape(1, 1, 1, -1)
    quant = DaqActQuantizer(bits, ActSite("q", 1, False), unbounded=unbounded)
    out = quant(x)
    nonzero = x[x > 0]
    count = nonzero.numel() + 1
    mu = nonzero.sum() / count
    step = T[bits] * (nonzero.pow(2).sum() / count - mu ** 2).sqrt()
    multiples = out / step
    assert torch.allclose(multiples, multiples.round(), atol=1e-4)
    top = (2 ** bits - 1) * step
    assert top < 60.0  # the outlier is beyond the top level
    if unbounded:
        assert out.max().item() == pytest.approx((60.0 / step).round().item() * step.item(), rel=1e-5)
    else:
        assert out.max().item() == pytest.approx(top.item(), rel=1e-5) and out.min() == 0


def numpy_reference(x, bits, sigma_bits):
    """Independent per-image, per-channel DAQ forward (signed branch) in numpy."""
    mu = x.mean(axis=(2, 3), keepdims=True)
    sigma = x.std(axis=(2, 3), ddof=1, keepdims=True)
    if sigma_bits < 32:
        m = sigma.mean(axis=1, keepdims=True)
        s_step = T[sigma_bits] * sigma.std(axis=1, ddof=1, keepdims=True)
        sigma = np_midrise(sigma - m, s_step, sigma_bits) + m
    return np_midrise(x - mu, T[bits] * sigma, bits) + mu


@pytest.mark.parametrize("sigma_bits", [32, 4, 8])
def test_signed_statistics_match_numpy(sigma_bits):
    rng = np.random.default_rng(0)
    scales = np.array([1.0, 3.0, 0.2])[None, :, None, None]
    x = rng.normal(size=(2, 3, 5, 6)) * scales + rng.normal(size=(2, 3, 1, 1))
    out = DaqActQuantizer(3, CONV, sigma_bits=sigma_bits)(torch.tensor(x, dtype=torch.float64))
    np.testing.assert_allclose(out.numpy(), numpy_reference(x, 3, sigma_bits), rtol=1e-10, atol=1e-10)


def test_post_relu_statistics_match_numpy():
    rng = np.random.default_rng(1)
    x = np.maximum(rng.normal(size=(2, 3, 4, 5)), 0.0)
    out = DaqActQuantizer(2, CONV)(torch.tensor(x)).numpy()
    count = (x > 0).sum(axis=(2, 3), keepdims=True) + 1
    mu = x.sum(axis=(2, 3), keepdims=True) / count
    sigma = np.sqrt((x ** 2).sum(axis=(2, 3), keepdims=True) / count - mu ** 2)
    step = 1.596 * sigma
    expected = np.clip(np.round(x / step), 0, 3) * step
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_zero_sigma_channels():
    relu = torch.rand(2, 3, 4, 4)
    relu[0, 1] = 0.0  # an all-zero channel after ReLU
    relu[1, 2] = 0.0
    out = DaqActQuantizer(2, CONV)(relu)
    assert torch.equal(out[0, 1], torch.zeros(4, 4)) and torch.equal(out[1, 2], torch.zeros(4, 4))
    signed = torch.randn(1, 3, 4, 4)
    signed[0, 0] = -0.7  # constant channel: σ_c = 0, output is its mean (no quantization noise)
    out = DaqActQuantizer(2, CONV)(signed)
    assert torch.allclose(out[0, 0], torch.full((4, 4), -0.7))


def test_activation_identity_ste():
    x = (torch.randn(2, 3, 4, 4) * 5).requires_grad_(True)
    DaqActQuantizer(2, CONV)(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_token_layout_uses_per_image_statistics():
    """(B·nW, N, C) windows regrouped per image give the same result as the conv layout (B, C, H, W)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    conv_out = DaqActQuantizer(3, CONV, sigma_bits=8)(x)
    images = ImageCount()
    images.value = 2
    tokens = x.flatten(2).transpose(1, 2).reshape(4, 8, 3)  # 2 "windows" per image
    token_out = DaqActQuantizer(3, ActSite("q", 3, True, images), sigma_bits=8)(tokens)
    back = token_out.reshape(2, 16, 3).transpose(1, 2).reshape(2, 3, 4, 4)
    assert torch.allclose(back, conv_out, atol=1e-6)


def test_auto_sigma_bits():
    small = build_model("edsr", 2, n_resblocks=1, n_feats=8)
    for model, expected in ((build_model("edsr_baseline", 2), 4), (small, 8)):
        assert backbone_of(model).daq_sigma_bits(model) == expected


def test_finetune_fixed_steps_apply_in_training_only():
    """The release's --finetune factors (1.596, σ: 0.057) while training; its test scripts omit the flag, so
    evaluation uses t_b and t_qq."""
    quant = DaqActQuantizer(4, CONV, sigma_bits=4, fixed_steps=True)
    assert quant.train().factors() == (1.596, 0.057)
    assert quant.eval().factors() == (0.586, 0.586)
    assert DaqActQuantizer(4, CONV, sigma_bits=4).train().factors() == (0.586, 0.586)
    w = heavy_tailed()
    weight_q = DaqWeightQuantizer(3, fixed_steps=True)
    for mode, t in ((True, 1.596), (False, 0.996)):
        levels = weight_q.train(mode)(w).unique()
        assert torch.allclose(levels, (torch.arange(-3, 5) - 0.5) * t * w.std(), atol=1e-5), mode


def test_finetune_fixed_steps_only_on_edsr():
    """The release passes --finetune to EDSR's ResBlocks; RDN hard-codes it off."""
    quirk = {"quirks": {"finetune_fixed_steps": True}}
    edsr = make_method("daq", quirk, Bits(4, 4)).quantize(build_model("edsr", 2, n_resblocks=1, n_feats=8)).train()
    rdn = make_method("daq", quirk, Bits(4, 4)).quantize(build_model("rdn", 2, G0=8, D=2, C=2, G=4)).train()
    for model, fixed in ((edsr, True), (rdn, False)):
        quants = [m for m in model.modules() if isinstance(m, (DaqActQuantizer, DaqWeightQuantizer))]
        assert quants and all(q.fixed_steps == fixed for q in quants)
    assert all(m.factors()[0] == 0.586 for m in rdn.modules() if isinstance(m, DaqActQuantizer))


def released_sigma(sigma, qq, t_qq):
    """σ quantization of the release (`quantize.py`, ``Quantization.forward``), transcribed in numpy."""
    mu_s = sigma.mean(1, keepdims=True)
    step = t_qq * sigma.std(1, ddof=1, keepdims=True)
    thr = (2 ** qq / 2 - 0.5) * step
    step = step + (step == 0) * -1.0
    y = (np.round((sigma - mu_s) / step + 0.5) - 0.5) * step * (step > 0)
    return np.maximum(np.minimum(y, thr), -thr) + mu_s


def released_activation(x, bits, qq):
    """The release's activation quantizer (both branches, its negative-step behaviour included) in numpy:
    returns (output, quantized σ)."""
    relu = x.min() == 0
    if relu:
        n = (x > 0).sum((2, 3), keepdims=True) + 1.0
        mu = x.sum((2, 3), keepdims=True) / n
        sigma = np.sqrt((x ** 2).sum((2, 3), keepdims=True) / n - mu ** 2)
    else:
        mu, sigma = x.mean((2, 3), keepdims=True), x.std((2, 3), ddof=1, keepdims=True)
    sigma = released_sigma(sigma, qq, T[qq])
    step = T[bits] * sigma
    thr = (2 ** bits / 2 - 0.5) * step
    step = step + (step == 0) * -1.0
    if relu:
        return (np.round((x - thr) / step + 0.5) - 0.5) * step * (step > 0) + thr, sigma
    y = (np.round((x - mu) / step + 0.5) - 0.5) * step * (step > 0)
    return np.maximum(np.minimum(y, thr), -thr) + mu, sigma


def dead_channel_inputs() -> tuple[np.ndarray, np.ndarray]:
    """(post-ReLU with all-zero channels [0, 1] and [1, 4]; signed with constant channels [0, 2] and [1, 0]):
    with this seed every dead channel's quantized σ is negative at σ bits 4 and 8."""
    rng = np.random.default_rng(27)
    relu = np.maximum(rng.normal(size=(2, 6, 5, 5)) * rng.uniform(0.5, 2, size=(1, 6, 1, 1)), 0)
    relu[0, 1] = relu[1, 4] = 0.0
    signed = rng.normal(size=(2, 6, 5, 5)) * rng.uniform(0.5, 2, size=(1, 6, 1, 1))
    signed[0, 2], signed[1, 0] = -0.7, 1.3
    return relu, signed


@pytest.mark.parametrize("qq", [4, 8])
@pytest.mark.parametrize("bits", [2, 4])
def test_nonpositive_sigma_offset_reproduces_the_release(bits, qq):
    dead = ((0, 1), (1, 4)), ((0, 2), (1, 0))
    for x, channels in zip(dead_channel_inputs(), dead, strict=True):
        want, sigma_q = released_activation(x, bits, qq)
        relu = x.min() == 0
        for b, c in channels:
            assert sigma_q[b, c, 0, 0] < 0  # the case at issue
            thr = (2 ** (bits - 1) - 0.5) * T[bits] * sigma_q[b, c, 0, 0]  # negative
            const = thr if relu else x[b, c, 0, 0] + abs(thr)  # post-ReLU: thr; signed: μ_c + |thr|
            np.testing.assert_allclose(want[b, c], const, rtol=1e-12)
        quirk = DaqActQuantizer(bits, ActSite("q", 6, False), sigma_bits=qq, unbounded=True, nonpositive_offset=True)
        np.testing.assert_allclose(quirk(torch.tensor(x)).numpy(), want, rtol=1e-9, atol=1e-9)
        default = DaqActQuantizer(bits, ActSite("q", 6, False), sigma_bits=qq)(torch.tensor(x)).numpy()
        for b, c in channels:  # default: the channel's offset, 0 after ReLU and μ_c (its constant) otherwise
            np.testing.assert_allclose(default[b, c], 0.0 if relu else x[b, c], rtol=1e-12)


def test_config_validation():
    assert make_method("daq", {"official": True}, Bits(2, 2)).quirks == {"unbounded_relu_branch": True,
                                                          "finetune_fixed_steps": True,
                                                          "nonpositive_sigma_offset": True}
    for value in ("image", "window"):  # one legal value ('image'), so not a key
        with pytest.raises(ValueError, match="unknown method config key 'stats_scope'; known: "):
            make_method("daq", {"stats_scope": value}, Bits(2, 2))
    with pytest.raises(ValueError, match="sigma_bits"):
        make_method("daq", {"sigma_bits": 12}, Bits(2, 2))
    with pytest.raises(ValueError, match="unknown method config key"):
        make_method("daq", {"sigma_bit": 4}, Bits(2, 2))


def test_method_on_small_edsr_trains():
    torch.manual_seed(0)
    model = build_model("edsr", 2, n_resblocks=2, n_feats=8)
    method = make_method("daq", {}, Bits(2, 2))
    method.quantize(model)
    layers = quantized_layers(model)
    assert sorted(layers) == [f"body.{i}.body.{j}" for i in range(2) for j in (0, 2)]  # block_convs
    assert all(isinstance(m.act_quant, DaqActQuantizer) for m in layers.values())
    opt = torch.optim.Adam(method.param_groups(model, 1e-4))
    before = model.body[0].body[2].weight.detach().clone()
    for step in range(3):
        lr, hr = torch.rand(2, 3, 6, 6) * 255, torch.rand(2, 3, 12, 12) * 255
        out = method.training_losses(model, lr, hr, step)
        assert set(out.terms) == {"rec"} and torch.isfinite(out.terms["rec"])
        opt.zero_grad()
        out.terms["rec"].backward()
        opt.step()
    assert not torch.equal(before, model.body[0].body[2].weight)


def test_rdn_default_placement_is_rdb_convs(monkeypatch):
    from odm_sr.models import rdn

    monkeypatch.setitem(rdn.RDN_CONFIGS, "tiny", (2, 3, 4))
    model = build_model("rdn", 2, config="tiny", G0=8)
    make_method("daq", {}, Bits(4, 4)).quantize(model)
    expected = [f"RDBs.{i}.convs.{c}.conv.0" for i in range(2) for c in range(3)]
    assert sorted(quantized_layers(model)) == expected
