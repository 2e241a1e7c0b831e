"""Pieces shared by PAMS, DAQ and DDTB: block wrappers and placement for the PAMS/DDTB quantizer pattern
(METHODS.md §2.3), per-image grouping of quantizer inputs, and config helpers.

The wrappers replace a block in place (same index in its container) and keep the block's children, so every
official key (`body.{i}.body.{0,2}`, `RDBs.{i}.convs.{c}.conv.0`, `RDBs.{i}.LFF`) is unchanged; the added
quantizers are named `quant_act*` / `act_quant`, which the checkpoint loader skips.

- EDSR ResBlock (`colorjam/PAMS@737cc09` `model/edsr.py` `PAMS_ResBlock`): out = q3(res_scale·conv2(q2(relu(
  conv1(q1(x)))))) + q1(x). q1 quantizes the skip copy, q2 is conv2's input quantizer, q3 the scaled residual.
  Quirk `conv1_raw_input`: conv1 sees x instead of q1(x), as released.
- RDN (`zysxmu/DDTB@e21403d` `model/rdn.py`, same as PAMS's): the RDB input is quantized and that
  quantized tensor feeds both the dense layers and the local residual; dense layer c ≥ 1 quantizes its
  concatenated input and concatenates the quantized tensor; the LFF input, GFF input (GFF.0) and GFF.1
  input are quantized (quirk `rdn_gff3_fp_input`: GFF.1 keeps an FP input, as released).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from odm_sr.models.base import pixel_range
from odm_sr.models.edsr import ResBlock

from .placement import swap_layers


class ImageCount:
    """Number of images in the current forward, recorded by a forward pre-hook on the model root.

    Quantizers of Swin attention layers see windows folded into the batch, (B·nW, N, C); per-image statistics
    regroup their input with this count (image-major order, as `window_partition` produces).
    """

    def __init__(self) -> None:
        self.value: int | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.value = int(args[0].shape[0])


@dataclass
class ActSite:
    """Where an activation quantizer sits: its module name, input channels, layout and the image counter."""

    name: str
    channels: int
    channel_last: bool  # True for nn.Linear inputs (..., C); False for conv inputs (B, C, H, W)
    images: ImageCount | None = None


def group_by_image(x: Tensor, site: ActSite) -> Tensor:
    """View ``x`` as (images, channels, elements) so that per-image, per-channel statistics reduce dim 2."""
    if not site.channel_last:
        return x.reshape(x.shape[0], x.shape[1], -1)
    count = site.images.value if site.images is not None else None
    if count is None or x.dim() < 3 or x.shape[0] % count:
        count = x.shape[0]
    return x.reshape(count, -1, x.shape[-1]).transpose(1, 2)


def ungroup(grouped: Tensor, like: Tensor, site: ActSite) -> Tensor:
    """Inverse of :func:`group_by_image`."""
    if site.channel_last:
        grouped = grouped.transpose(1, 2)
    return grouped.reshape(like.shape)


ActFactory = Callable[[ActSite], nn.Module | None]
WeightFactory = Callable[[str, nn.Module], nn.Module | None]


class QuantResBlock(nn.Module):
    """EDSR ResBlock with the PAMS pattern; ``body`` and ``res_scale`` are the wrapped block's own."""

    def __init__(self, block: nn.Module, quant_act1: nn.Module | None, quant_act3: nn.Module | None,
                 conv1_raw_input: bool = False) -> None:
        super().__init__()
        self.body = block.body
        self.res_scale = block.res_scale
        self.quant_act1 = quant_act1
        self.quant_act3 = quant_act3
        self.conv1_raw_input = conv1_raw_input

    def forward(self, x: Tensor) -> Tensor:
        skip = self.quant_act1(x) if self.quant_act1 is not None else x
        res = self.body(x if self.conv1_raw_input else skip).mul(self.res_scale)
        if self.quant_act3 is not None:
            res = self.quant_act3(res)
        return res + skip


class QuantDenseLayer(nn.Module):
    """RDB dense layer c ≥ 1: x_q = act_quant(x); cat(x_q, relu(conv(x_q)))."""

    def __init__(self, layer: nn.Module, act_quant: nn.Module | None) -> None:
        super().__init__()
        self.conv = layer.conv
        self.act_quant = act_quant

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        return torch.cat((x, self.conv(x)), 1)


class QuantRDB(nn.Module):
    """RDB: x_q = act_quant(x); LFF(dense layers(x_q)) + x_q (LFF quantizes its own input)."""

    def __init__(self, block: nn.Module, act_quant: nn.Module | None) -> None:
        super().__init__()
        self.convs = block.convs
        self.LFF = block.LFF
        self.act_quant = act_quant

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        return self.LFF(self.convs(x)) + x


