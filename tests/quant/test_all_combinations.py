"""Every backbone x method x {2, 4} bits composes from Hydra and runs a few training steps on CPU."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import compose_config

from odm_sr.builders import build_network

# Tiny versions of each backbone (same classes and module names, far fewer channels/blocks).
TINY_MODELS = {
    "edsr_baseline": ["+model.kwargs.n_resblocks=2", "+model.kwargs.n_feats=8"],
    "rdn": ["+model.kwargs.D=2", "+model.kwargs.C=2", "+model.kwargs.G=8", "+model.kwargs.G0=8"],
    "swinir_light": ["+model.kwargs.embed_dim=12", "+model.kwargs.depths=[2]", "+model.kwargs.num_heads=[2]",
                     "+model.kwargs.window_size=4", "+model.kwargs.img_size=16"],
    "hat_s": ["+model.kwargs.embed_dim=12", "+model.kwargs.depths=[1]", "+model.kwargs.num_heads=[2]",
              "+model.kwargs.window_size=4", "+model.kwargs.img_size=16", "+model.kwargs.compress_ratio=3",
              "+model.kwargs.squeeze_factor=3"],
}
METHODS = ["pams", "daq", "ddtb", "odm", "lsq"]




@pytest.mark.parametrize(("model", "method", "bits"), list(itertools.product(TINY_MODELS, METHODS, [2, 4])))
def test_backbone_method_bits_trains(model, method, bits, tmp_path):
    overrides = [f"model={model}", "model.scale=2", f"method={method}", f"bits=w{bits}a{bits}",
                 "data.iters_per_epoch=1", *TINY_MODELS[model]]
    if method in ("odm", "lsq"):
        overrides.append("method.init.num_batches=2")
    cfg = compose_config(overrides, tmp_path)
    torch.manual_seed(0)
    net, method_obj, teacher = build_network(cfg)
    assert any(m.__class__.__name__.startswith("Quant") for m in net.modules()), "nothing was quantized"
    rng = net.pixel_range
    lr = torch.rand(2, 3, 8, 8) * rng
    hr = torch.rand(2, 3, 16, 16) * rng
    method_obj.calibrate(net, [lr, lr], teacher=teacher)
    groups = method_obj.param_groups(net, 1e-3)
    opt = torch.optim.Adam(groups)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net.train()
    stepped = 0
    for step in range(3):  # DDTB's step 0 is its calibration epoch (no optimizer step)
        out = method_obj.training_losses(net, lr, hr, step, teacher=teacher)
        if out is None:
            continue
        assert out.sr.shape == hr.shape and torch.isfinite(out.loss), (model, method, bits, step)
        method_obj.backward(out, net, lambda loss: loss.backward())
        opt.step()
        opt.zero_grad(set_to_none=True)
        stepped += 1
    assert stepped >= 2
    changed = [n for n, p in net.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed, "no parameter moved"
