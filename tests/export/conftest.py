"""Tiny quantized networks for the export tests (built from the real configs, ranges set without training)."""

from __future__ import annotations

import torch
from helpers import compose_config

BACKBONES = {
    "edsr": ["model=edsr_small", "model.kwargs.n_resblocks=2", "model.kwargs.n_feats=8"],
    "rdn": ["model=rdn", "+model.kwargs={D: 2, C: 2, G: 8, G0: 8}"],
    "swinir": ["model=swinir_light",
               "+model.kwargs={embed_dim: 12, depths: [2], num_heads: [2], window_size: 4, img_size: 16}"],
    "imdn": ["model=imdn", "+model.kwargs={nf: 16, num_modules: 2}"],
    "pan": ["model=pan", "+model.kwargs={nf: 8, unf: 8, nb: 2}"],
    "hat": ["model=hat_s", "+model.kwargs={embed_dim: 12, depths: [1], num_heads: [2], window_size: 4, img_size: 16, "
            "compress_ratio: 3, squeeze_factor: 4}"],
}


def tiny_config(backbone: str, method: str, bits: int, tmp_path, scale: int = 2):
    return compose_config(BACKBONES[backbone] + [f"method={method}", f"bits=w{bits}a{bits}",
                                                 f"model.scale={scale}"], tmp_path)


def tiny_network(backbone: str, method: str, bits: int, tmp_path, seed: int = 0, scale: int = 2):
    """(eval-mode quantized network, config): ODM ranges calibrated on random images, PAMS α drawn at random
    between 2 % and 50 % of the pixel range (both away from their init, so a wrong grid shows)."""
    from odm_sr.builders import build_network
    from odm_sr.quant.pams import PamsActQuantizer

    torch.manual_seed(seed)
    cfg = tiny_config(backbone, method, bits, tmp_path, scale)
    net, quant_method, _ = build_network(cfg)
    net.eval()
    rng = float(net.pixel_range)
    with torch.no_grad():
        for p in net.parameters():  # random init gives near-zero biases: make the offsets matter
            if p.dim() == 1 and p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05 * (rng / 255 if rng > 1 else 1))
        quant_method.calibrate(net, [torch.rand(2, 3, 12, 12) * rng for _ in range(2)])
        for q in net.modules():
            if isinstance(q, PamsActQuantizer):
                q.alpha.fill_(float(torch.empty(()).uniform_(0.02, 0.5)) * rng)
    return net, cfg
