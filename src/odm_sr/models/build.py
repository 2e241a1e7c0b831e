"""`build_model`: backbone name + scale (+ constructor overrides) -> an `SRModel`; `backbone`: the same with its
FP weights, the `_target_` of `conf/model/*.yaml`.

Configurations are METHODS.md section 2.1 (IMDN and PAN: the released ones, `../shared/models/README.md`;
SRResNet: the DAQ release's defaults, 16 blocks of 64 features);
the SwinIR/HAT ones are the official test options
(`img_size` 64 for SwinIR-light and HAT-S, 48 for SwinIR-classical, which sizes the stored `attn_mask`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from torch import nn

from odm_sr.models.base import SRModel
from odm_sr.models.edsr import EDSR
from odm_sr.models.hat import HAT
from odm_sr.models.imdn import IMDN
from odm_sr.models.pan import PAN
from odm_sr.models.rdn import RDN
from odm_sr.models.srresnet import SRResNet
from odm_sr.models.swinir import SwinIR
from odm_sr.models.weights import load_pretrained

SUPPORTED_SCALES = (2, 3, 4)

MODEL_CONFIGS: dict[str, tuple[type[SRModel], dict[str, Any]]] = {
    "edsr_baseline": (EDSR, dict(n_resblocks=16, n_feats=64, res_scale=1.0)),
    "edsr": (EDSR, dict(n_resblocks=32, n_feats=256, res_scale=0.1)),
    "rdn": (RDN, dict(config="B", G0=64)),
    "swinir_light": (SwinIR, dict(img_size=64, embed_dim=60, depths=(6,) * 4, num_heads=(6,) * 4,
                                  window_size=8, mlp_ratio=2.0, upsampler="pixelshuffledirect")),
    "swinir_classical": (SwinIR, dict(img_size=48, embed_dim=180, depths=(6,) * 6, num_heads=(6,) * 6,
                                      window_size=8, mlp_ratio=2.0, upsampler="pixelshuffle")),
    "hat_s": (HAT, dict(img_size=64, embed_dim=144, depths=(6,) * 6, num_heads=(6,) * 6, window_size=16,
                        compress_ratio=24, squeeze_factor=24, conv_scale=0.01, overlap_ratio=0.5,
                        mlp_ratio=2.0)),
    "imdn": (IMDN, dict(nf=64, num_modules=6)),
    "pan": (PAN, dict(nf=40, unf=24, nb=16)),
    "srresnet": (SRResNet, dict(n_resblocks=16, n_feats=64)),
}
MODEL_NAMES = tuple(MODEL_CONFIGS)
ALIASES = {"edsr_full": "edsr"}  # conf/model/edsr.yaml spells the full EDSR this way


def build_model(name: str, scale: int, **overrides: Any) -> SRModel:
    """Build backbone `name` for `scale`, with constructor keyword `overrides`.

    Examples: `build_model("edsr_baseline", 4)`; a small EDSR for tests/configs:
    `build_model("edsr", 2, n_resblocks=4, n_feats=32, res_scale=1.0)`;
    `build_model("swinir_light", 2, pad_mode="mirror", drop_path_rate=0.0)`.
    The model has `name` (the canonical one: `edsr_full` builds `edsr`), `scale` and `pixel_range`
    (255.0 for EDSR/RDN/SRResNet, 1.0 for SwinIR/HAT/IMDN/PAN).
    """
    name = ALIASES.get(name, name)
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model name {name!r}; allowed: {', '.join(MODEL_NAMES + tuple(ALIASES))}")
    if scale not in SUPPORTED_SCALES:
        raise ValueError(f"unsupported scale {scale!r} for {name}; allowed: {SUPPORTED_SCALES}")
    model_class, defaults = MODEL_CONFIGS[name]
    allowed = [p for p in inspect.signature(model_class).parameters if p not in ("scale", "name")]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name}; allowed: {allowed}")
    return model_class(scale=scale, name=name, **{**defaults, **overrides})


def backbone(name: str, scale: int, kwargs: dict | None = None, pretrained: str | None = None,
             drop_path_rate: float | None = None) -> nn.Module:
    """The ``_target_`` of ``conf/model/*.yaml``: backbone ``name`` at ``scale`` with constructor ``kwargs`` and
    SwinIR/HAT stochastic depth ``drop_path_rate``, with the weights of ``pretrained`` when set (clear error if
    the file is missing), else randomly initialised."""
    extra = dict(kwargs or {})
    if drop_path_rate is not None:  # SwinIR/HAT stochastic depth during (QA) training
        extra["drop_path_rate"] = float(drop_path_rate)
    net = build_model(str(name), int(scale), **extra)
    if pretrained is None:
        return net
    path = Path(str(pretrained))
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained={path}: no such checkpoint file (train the FP model first, "
                                f"or point model.pretrained at an official .pt/.pth)")
    return load_pretrained(net, path)
