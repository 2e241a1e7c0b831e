"""ODM-FQ: full quantization of EDSR (Table S4, METHODS.md §4.5): placement, skip quantizers, checkpoint keys,
calibration, the cooperative update, L_M membership and the Hydra config."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import compose_config, make_method, method_config

from odm_sr.models import build_model, is_quantizer_key, load_pretrained
from odm_sr.models.edsr import EDSR, MeanShift, ResBlock
from odm_sr.quant import build_method
from odm_sr.quant.base import Bits
from odm_sr.quant.calibration import batch_range, quantizers_off
from odm_sr.quant.fq import FullyQuantizedEDSR, FullyQuantizedResBlock, SkipQuantizer, skip_quantizers
from odm_sr.quant.layers import QuantConv2d, quantized_layers
from odm_sr.quant.mismatch import MismatchRegistry
from odm_sr.quant.odm import ODM, OdmActQuantizer, WeightClipQuantizer, check_odm_config
from odm_sr.quant.quantizer import quantizer_prefixes

FQ = {"enabled": True}
W4A4_SC8 = Bits(w=4, a=4, sc=8)
CONVS = ["head.0", "body.0.body.0", "body.0.body.2", "body.1.body.0", "body.1.body.2", "body.2",
         "tail.0.0", "tail.0.2", "tail.1"]  # x4, 2 blocks: 1 + 2·2 + 1 + 2 + 1
SKIPS = ["body.0.res_quant", "body.0.skip_quant", "body.1.res_quant", "body.1.skip_quant",
         "global_res_quant", "global_skip_quant"]  # 2 per block + 2 global




def _tiny_edsr(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("edsr", 4, n_resblocks=2, n_feats=8, res_scale=1.0)


def _fq_model(fq: dict | None = None, bits: Bits = W4A4_SC8, **cfg):
    method = make_method("odm", {"fq": {**FQ, **(fq or {})}, **cfg}, bits)
    return method, method.quantize(_tiny_edsr())


def _lr(n: int = 2, seed: int = 1, dtype=torch.float32):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 255


# -- configuration ---------------------------------------------------------------------------------------
def test_fq_is_off_by_default_and_validated():
    assert method_config("odm")["fq"]["enabled"] is False
    model = make_method("odm", {}, W4A4_SC8).quantize(_tiny_edsr())
    assert type(model) is EDSR and not skip_quantizers(model) and "head.0" not in quantized_layers(model)
    invalid = [({"sc_operands": "left"}, "fq.sc_operands"), ({"enabled": "yes"}, "fq.enabled"),
               ({"quantize_outputs": False}, "unknown method config key 'fq.quantize_outputs'"),  # one value: no key
               ({"sc_bits": 8}, "fq.sc_bits")]
    for override, match in invalid:
        with pytest.raises(ValueError, match=match):
            check_odm_config(method_config("odm", {"fq": override}))


def test_non_edsr_raises():
    swinir = build_model("swinir_light", 2, embed_dim=12, depths=(2,), num_heads=(2,), img_size=16,
                         window_size=4, drop_path_rate=0.0)
    for model in (swinir, build_model("rdn", 2, G0=8, G=4, D=3, C=2)):
        with pytest.raises(ValueError, match="fully-quantized mode is implemented for EDSR only"):
            make_method("odm", {"fq": FQ}, W4A4_SC8).quantize(model)


# -- placement ---------------------------------------------------------------------------------------------
def test_every_conv_head_to_tail_and_both_skip_operands():
    _, model = _fq_model()
    convs = {n: m for n, m in quantized_layers(model).items() if isinstance(m, QuantConv2d)}
    assert list(convs) == CONVS
    assert all(isinstance(m.weight_quant, WeightClipQuantizer) and m.weight_quant.bits == 4
               for m in convs.values())
    assert convs["head.0"].act_quant is None  # quantize_image_input=false: the image is not re-quantized
    assert all(isinstance(m.act_quant, OdmActQuantizer) and m.act_quant.bits == 4
               for n, m in convs.items() if n != "head.0")
    assert type(model.sub_mean) is MeanShift and type(model.add_mean) is MeanShift
    skips = skip_quantizers(model)
    assert list(skips) == SKIPS
    assert all(isinstance(s.act_quant, OdmActQuantizer) and s.act_quant.bits == 8 for s in skips.values())
    assert type(model) is FullyQuantizedEDSR
    assert all(type(b) is FullyQuantizedResBlock for b in model.body[:2])
    assert model(_lr(1)).shape == (1, 3, 32, 32)
    _, with_image = _fq_model({"quantize_image_input": True})
    assert with_image.head[0].act_quant.bits == 4


def test_skip_quantizer_has_2_to_the_sc_levels():
    _, model = _fq_model()
    q = model.global_skip_quant.act_quant
    q.set_range(-10.0, 245.0)  # s = 255 / (2^8 − 1) = 1
    x = torch.tensor([-12.0, 2.5, 3.4, 3.5, 300.0])
    assert q(x).tolist() == [-10.0, 2.0, 3.0, 4.0, 245.0]  # clip, half-to-even, clip
    levels = torch.unique(q(torch.linspace(-20.0, 260.0, 5001)))
    assert levels.numel() == 2**8 and torch.equal(levels, torch.arange(-10.0, 246.0))
    layer_q = model.tail[1].act_quant
    layer_q.set_range(-10.0, 245.0)
    assert torch.unique(layer_q(torch.linspace(-20.0, 260.0, 5001))).numel() == 2**4


def test_identity_operands_or_float_sc_add_no_skip_quantizers():
    for fq, bits in (({"sc_operands": "identity"}, W4A4_SC8), ({}, Bits(w=4, a=4, sc=32))):
        _, model = _fq_model(fq, bits)
        assert not skip_quantizers(model) and type(model) is EDSR
        assert all(type(b) is ResBlock for b in model.body[:2])
        assert [n for n, m in quantized_layers(model).items() if isinstance(m, QuantConv2d)] == CONVS


def test_official_keys_load_strictly():
    official = _tiny_edsr(seed=1).state_dict()
    float_model = load_pretrained(_tiny_edsr(), official)
    model = make_method("odm", {"fq": FQ}, W4A4_SC8).quantize(float_model)
    state = model.state_dict()
    assert [k for k in state if not is_quantizer_key(k)] == list(official)
    assert all(torch.equal(state[k], v) for k, v in official.items())
    assert {"global_skip_quant.act_quant.lower", "body.1.res_quant.act_quant.upper"} <= set(state)
    with torch.no_grad():
        model.tail[1].weight.zero_()
    load_pretrained(model, official, skip_prefixes=quantizer_prefixes(model))  # strict: raises on any missing key
    assert torch.equal(model.tail[1].weight, official["tail.1.weight"])
    _, twin = _fq_model()
    twin.load_state_dict(state, strict=True)  # an FQ checkpoint (quantizer state included) round-trips


# -- calibration, parameter groups, training --------------------------------------------------------------
@pytest.mark.parametrize("source", ["fp", "sequential"])
def test_calibration_covers_skip_quantizers(source):
    method, model = _fq_model(init={"source": source, "num_batches": 2})
    batches = [_lr(), _lr(seed=2)]
    ranges = method.calibrate(model, batches)
    assert set(SKIPS) <= set(ranges) and "head.0" not in ranges
    assert all(bool(s.act_quant.initialized) for s in skip_quantizers(model).values())
    if source == "fp":  # the global skip operand is the FP head output: mean of per-batch (P1, P99)
        with quantizers_off(quantized_layers(model).values()), torch.no_grad():
            expected = sum(batch_range(model.head(model.sub_mean(x)), 99.0) for x in batches) / 2
        assert ranges["global_skip_quant"] == pytest.approx(tuple(expected.tolist()), rel=1e-5)


def test_param_groups_put_skip_bounds_with_quantizer_params():
    method, model = _fq_model()
    groups = {g["name"]: g for g in method.param_groups(model, 1e-4)}
    assert len(groups["theta"]["params"]) == 2 * len(CONVS)
    skip_bounds = {id(p) for s in skip_quantizers(model).values() for p in s.parameters()}
    act_group = {id(p) for p in groups["act_qparams"]["params"]}
    assert len(skip_bounds) == 2 * len(SKIPS) and skip_bounds <= act_group
    assert len(act_group) == 2 * (len(CONVS) - 1 + len(SKIPS))
    assert groups["act_qparams"]["lr"] == pytest.approx(1e-3)


def _registry_count(model) -> int:
    with MismatchRegistry() as registry:
        model(_lr())
    return len(registry.terms)


def test_sc_in_mismatch_controls_registry_entries():
    counts = {flag: _registry_count(_fq_model({"sc_in_mismatch": flag})[1]) for flag in (True, False)}
    assert counts == {True: len(CONVS) - 1 + len(SKIPS), False: len(CONVS) - 1}


def test_few_odm_training_steps():
    method, model = _fq_model()
    method.calibrate(model, [_lr(seed=s) for s in range(2)])
    opt = torch.optim.Adam(method.param_groups(model, 1e-3))
    before = copy.deepcopy(model.state_dict())
    for step in range(3):
        lr = _lr(seed=10 + step)
        out = method.training_losses(model, lr, F.interpolate(lr, scale_factor=4, mode="bicubic"), step)
        logs = method.backward(out, model, lambda loss: loss.backward())
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(out.loss) and logs["loss_mismatch"] > 0 and 0 <= logs["weight"] <= 1
    after = model.state_dict()
    for key in ("head.0.weight", "body.0.body.0.weight", "tail.1.weight", "global_skip_quant.act_quant.upper",
                "body.1.res_quant.act_quant.lower"):
        assert not torch.equal(before[key], after[key]), key


def test_skip_bounds_get_reconstruction_gradient_only():
    """φ.grad = g_R (mr.grad_to_qparams=false) also for skip quantizers, though L_M reaches them (§5.5)."""
    method, model = _fq_model(lambda_m=0.1)
    model = model.double()
    x = _lr(dtype=torch.float64)
    hr = F.interpolate(x, scale_factor=4, mode="bicubic")
    method.calibrate(model, [x])
    bounds = [p for s in skip_quantizers(model).values() for p in s.parameters()]
    g_rec = torch.autograd.grad(F.l1_loss(model(x), hr), bounds)
    out = method.training_losses(model, x, hr, 0)
    g_mis = torch.autograd.grad(out.terms["mismatch"], bounds, retain_graph=True, allow_unused=True)
    assert any(g is not None and g.abs() > 0 for g in g_mis)
    method.backward(out, model, lambda loss: loss.backward())
    for p, g in zip(bounds, g_rec, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-9, atol=1e-15)


# -- Hydra ---------------------------------------------------------------------------------------------------
def test_compose_odm_fq_w4a4(tmp_path):
    cfg = compose_config(["method=odm_fq", "bits=w4a4"], tmp_path)
    method = build_method(cfg.method, cfg.bits)
    assert isinstance(method, ODM) and cfg.method.name == "odm_fq"
    assert method.bits == Bits(w=4, a=4, sc=8) and cfg.bits.sc == 8
    assert method.cfg["fq"] == {"enabled": True, "quantize_image_input": False, "sc_operands": "both",
                                "sc_in_mismatch": True}
    assert method.cfg["lambda_m"] == 1e-5  # the rest is inherited from method=odm
    model = method.quantize(_tiny_edsr())
    assert list(skip_quantizers(model)) == SKIPS
    assert all(isinstance(s, SkipQuantizer) and s.act_quant.bits == 8
               for s in skip_quantizers(model).values())
