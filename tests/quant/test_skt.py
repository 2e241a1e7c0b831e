"""SKT attention transfer (METHODS.md §4.1): attention map, loss, teacher isolation, captured feature."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_method

from odm_sr.models import build_model
from odm_sr.quant.base import Bits, frozen_copy
from odm_sr.quant.skt import (
    attention_map,
    capture_reconstruction_input,
    check_skt_config,
    distillation_losses,
    reconstruction_input_module,
    skt_loss,
)


def small_edsr():
    torch.manual_seed(0)
    return build_model("edsr", 2, n_resblocks=1, n_feats=8)


def test_attention_map_by_hand():
    # channel 0 = [1, 2], channel 1 = [3, 0]: mean_c F² = [(1 + 9)/2, (4 + 0)/2] = [5, 2]; norm √29
    feature = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    expected = torch.tensor([[5.0, 2.0]]) / math.sqrt(29.0)
    assert torch.allclose(attention_map(feature), expected)


def test_skt_loss_by_hand():
    student = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    teacher = torch.tensor([[[[1.0, 1.0]]]])  # AT = [1, 1]/√2
    a, b, c = 5 / math.sqrt(29), 2 / math.sqrt(29), 1 / math.sqrt(2)
    expected = ((a - c) ** 2 + (b - c) ** 2) / 2
    assert skt_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert skt_loss(teacher, teacher).item() == 0.0


def test_teacher_feature_gets_no_gradient():
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, requires_grad=True)
    skt_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_captured_edsr_feature_is_tail_input():
    model = small_edsr().eval()
    x = torch.rand(1, 3, 6, 6) * 255
    with torch.no_grad(), capture_reconstruction_input(model) as feat:
        model(x)
        head = model.head(model.sub_mean(x))
        expected = model.body(head) + head
    assert torch.allclose(feat.value, expected)
    assert not model.tail._forward_pre_hooks  # the hook is removed again


TINY_SWIN = dict(img_size=8, embed_dim=12, depths=(1,), num_heads=(2,), window_size=4)


@pytest.mark.parametrize("name, kwargs, attr", [
    ("swinir_light", TINY_SWIN, "upsample"),
    ("swinir_classical", TINY_SWIN, "conv_before_upsample"),
    ("hat_s", dict(TINY_SWIN, compress_ratio=3, squeeze_factor=3), "conv_before_upsample"),
    ("rdn", dict(config="tiny", G0=8), "UPNet"),
])
def test_reconstruction_input_module_per_family(monkeypatch, name, kwargs, attr):
    from odm_sr.models import rdn

    monkeypatch.setitem(rdn.RDN_CONFIGS, "tiny", (1, 2, 4))
    model = build_model(name, 2, **kwargs)
    assert reconstruction_input_module(model) is getattr(model, attr)
    x = torch.rand(1, 3, 8, 8) * model.pixel_range
    with torch.no_grad(), capture_reconstruction_input(model) as feat:
        model(x)
    assert feat.value.shape[0] == 1 and feat.value.shape[-2:] == (8, 8)


def test_distillation_losses_leave_teacher_untouched():
    student = small_edsr()
    teacher = frozen_copy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    lr, hr = torch.rand(2, 3, 6, 6) * 255, torch.rand(2, 3, 12, 12) * 255
    sr, terms = distillation_losses(student, teacher, lr, hr, weight=1000.0)
    assert set(terms) == {"rec", "skt"} and sr.shape == hr.shape
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.head[0].weight.grad is not None
    with pytest.raises(ValueError, match="teacher"):
        distillation_losses(student, None, lr, hr, 1.0)


def test_check_skt_config():
    assert check_skt_config({"weight": 1000}) == 1000.0
    with pytest.raises(ValueError, match="skt.weight"):
        check_skt_config({"weight": -1})
    # F is always the reconstruction input (one legal value), so skt.feature is not a key: PAMS and DDTB reject it
    for value in ("pre_reconstruction", "tail_output"):
        with pytest.raises(ValueError, match="unknown method config key 'skt.feature'; known: weight"):
            make_method("pams", {"skt": {"feature": value}}, Bits(2, 2))
