"""LSQ weight quantizer (METHODS.md §4.4): level sets, init and the step-size gradient by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import make_method

from odm_sr.models import build_model
from odm_sr.quant.base import Bits
from odm_sr.quant.lsq import LsqWeightQuantizer


def test_integer_grid_levels_and_init():
    w = torch.tensor([0.3, -0.2, 5.0, -5.0], dtype=torch.float64)
    q2 = LsqWeightQuantizer(2, w)
    assert q2.scale.item() == pytest.approx(2 * 2.625 / math.sqrt(1))  # 2·mean|W|/√Q_P, Q_P = 1
    q4 = LsqWeightQuantizer(4, w)
    assert q4.scale.item() == pytest.approx(2 * 2.625 / math.sqrt(7))  # Q_P = 7
    with torch.no_grad():
        q2.scale.fill_(0.5)
    dense = torch.linspace(-3, 3, 601, dtype=torch.float64)
    assert torch.unique(q2(dense)).tolist() == [-1.0, -0.5, 0.0, 0.5]  # {−2s, −s, 0, s}
    with torch.no_grad():
        q4.scale.fill_(0.5)
    assert torch.unique(q4(4 * dense)).tolist() == [0.5 * k for k in range(-8, 8)]  # {−8s … 7s}


def test_step_gradient_by_hand():
    # 2 bits, s = 0.5: W/s = 0.6, −0.4, 10, −10 → ∂W_q/∂s = R − W/s = 0.4, 0.4 inside;
    # Q_P = 1 above; −Q_N = −2 below
    w = torch.tensor([0.3, -0.2, 5.0, -5.0], dtype=torch.float64, requires_grad=True)
    raw = LsqWeightQuantizer(2, w, use_grad_scale=False)
    scaled = LsqWeightQuantizer(2, w)  # × 1/√(N_W·Q_P) = 1/√4
    expected = [0.4, 0.4, 1.0, -2.0]
    for quantizer, factor in ((raw, 1.0), (scaled, 0.5)):
        with torch.no_grad():
            quantizer.scale.fill_(0.5)
        out = quantizer(w)
        assert out.tolist() == [0.5, 0.0, 0.5, -1.0]
        for i in range(4):
            gw, gs = torch.autograd.grad(out[i], (w, quantizer.scale), retain_graph=True)
            assert gs.item() == pytest.approx(factor * expected[i])
            assert gw[i].item() == (1.0 if i < 2 else 0.0)  # STE inside, 0 where clipped


def test_odm_symmetric_grid():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    q = LsqWeightQuantizer(2, w, grid="odm_symmetric")
    u = np.percentile(np.abs(w.numpy()), 99)
    assert q.scale.item() == pytest.approx(u, rel=1e-12)
    assert torch.allclose(torch.unique(q(w)), torch.tensor([-u, -u / 3, u / 3, u], dtype=torch.float64))
    assert q.clip_bound().item() == pytest.approx(u)
    with pytest.raises(ValueError, match="lsq.grid"):
        LsqWeightQuantizer(2, w, grid="mystery")


def test_odm_with_lsq_weights_and_param_group():
    torch.manual_seed(0)
    model = build_model("edsr", 2, n_resblocks=1, n_feats=8, res_scale=1.0)
    method = make_method("odm", {"weight_quantizer": "lsq", "lsq": {"lr_mult": 3.0}}, Bits(w=2, a=2))
    model = method.quantize(model)
    conv = model.body[0].body[0]
    assert isinstance(conv.weight_quant, LsqWeightQuantizer)
    expected = 2 * conv.weight.detach().abs().mean() / 1.0
    assert conv.weight_quant.scale.item() == pytest.approx(expected.item())
    groups = {g["name"]: g for g in method.param_groups(model, 1e-4)}
    assert groups["lsq_scale"]["lr"] == pytest.approx(3e-4) and len(groups["lsq_scale"]["params"]) == 2
    assert "wcc_gamma" not in groups
    stats = method.log_stats(model)
    assert stats["body.0.body.0/u_w"] == pytest.approx(2 * conv.weight_quant.scale.item())  # Q_N·s
