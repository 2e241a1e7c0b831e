"""FQSR as released (``method=fqsr``, METHODS.md §4.5, ``billhhh/FQSR@24cb67a``): the quantizer's levels and
gradients against hand-derived values and the release's own operations, the tracking phase, the 0.3 loss term,
the policy's layer and quantizer counts, the zero-padded input, and resume inside the tracking phase."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_TRAIN, KillAt, compose_config, last_checkpoint, make_method

from odm_sr.models import build_model
from odm_sr.quant.base import Bits
from odm_sr.quant.fqsr import FQSR, FqsrConv2d, FqsrQuantizer, fqsr_quantize, fqsr_quantizers
from odm_sr.train import train

W4A4_SC8 = Bits(w=4, a=4, sc=8)


def _quantizer(bits: int, clip: float) -> FqsrQuantizer:
    q = FqsrQuantizer(bits, stable=0)
    with torch.no_grad():
        q.clip.fill_(clip)
    return q


# -- the quantizer -----------------------------------------------------------------------------------------
def test_two_bit_levels_and_gradients_by_hand():
    """b = 2, c = 1.5: n = 3, levels c(2k/3 − 1) = ±0.5, ±1.5; thresholds at x = −1, 0, 1 (v·n = 0.5, 1.5, 2.5)."""
    x = torch.tensor([-3.0, -1.2, -0.9, -0.1, 0.0, 0.2, 0.8, 1.2, 1.5, 2.0], requires_grad=True)
    q = _quantizer(2, 1.5)
    y = q(x)
    # 0 → v·n = 1.5 exactly → half to even 2 → +c/3: the level the release's zero padding becomes
    assert y.tolist() == pytest.approx([-1.5, -1.5, -0.5, -0.5, 0.5, 0.5, 0.5, 1.5, 1.5, 1.5], abs=1e-6)
    g = torch.arange(1.0, 11.0)
    y.backward(g)
    assert x.grad.tolist() == [0, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # STE inside [−c, c], bounds included
    # ∂q/∂c: sign(x) outside, (q − x)/c inside
    d_c = [-1.0, -0.2, 0.4 / 1.5, -0.4 / 1.5, 0.5 / 1.5, 0.2, -0.2, 0.2, 0.0, 1.0]
    assert q.clip.grad.item() == pytest.approx(sum(gi * di for gi, di in zip(g.tolist(), d_c, strict=True)))


def test_levels_are_2_to_the_b_without_zero_and_a_negative_clip_acts_as_its_magnitude():
    for bits, n in ((4, 15), (8, 255)):
        levels = torch.unique(_quantizer(bits, 3.0)(torch.linspace(-5.0, 5.0, 20001)))
        expected = 3.0 * (2 * torch.arange(n + 1.0) / n - 1)
        assert levels.numel() == 2 ** bits and torch.allclose(levels, expected, atol=1e-6)
        assert not (levels == 0).any()
    x = torch.linspace(-4.0, 4.0, 101)
    pos, neg = _quantizer(4, 2.0), _quantizer(4, -2.0)
    assert torch.equal(pos(x), neg(x))
    pos(x).sum().backward()
    neg(x).sum().backward()
    assert neg.clip.grad.item() == pytest.approx(-pos.clip.grad.item())  # through |c|, as the release's abs()


def test_gradients_equal_autograd_through_the_releases_operations():
    """The release (quant.py, ``lsq`` + signed): y = x/|c|, clamp(−1, 1), (y+1)/2, round(y·n)/n with an
    identity backward (dorefa.LSQ), y·2 − 1, y·|c|."""
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 5, 5) * 4).requires_grad_()
    c = torch.tensor(3.3, requires_grad=True)
    g = torch.randn(2, 3, 5, 5)
    ours = fqsr_quantize(x, c, 4)
    gx, gc = torch.autograd.grad(ours, (x, c), g)
    xr, cr = x.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    y = (torch.clamp(xr / cr.abs(), -1, 1) + 1.0) / 2.0
    y = y + (torch.round(y * 15) / 15 - y).detach()
    ref = (y * 2.0 - 1.0) * cr.abs()
    rx, rc = torch.autograd.grad(ref, (xr, cr), g)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(gx, rx, rtol=1e-6, atol=0) and gc.item() == pytest.approx(rc.item(), rel=1e-5)


def test_tracking_bypasses_for_stable_calls_while_c_tracks_the_mean_max():
    q = FqsrQuantizer(4, stable=3).train()
    for i, peak in enumerate((2.0, -4.0, 6.0)):
        x = torch.tensor([0.3, peak, -0.7])
        assert torch.equal(q(x), x)  # bypassed
        assert q.clip.item() == pytest.approx([2.0, 3.0, 4.0][i])  # mean of max|x| so far
        assert (q.static_range() is None) == (i < 2)  # the third call ends the phase
    q.eval()
    assert q(torch.tensor([9.0])).item() == 4.0  # tracking over: clipped to c = 4
    assert int(q.calls) == 3 and q.static_range() == (-4.0, 4.0)
    early = FqsrQuantizer(4, stable=3).eval()
    assert torch.equal(early(torch.tensor([9.0])), torch.tensor([9.0])) and int(early.calls) == 0  # eval: no count


def test_the_input_is_quantized_after_the_zero_padding():
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    layer = FqsrConv2d.wrap(conv, _quantizer(4, 15.0), None, None)
    # every input and padding zero becomes c/15 = 1 (half to even), so each output sums nine ones, corners too
    out = layer(torch.zeros(1, 1, 3, 3))
    assert torch.allclose(out, torch.full((1, 1, 3, 3), 9.0), atol=1e-5)  # quantize-then-pad: 4 at the corners


# -- placement ----------------------------------------------------------------------------------------------
# edsr-policy.txt, counted by hand on the release's module indices (deploy_on_init numbers every custom_conv and
# custom_eltwise in model.modules() order): head.0 = 0; ResBlock i (0..15): conv1 3i+1, conv2 3i+2, its add 3i+3;
# body.16 = 49; x4: tail.0.0 = 50, tail.0.2 = 51, tail.1 = 52, global add = 53; x2: tail.0.0 = 50, tail.1 = 51,
# global add = 52. Every conv has fm (input), wt and ot (output) quantizers, every add one shared ot quantizer.
# "by_index: 0, by_tag: fm, enable: False" drops head.0's input; "by_index: 51 52 53, by_tag: ot, enable: False"
# drops x4: tail.0.2, tail.1 outputs and the global add; x2: tail.1's output and the global add.
# x4: 37 convs → 36 inputs + 37 weights + 35 outputs, 17 adds − 1 = 16 add quantizers: 124.
# x2: 36 convs → 35 inputs + 36 weights + 35 outputs, 16 add quantizers: 122.
POLICY_COUNTS = {4: {"convs": 37, "act_quant": 36, "weight_quant": 37, "out_quant": 35, "adds": 16, "total": 124},
                 2: {"convs": 36, "act_quant": 35, "weight_quant": 36, "out_quant": 35, "adds": 16, "total": 122}}


@pytest.mark.parametrize("scale", [4, 2])
def test_layer_and_quantizer_counts_equal_the_policy_files(scale):
    net = make_method("fqsr", {}, W4A4_SC8).quantize(build_model("edsr_baseline", scale))
    want = POLICY_COUNTS[scale]
    quants = fqsr_quantizers(net)
    kinds = Counter(name.rpartition(".")[2] for name in quants)
    assert sum(isinstance(m, FqsrConv2d) for m in net.modules()) == want["convs"]
    assert kinds == {"act_quant": want["act_quant"], "weight_quant": want["weight_quant"],
                     "out_quant": want["out_quant"], "res_quant": want["adds"]} and len(quants) == want["total"]
    assert net.head[0].act_quant is None and net.tail[1].out_quant is None and net.tail[0][0].out_quant is not None
    assert net.global_res_quant is None and net.global_skip_quant is None
    assert all(b.res_quant is b.skip_quant for b in net.body[:16])  # one quantizer for both operands
    bits = {k: {q.bits for n, q in quants.items() if n.endswith(k)} for k in kinds}
    assert bits == {"act_quant": {4}, "weight_quant": {4}, "out_quant": {8}, "res_quant": {8}}


def test_non_edsr_is_refused_and_prelu_replaces_relu():
    with pytest.raises(ValueError, match="does not support backbone 'rdn'"):
        make_method("fqsr", {}, W4A4_SC8).quantize(build_model("rdn", 2, G0=8, G=4, D=2, C=2))
    net = make_method("fqsr", {"prelu": True}, W4A4_SC8).quantize(build_model("edsr", 2, n_resblocks=2, n_feats=8))
    assert all(isinstance(b.body[1], torch.nn.PReLU) and b.body[1].weight.item() == 0.25 for b in net.body[:2])
    assert make_method("fqsr", {}, W4A4_SC8).ddp_unused_parameters  # clips are set, not learned, while tracking
    assert not make_method("fqsr", {"stable": 0}, W4A4_SC8).ddp_unused_parameters
    with pytest.raises(ValueError, match="stable"):
        FQSR({"stable": -1, "quant_loss_weight": 0.3, "prelu": False}, W4A4_SC8)


# -- the loss -----------------------------------------------------------------------------------------------
def test_loss_is_l1_plus_0_3_times_every_quantizer_l1_and_tracking_shares():
    torch.manual_seed(0)
    method = make_method("fqsr", {"stable": 2}, W4A4_SC8)
    net = method.quantize(build_model("edsr", 4, n_resblocks=2, n_feats=8)).train()
    lr, hr = torch.rand(2, 3, 6, 6) * 255, torch.rand(2, 3, 24, 24) * 255
    out = method.training_losses(net, lr, hr, 0)
    assert set(out.terms) == {"rec"}  # every quantizer still tracks: nothing quantized, no quantization loss
    adds = [q for n, q in fqsr_quantizers(net).items() if n.endswith("res_quant")]
    convs = [q for n, q in fqsr_quantizers(net).items() if not n.endswith("res_quant")]
    assert {int(q.calls) for q in adds} == {2} and {int(q.calls) for q in convs} == {1}  # an add runs twice
    seen: list[float] = []
    hooks = [q.register_forward_hook(lambda m, a, y: seen.append(float((a[0] - y).detach().abs().mean())))
             for q in fqsr_quantizers(net).values()]
    out = method.training_losses(net, lr, hr, 1)  # adds quantize now (2 calls done), convs make their 2nd call
    assert out.terms["quant"].item() == pytest.approx(0.3 * sum(seen), rel=1e-5)
    assert len([v for v in seen if v > 0]) == 2 * len(adds)
    seen.clear()
    out = method.training_losses(net, lr, hr, 2)  # every quantizer quantizes
    for h in hooks:
        h.remove()
    assert len(seen) == len(convs) + 2 * len(adds)
    assert out.terms["rec"].item() == pytest.approx(F.l1_loss(out.sr, hr).item())
    assert out.terms["quant"].item() == pytest.approx(0.3 * sum(seen), rel=1e-5)
    out.loss.backward()
    assert all(q.clip.grad is not None and q.clip.grad != 0 for q in fqsr_quantizers(net).values())


# -- resume inside the tracking phase ---------------------------------------------------------------------


def test_resume_mid_tracking_restores_the_call_counts_and_trains_the_same(tmp_path, monkeypatch):
    """stable=3 and a checkpoint at step 2: the convs' quantizers still track (2 calls), the adds' are done.
    The resumed run ends with the uninterrupted run's weights, clips and cosine learning rate."""
    import odm_sr.train as train_mod

    args = TINY_TRAIN + ["method=fqsr", "bits=w4a4", "method.stable=3", "optim=adam_cosine",
                         "callbacks.model_checkpoint.every_n_train_steps=2", "eval.bicubic_row=false"]
    full = tmp_path / "full"
    train(compose_config(args, full))
    real = train_mod.build_callbacks
    monkeypatch.setattr(train_mod, "build_callbacks", lambda cfg: real(cfg) + [KillAt(3)])
    killed = tmp_path / "killed"
    with pytest.raises(SystemExit):
        train(compose_config(args, killed))
    ckpt = last_checkpoint(killed)
    calls = {k: int(v) for k, v in ckpt["state_dict"].items() if k.endswith(".calls")}
    assert ckpt["global_step"] == 2 and calls["net.body.0.body.0.act_quant.calls"] == 2
    assert calls["net.body.0.res_quant.calls"] == 3  # its 3 tracking calls ran in steps 1-2: counting stopped
    monkeypatch.setattr(train_mod, "build_callbacks", real)
    train(compose_config(args + [f"resume={killed / 'checkpoints' / 'last.ckpt'}"], killed))
    final, reference = last_checkpoint(killed), last_checkpoint(full)
    assert final["global_step"] == reference["global_step"] == 6
    assert all(torch.equal(final["state_dict"][k], v) for k, v in reference["state_dict"].items())
    assert final["lr_schedulers"][0]["_last_lr"] == pytest.approx(reference["lr_schedulers"][0]["_last_lr"])
    assert int(final["state_dict"]["net.body.0.body.0.act_quant.calls"]) == 3
