"""Which layers get quantized, per backbone (METHODS.md §2.3), and the one function that swaps them.

Backbones know nothing about quantization: the rules here match official module names.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from .layers import to_quantized

# Body-only placements (the default, METHODS.md §2.3). Each rule is a list of regexes over module names.
_EDSR_BLOCK_CONVS = [r"body\.\d+\.body\.[02]"]
_RDN_RULES = {
    "rdb_conv": [r"RDBs\.\d+\.convs\.\d+\.conv\.0"],
    "rdb_lff": [r"RDBs\.\d+\.convs\.\d+\.conv\.0", r"RDBs\.\d+\.LFF"],
    "rdb_lff_gff": [r"RDBs\.\d+\.convs\.\d+\.conv\.0", r"RDBs\.\d+\.LFF", r"GFF\.[01]"],
}
_SWIN_LINEARS = [r"layers\.\d+\.residual_group\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)",
                 r"layers\.\d+\.conv"]
_HAT_LAYERS = _SWIN_LINEARS + [r"layers\.\d+\.residual_group\.overlap_attn\.(qkv|proj|mlp\.fc1|mlp\.fc2)"]
_HAT_CAB = [r"layers\.\d+\.residual_group\.blocks\.\d+\.conv_block\.cab\.[02]"]


def backbone_family(model: nn.Module) -> str:
    """'edsr', 'rdn', 'swinir' or 'hat', from the model's ``name`` attribute."""
    name = getattr(model, "name", type(model).__name__).lower()
    for family in ("edsr", "rdn", "swinir", "hat"):
        if name.startswith(family):
            return family
    raise ValueError(f"no placement rule for backbone {name!r}: expected one of edsr*, rdn, swinir*, hat*")


def placement_patterns(family: str, placement: dict | None = None) -> list[str]:
    """Regexes of the layers to quantize for ``family`` under ``placement`` options (body only)."""
    placement = dict(placement or {})
    if family == "edsr":
        rule = placement.get("edsr", "block_convs")
        if rule not in ("block_convs", "pams_style"):
            raise ValueError(f"placement.edsr={rule!r}: expected 'block_convs' or 'pams_style'")
        return list(_EDSR_BLOCK_CONVS)
    if family == "rdn":
        rule = placement.get("rdn", "rdb_lff_gff")
        if rule not in _RDN_RULES:
            raise ValueError(f"placement.rdn={rule!r}: expected one of {sorted(_RDN_RULES)}")
        return list(_RDN_RULES[rule])
    if family == "swinir":
        return list(_SWIN_LINEARS)
    if family == "hat":
        return _HAT_LAYERS + (_HAT_CAB if placement.get("hat_quantize_cab", False) else [])
    raise ValueError(f"unknown backbone family {family!r}")


def all_conv_linear(model: nn.Module) -> list[str]:
    """Every conv/linear except MeanShift (full quantization, METHODS.md §4.5)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not n.endswith(("sub_mean", "add_mean"))]


def select_layers(model: nn.Module, placement: dict | None = None, full: bool = False) -> list[str]:
    """Names of the conv/linear layers to quantize, in module order."""
    if full:
        return all_conv_linear(model)
    patterns = [re.compile(p + r"$") for p in placement_patterns(backbone_family(model), placement)]
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and any(p.match(n) for p in patterns)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace ``model.<name>`` in place (also inside a Sequential, keeping its index)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = new


QuantizerFactory = Callable[[str, nn.Module], tuple[nn.Module | None, nn.Module | None]]


def swap_layers(model: nn.Module, names: list[str], make_quantizers: QuantizerFactory) -> nn.Module:
    """Swap each named conv/linear for its quantized twin; ``make_quantizers(name, layer)`` returns
    ``(act_quant, weight_quant)``. Returns the model (modified in place)."""
    for name in names:
        layer = model.get_submodule(name)
        act_q, w_q = make_quantizers(name, layer)
        replace_module(model, name, to_quantized(layer, act_q, w_q))
    return model
