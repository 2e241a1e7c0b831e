"""PAMS/DDTB constants set by their releases for 0–255 features (the clip lr ``qparam_lr`` and the SKT weight)
are carried to a network in [0, 1] by pixel_range/255 (``scale_release_constants``, METHODS.md §1.1); EDSR keeps
them as written, and the switch turns the scaling off."""

from __future__ import annotations

import pytest
import torch
from helpers import compose_config

from odm_sr.models import build_model
from odm_sr.quant import build_method
from odm_sr.quant.base import frozen_copy


def _method(name, tmp_path, *extra):
    cfg = compose_config([f"method={name}", "bits=w4a4", "data.iters_per_epoch=1", *extra], tmp_path)
    return build_method(cfg.method, cfg.bits)


def _tiny(name):
    if name == "imdn":
        return build_model("imdn", 2, nf=16, num_modules=1)
    return build_model("edsr", 2, n_resblocks=1, n_feats=8, res_scale=1.0)


@pytest.mark.parametrize("method_name", ["pams", "ddtb"])
@pytest.mark.parametrize("net_name,scaled", [("imdn", True), ("edsr", False)])
def test_clip_lr_and_skt_weight_in_the_network_scale(tmp_path, method_name, net_name, scaled):
    factor = 1 / 255 if scaled else 1.0
    torch.manual_seed(0)
    net = _tiny(net_name)
    teacher = frozen_copy(net)
    lr_img = torch.rand(2, 3, 8, 8) * net.pixel_range
    hr = torch.rand(2, 3, 16, 16) * net.pixel_range
    skt = {}
    for on in (True, False):
        method = _method(method_name, tmp_path, f"method.scale_release_constants={str(on).lower()}")
        student = method.quantize(frozen_copy(net).train().requires_grad_(True))
        method.calibrate(student, [lr_img, lr_img], teacher=teacher)
        groups = {g["name"]: g["lr"] for g in method.param_groups(student, 1e-4)}
        assert groups["net"] == 1e-4
        assert groups["alpha"] == pytest.approx(0.01 * (factor if on else 1.0), rel=1e-12)
        torch.manual_seed(1)
        out = None
        for step in range(3):  # DDTB's first epoch (1 step here) calibrates without a loss
            out = method.training_losses(student, lr_img, hr, step, teacher=teacher)
            if out is not None:
                break
        skt[on] = float(out.terms["skt"].detach())
    assert skt[False] > 0
    assert skt[True] == pytest.approx(skt[False] * factor, rel=1e-5)
