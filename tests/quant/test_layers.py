"""Quantized layers and model surgery (METHODS.md §2.2, §2.3): shared parameters, names, placement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from odm_sr.models import build_model
from odm_sr.quant.backbones import select_layers
from odm_sr.quant.layers import QuantConv2d, QuantLinear, quantized_layers, to_quantized
from odm_sr.quant.placement import swap_layers


class _AddOne(nn.Module):
    def forward(self, x):
        return x + 1


class _Halve(nn.Module):
    def forward(self, w):
        return w * 0.5


def _tiny_edsr():
    torch.manual_seed(0)
    return build_model("edsr", 2, n_resblocks=2, n_feats=8, res_scale=1.0)


def test_quant_conv_shares_parameters_and_applies_quantizers():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    plain = QuantConv2d.from_float(conv, None, None)
    assert plain.weight is conv.weight and plain.bias is conv.bias
    assert torch.equal(plain(x), conv(x))
    quant = QuantConv2d.from_float(conv, _AddOne(), _Halve())
    expected = F.conv2d(x + 1, conv.weight * 0.5, conv.bias, padding=1)
    assert torch.allclose(quant(x), expected)


def test_quant_linear_and_to_quantized():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    x = torch.randn(4, 6)
    q = to_quantized(linear, _AddOne(), _Halve())
    assert isinstance(q, QuantLinear) and q.weight is linear.weight
    assert torch.allclose(q(x), F.linear(x + 1, linear.weight * 0.5, linear.bias))
    with pytest.raises(TypeError):
        to_quantized(nn.ReLU(), None, None)


def test_edsr_placement_and_swap_keep_official_names():
    model = _tiny_edsr()
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    names = select_layers(model)
    assert names == ["body.0.body.0", "body.0.body.2", "body.1.body.0", "body.1.body.2"]
    swap_layers(model, names, lambda name, layer: (_AddOne(), None))
    assert list(quantized_layers(model)) == names
    assert isinstance(model.body[0].body[0], QuantConv2d)
    assert not isinstance(model.body[2], QuantConv2d)  # the body-final conv stays FP
    assert set(fp_state) <= set(model.state_dict())
    missing, unexpected = model.load_state_dict(fp_state, strict=False)
    assert not missing and not unexpected  # the stand-in quantizers hold no state


def test_rdn_placements_count_layers():
    torch.manual_seed(0)
    model = build_model("rdn", 2, G0=8, G=4, D=3, C=2)
    rules = ("rdb_conv", "rdb_lff", "rdb_lff_gff")
    counts = {rule: len(select_layers(model, {"rdn": rule})) for rule in rules}
    d, c = 3, 2
    assert counts == {"rdb_conv": d * c, "rdb_lff": d * c + d, "rdb_lff_gff": d * c + d + 2}
    with pytest.raises(ValueError):
        select_layers(model, {"rdn": "everything"})
