"""The backbone table: everything odm-sr knows about a backbone family, in one row per family.

A row (``Backbone``) holds the family's placement rules (which conv/linear layers get W + A, METHODS.md §2.3),
the PAMS/DDTB block-wrapper surgery where the family has one, the SKT feature module (§4.1), the per-family
method settings (DAQ σ bits and the ``--finetune`` quirk, DDTB's 'auto' values and its RDN calibration quirk,
ODM-FQ support), the exact-FP convs of the integer export and the complexity hooks (attention MACs, Table S8's
per-layer scale). Adding a backbone = one ``register_backbone(Backbone(...))`` call (see README, "Adding a
backbone"); a model belongs to the row whose ``family`` prefixes its ``name``. Backbones themselves know
nothing about quantization.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from odm_sr.models.edsr import ResBlock
from odm_sr.models.hat import OCAB
from odm_sr.models.srresnet import ResBlock as SRResNetBlock
from odm_sr.models.windows import WindowAttention

from .blocks import ActFactory, ImageCount, WeightFactory, edsr_pams_style, rdn_pams_style, swap_with_sites

# -- placement regexes (body only, the default of METHODS.md §2.3) ------------------------------------------
_EDSR_BLOCK_CONVS = (r"body\.\d+\.body\.[02]",)
_RDN_CONV = (r"RDBs\.\d+\.convs\.\d+\.conv\.0",)
_SWIN_LINEARS = (r"layers\.\d+\.residual_group\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)",
                 r"layers\.\d+\.conv")
_HAT_LAYERS = (*_SWIN_LINEARS, r"layers\.\d+\.residual_group\.overlap_attn\.(qkv|proj|mlp\.fc1|mlp\.fc2)")
_HAT_CAB = (r"layers\.\d+\.residual_group\.blocks\.\d+\.conv_block\.cab\.[02]",)
# IMDN: c1..c4 and the 1x1 fusion c5 of every IMD block (30 layers); the CCA gate convs stay FP
_IMDN_BLOCK_CONVS = (r"IMDB\d+\.c[1-5]",)
# SRResNet (the DAQ release's): both convs of every ResBlock (32 layers), as EDSR; head, body-final conv and
# upsampler FP
_SRRESNET_BLOCK_CONVS = (r"body\.\d+\.conv[12]",)
# PAN: the six convs of every SCPA block (96 layers); the pixel-attention gate PAConv.k2 (+ sigmoid) stays FP
_PAN_BLOCK_CONVS = (r"SCPA_trunk\.\d+\.(conv1_a|conv1_b|k1\.0|PAConv\.k3|PAConv\.k4|conv3)",)

# DDTB's 'auto' settings (§4.3): EDSR and transformers 0.3 / p99 / percentile weights; RDN 0.5 / p95 / min-max
DDTB_AUTO_EDSR = {"dynamic_ratio": 0.3, "init_percentile": 99.0, "weight_clip": "percentile"}
DDTB_AUTO_RDN = {"dynamic_ratio": 0.5, "init_percentile": 95.0, "weight_clip": "minmax"}

PamsStyle = Callable[[nn.Module, "ActFactory | None", "WeightFactory | None", ImageCount, dict], None]


def window_attention_macs(module: nn.Module, x: Tensor) -> int:
    """Q·Kᵀ and A·V of a window attention: 2·N·N·C per window (x: (B·nW, N, C))."""
    return 2 * x.shape[0] * x.shape[1] * x.shape[1] * x.shape[2]


def ocab_macs(module: nn.Module, x: Tensor) -> int:
    """HAT's overlapping cross-attention: 2·N_q·N_k·C per window, N_k = overlap_win_size²."""
    return 2 * x.shape[0] * x.shape[1] * module.overlap_win_size ** 2 * x.shape[2]


def edsr_sigma_bits(model: nn.Module) -> int:
    """DAQ's 'auto' σ bits: 4 for EDSR-baseline (64 features, 16 blocks), 8 otherwise (the released test
    scripts' ``qq``)."""
    if model.name == "edsr_baseline":
        return 4
    blocks = [m for m in model.body if isinstance(m, ResBlock)]
    return 4 if len(blocks) == 16 and model.head[0].out_channels == 64 else 8


def srresnet_sigma_bits(model: nn.Module) -> int:
    """DAQ's σ bits on SRResNet: the EDSR rule by size (4 at 16 blocks of 64 features, as EDSR-baseline; 8
    otherwise); the release ships no SRResNet script to read ``qq`` from."""
    blocks = residual_blocks_of(model, SRResNetBlock)
    return 4 if len(blocks) == 16 and model.head[0].out_channels == 64 else 8