def _make(make_act: ActFactory | None, site: ActSite) -> nn.Module | None:
    return make_act(site) if make_act is not None else None


def swap_with_sites(model: nn.Module, names: list[str], make_act: ActFactory | None, make_weight: WeightFactory | None,
          images: ImageCount, act_on: Callable[[str], bool] = lambda name: True) -> None:
    """Swap the named convs/linears; those with ``act_on(name)`` also get an input quantizer."""

    def factory(name: str, layer: nn.Module):
        linear = isinstance(layer, nn.Linear)
        channels = layer.in_features if linear else layer.in_channels
        site = ActSite(f"{name}.act_quant", channels, linear, images)
        act = _make(make_act, site) if act_on(name) else None
        return act, (make_weight(f"{name}.weight_quant", layer) if make_weight is not None else None)

    swap_layers(model, names, factory)


def edsr_pams_style(model: nn.Module, make_act, make_weight, images, quirks: dict) -> None:
    """EDSR ResBlocks as PAMS_ResBlock (quirk ``conv1_raw_input``)."""
    blocks = [(name, m) for name, m in model.body.named_children() if isinstance(m, ResBlock)]
    convs = [f"body.{name}.body.{i}" for name, _ in blocks for i in (0, 2)]
    swap_with_sites(model, convs, make_act, make_weight, images, act_on=lambda name: name.endswith(".2"))
    for name, block in blocks:
        channels = block.body[0].in_channels
        q1 = _make(make_act, ActSite(f"body.{name}.quant_act1", channels, False, images))
        q3 = _make(make_act, ActSite(f"body.{name}.quant_act3", channels, False, images))
        model.body._modules[name] = QuantResBlock(block, q1, q3, bool(quirks.get("conv1_raw_input", False)))


def rdn_pams_style(model: nn.Module, make_act, make_weight, images, quirks: dict) -> None:
    """RDN's RDBs, dense layers, LFF and GFF as in PAMS/DDTB (quirk ``rdn_gff3_fp_input``)."""
    rdb = [n for n, m in model.RDBs.named_modules()
           if isinstance(m, nn.Conv2d) and n.endswith((".conv.0", "LFF"))]
    convs = [f"RDBs.{n}" for n in rdb] + ["GFF.0", "GFF.1"]
    fp_input = {"GFF.1"} if quirks.get("rdn_gff3_fp_input", False) else set()
    swap_with_sites(model, convs, make_act, make_weight, images,
          act_on=lambda name: not name.endswith(".conv.0") and name not in fp_input)
    for i, block in enumerate(model.RDBs):
        for c, layer in enumerate(block.convs):
            if c > 0:
                site = ActSite(f"RDBs.{i}.convs.{c}.act_quant", layer.conv[0].in_channels, False, images)
                block.convs._modules[str(c)] = QuantDenseLayer(layer, _make(make_act, site))
        site = ActSite(f"RDBs.{i}.act_quant", block.convs[0].conv[0].in_channels, False, images)
        model.RDBs._modules[str(i)] = QuantRDB(block, _make(make_act, site))


# -- config helpers shared by PAMS, DAQ and DDTB ------------------------------------------------------


def read_quirks(cfg: dict) -> dict[str, bool]:
    """The ``quirks.<name>`` switches (their names and defaults: the method's YAML); ``official: true`` turns them
    all on."""
    official = bool(cfg["official"])
    return {name: official or bool(on) for name, on in cfg["quirks"].items()}


RELEASE_PIXEL_RANGE = 255.0  # PAMS and DDTB set their absolute constants on EDSR's 0–255 features


def release_scale(model: nn.Module, enabled: bool) -> float:
    """``pixel_range / 255`` of ``model`` when ``enabled`` (``scale_release_constants``), else 1: the factor that
    carries a PAMS/DDTB constant set for 0–255 features (the clip lr ``qparam_lr``, the SKT weight against the
    native-range L1) to a network in [0, 1] (METHODS.md §1.1); 1 for EDSR and RDN either way."""
    return pixel_range(model) / RELEASE_PIXEL_RANGE if enabled else 1.0


# -- optimizer groups shared by PAMS and DDTB -------------------------------------------------------------
def clip_param_groups(model: nn.Module, clip_params: list[nn.Parameter], lr: float, clip_lr: float) -> list[dict]:
    """PAMS / DDTB optimizer groups: ``net`` (every other trainable parameter) at ``lr`` and ``alpha`` (the
    activation clipping parameters) at ``clip_lr``; without clipping parameters only ``net``."""
    ids = {id(p) for p in clip_params}
    groups = [{"name": "net", "params": [p for p in model.parameters() if p.requires_grad and id(p) not in ids],
               "lr": lr}]
    if clip_params:
        groups.append({"name": "alpha", "params": clip_params, "lr": clip_lr})
    return groups