def residual_blocks_of(model: nn.Module, block_type: type) -> list[str]:
    """Names of ``model.body``'s children of ``block_type`` (blocks computing x + f(x))."""
    return [f"body.{name}" for name, m in model.body.named_children() if isinstance(m, block_type)]


def swin_feature(model: nn.Module) -> nn.Module:
    """SwinIR/HAT: the input of ``conv_before_upsample`` (pixelshuffle) or of ``upsample`` (pixelshuffledirect)."""
    return model.upsample if model.upsampler == "pixelshuffledirect" else model.conv_before_upsample


@dataclass(frozen=True)
class Backbone:
    """One backbone family. ``rules``: placement rule → regexes of the layers that get W + A (the first rule
    is the default); ``rule_key``: the ``method.placement.<key>`` that picks the rule (None: the family has
    one rule); ``options``: ``placement.<option>=true`` adds these regexes; ``pams_style``: the PAMS/DDTB
    block wrappers (``placement.<rule_key>=pams_style``), None where PAMS/DDTB use the rule's layers."""

    family: str
    rules: dict[str, tuple[str, ...]]
    skt_feature: Callable[[nn.Module], nn.Module]
    rule_key: str | None = None
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    pams_style: PamsStyle | None = None
    daq_sigma_bits: Callable[[nn.Module], int] = lambda model: 8
    daq_finetune_steps: bool = False  # DAQ quirk finetune_fixed_steps applies (the release: EDSR only)
    ddtb_auto: dict[str, Any] = field(default_factory=lambda: dict(DDTB_AUTO_EDSR))
    ddtb_calib_quantized_weights: bool = False  # DDTB quirk rdn_calib_quantized_weights applies (RDN only)
    fully_quantized: bool = False  # ODM-FQ (§4.5) implemented
    exact_fp_convs: tuple[str, ...] = ()  # FP convs whose outputs reach an activation quantizer (integer export)
    dynamic_size: bool = True  # the exported graph runs at any input size (False: transformers, traced size)
    attention_macs: dict[type, Callable[[nn.Module, Tensor], int]] = field(default_factory=dict)
    per_layer_scale_storage: bool = False  # Table S8 (paper_like rule): one scale per layer, bounds only
    # names of the blocks that compute x + f(x) (QuantSR's learnable shortcut scales their x); None: not declared
    residual_blocks: Callable[[nn.Module], list[str]] | None = None
    # the modules that end the forward with only float convs and pixel shuffles in them, in order (the exported
    # graph runs them as one conv: export/tail.py)
    affine_tail: tuple[str, ...] = ()

    def rule(self, placement: dict, wrappers: bool = True) -> str:
        """The placement rule for this family; ValueError for one it does not have (``pams_style`` counts
        only with ``wrappers``, for PAMS/DAQ/DDTB's surgery)."""
        if self.rule_key is None:
            return next(iter(self.rules))
        rule = placement.get(self.rule_key, next(iter(self.rules)))
        wrapped = ("pams_style",) if wrappers and self.pams_style is not None else ()
        allowed = tuple(dict.fromkeys((*wrapped, *self.rules)))
        if rule not in allowed:
            raise ValueError(f"placement.{self.rule_key}={rule!r}: expected one of {allowed}")
        return rule

    def patterns(self, placement: dict | None = None) -> list[str]:
        """Regexes of the layers to quantize under ``placement`` options (body only)."""
        placement = dict(placement or {})
        patterns = list(self.rules[self.rule(placement, wrappers=False)])
        for option, extra in self.options.items():
            if placement.get(option, False):
                patterns += extra
        return patterns


BACKBONES: dict[str, Backbone] = {}


def register_backbone(spec: Backbone) -> Backbone:
    """Add (or replace) a family's row; returns it."""
    BACKBONES[spec.family] = spec
    return spec


def backbone_of(model: Any) -> Backbone:
    """The row of ``model`` (anything with a ``name``): the family that prefixes the name."""
    name = str(model.name).lower()
    for family, spec in BACKBONES.items():
        if name.startswith(family):
            return spec
    raise ValueError(f"no placement rule for backbone {name!r}: expected one of "
                     f"{', '.join(f + '*' for f in BACKBONES)}")


def select_layers(model: nn.Module, placement: dict | None = None) -> list[str]:
    """Names of the conv/linear layers to quantize, in module order."""
    patterns = [re.compile(p + r"$") for p in backbone_of(model).patterns(placement)]
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and any(p.match(n) for p in patterns)]


def apply_placement(model: nn.Module, placement: dict, make_act: ActFactory | None,
                    make_weight: WeightFactory | None, quirks: dict | None = None) -> nn.Module:
    """PAMS/DAQ/DDTB surgery: ``placement.<rule_key>=pams_style`` runs the family's block wrappers (``quirks``:
    ``conv1_raw_input``, ``rdn_gff3_fp_input``); any other rule puts W + A on the layers ``select_layers``
    names. ``make_act`` / ``make_weight`` = None leave that side in FP."""
    spec = backbone_of(model)
    rule = spec.rule(placement)
    images = ImageCount()
    if rule == "pams_style" and spec.pams_style is not None:
        spec.pams_style(model, make_act, make_weight, images, dict(quirks or {}))
    else:
        swap_with_sites(model, select_layers(model, placement), make_act, make_weight, images)
    model.register_forward_pre_hook(images)
    return model


def _edsr_feature(model: nn.Module) -> nn.Module:
    return model.tail


def _rdn_feature(model: nn.Module) -> nn.Module:
    return model.UPNet


def _hat_feature(model: nn.Module) -> nn.Module:
    return model.conv_before_upsample


def _imdn_feature(model: nn.Module) -> nn.Module:
    return model.upsampler  # its input: LR_conv(c(...)) + fea_conv(x), the trunk output as EDSR's tail input


def _pan_feature(model: nn.Module) -> nn.Module:
    # the trunk output (conv_first + trunk_conv(SCPA_trunk)) reaches no module before the functional nearest
    # upsampling: upconv1's input is it, nearest-upsampled (same attention map, up to the upsampling)
    return model.upconv1


register_backbone(Backbone(
    family="edsr", rules={"block_convs": _EDSR_BLOCK_CONVS, "pams_style": _EDSR_BLOCK_CONVS}, rule_key="edsr",
    pams_style=edsr_pams_style, skt_feature=_edsr_feature, daq_sigma_bits=edsr_sigma_bits, daq_finetune_steps=True,
    fully_quantized=True, exact_fp_convs=("head.0",), residual_blocks=lambda m: residual_blocks_of(m, ResBlock),
    affine_tail=("tail", "add_mean")))
register_backbone(Backbone(
    family="rdn", rules={"rdb_lff_gff": (*_RDN_CONV, r"RDBs\.\d+\.LFF", r"GFF\.[01]"),
                         "rdb_lff": (*_RDN_CONV, r"RDBs\.\d+\.LFF"), "rdb_conv": _RDN_CONV},
    rule_key="rdn", pams_style=rdn_pams_style, skt_feature=_rdn_feature, ddtb_auto=dict(DDTB_AUTO_RDN),
    ddtb_calib_quantized_weights=True, exact_fp_convs=("SFENet1", "SFENet2"), affine_tail=("UPNet",)))
register_backbone(Backbone(
    family="swinir", rules={"same_layers": _SWIN_LINEARS}, skt_feature=swin_feature,
    attention_macs={WindowAttention: window_attention_macs}, per_layer_scale_storage=True, dynamic_size=False,
    exact_fp_convs=("conv_first",)))
register_backbone(Backbone(
    family="hat", rules={"same_layers": _HAT_LAYERS}, options={"hat_quantize_cab": _HAT_CAB},
    skt_feature=_hat_feature, attention_macs={WindowAttention: window_attention_macs, OCAB: ocab_macs},
    per_layer_scale_storage=True, dynamic_size=False))
# IMDN and PAN (real trained networks, ../shared/models): block convs as EDSR's; DDTB and DAQ take the EDSR
# settings of their releases (no release quantizes these networks)
register_backbone(Backbone(family="imdn", rules={"block_convs": _IMDN_BLOCK_CONVS}, skt_feature=_imdn_feature,
                           exact_fp_convs=("fea_conv",)))
# SRResNet: placement and DAQ/DDTB settings as EDSR-baseline (DAQ's release quantizes the same convs, and its
# --finetune quirk reaches SRResNet's blocks too); no ODM-FQ (skip/BN quantization is defined for EDSR only)
register_backbone(Backbone(family="srresnet", rules={"block_convs": _SRRESNET_BLOCK_CONVS}, skt_feature=_edsr_feature,
                           daq_sigma_bits=srresnet_sigma_bits, daq_finetune_steps=True,
                           residual_blocks=lambda m: residual_blocks_of(m, SRResNetBlock)))
register_backbone(Backbone(family="pan", rules={"block_convs": _PAN_BLOCK_CONVS}, skt_feature=_pan_feature,
                           exact_fp_convs=("conv_first",)))
