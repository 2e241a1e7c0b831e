"""Feature and weight distributions of (quantized) SR networks: supplement S9, S10, Figures S1 and S2
(METHODS.md §7).

Every function takes a model (an ``nn.Module``, or the path of an odm-sr ``.ckpt``, loaded with
``trained.load_trained``) and, where it needs data, images in [0, 1]: a data set of items with ``lr``
(``build_dataset``), a list of (C, H, W) / (1, C, H, W) tensors, or an (N, C, H, W) tensor. Images go through
the network one at a time, scaled to its ``pixel_range``, in eval mode, under ``no_grad``.

Layers. The *quantized layers* are the conv/linear layers of ``quant.layers.quantized_layers``; an FP model
(none) uses its backbone's placement rule (``quant.backbones.select_layers``). A quantized layer's *quantizer*
is its own ``act_quant`` or, without one (PAMS-style blocks: conv1 sees the block quantizer's output), the
activation quantizer whose output it receives; the pre-quantizer tensor X_i is that quantizer's input.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from odm_sr.analysis.complexity import find_quantizers
from odm_sr.models.base import pixel_range
from odm_sr.quant.backbones import select_layers
from odm_sr.quant.calibration import batch_range, eval_mode
from odm_sr.quant.functional import uniform_quantize
from odm_sr.quant.layers import QuantMixin, quantized_layers
from odm_sr.quant.quantizer import LEVEL_GRIDS, Quantizer

DEFINITIONS = ("channel_mean", "channel_std", "tensor_mean_std")
QUANTIZER_CHOICES = ("own", "fixed")


# -- inputs ---------------------------------------------------------------------------------------------------
def as_model(model: nn.Module | str | Path) -> nn.Module:
    """``model`` itself, or the trained network of an odm-sr checkpoint path."""
    if isinstance(model, nn.Module):
        return model
    from odm_sr.trained import load_trained

    return load_trained(model).net


def iter_images(images: Any, pixel_range: float = 1.0, device: torch.device | str = "cpu") -> Iterator[Tensor]:
    """(1, C, H, W) tensors in [0, ``pixel_range``] from a data set, a list, or an (N, C, H, W) tensor."""
    if isinstance(images, Tensor) and images.dim() == 4:
        images = list(images)
    elif isinstance(images, (Tensor, dict)):
        images = [images]
    for item in images:
        lr = item["lr"] if isinstance(item, dict) else item
        lr = lr if lr.dim() == 4 else lr.unsqueeze(0)
        yield lr.to(device=device, dtype=torch.float32) * pixel_range


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.zeros(())).device


# -- layers and hooks -----------------------------------------------------------------------------------------
def input_layers(model: nn.Module, placement: dict | None = None) -> dict[str, nn.Module]:
    """Quantized conv/linear layers by name (module order); for an FP model, the placement rule's layers."""
    layers = {n: m for n, m in quantized_layers(model).items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if layers:
        return layers
    return {name: model.get_submodule(name) for name in select_layers(model, placement)}


def activation_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """Every activation quantizer (``complexity.find_quantizers`` less the weight quantizers)."""
    return {n: q for n, q in find_quantizers(model).items() if not n.endswith("weight_quant")}


@contextlib.contextmanager
def fp_mode(model: nn.Module) -> Iterator[None]:
    """Every quantizer (activation, weight, block-level) detached inside the block: the FP network."""
    detached = []
    for name in find_quantizers(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        detached.append((parent, child, parent._modules[child]))
        parent._modules[child] = None
    try:
        yield
    finally:
        for parent, child, module in detached:
            parent._modules[child] = module


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def layer_inputs(model: nn.Module, layers: dict[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """{layer name: its input} of the last forward of ``model``, filled by forward pre-hooks."""
    seen: dict[str, Tensor] = {}

    def hook(name: str):
        return lambda _module, args: seen.__setitem__(name, args[0].detach())

    handles = [model.register_forward_pre_hook(lambda *_: seen.clear())]
    handles += [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    with _hooks(handles):
        yield seen


Site = tuple[Tensor, Tensor, nn.Module]  # (X_i, q_i(X_i), q_i)


@contextlib.contextmanager
def quantizer_sites(model: nn.Module) -> Iterator[dict[str, Site]]:
    """{layer name: (X_i, q_i(X_i), q_i)} of the last forward, for every quantized layer with a quantizer
    (module docstring): forward hooks record each activation quantizer's input and output; a layer's pre-hook
    finds the quantizer that produced its input, or its post-hook takes its own ``act_quant``'s record."""
    outputs: dict[int, tuple[Tensor, Site]] = {}  # id(quantizer output) -> (that output, kept alive; site)
    last: dict[int, Site] = {}  # id(quantizer) -> its site in this forward
    sites: dict[str, Site] = {}

    def reset(_module, _args):
        outputs.clear(), last.clear(), sites.clear()

    def on_quantizer(module, args, output):
        site = (args[0].detach(), output.detach(), module)
        outputs[id(output)], last[id(module)] = (output, site), site

    def on_input(name: str):
        def hook(_module, args):
            hit = outputs.get(id(args[0]))
            if hit is not None and hit[0] is args[0]:
                sites[name] = hit[1]
        return hook

    def on_output(name: str, own: nn.Module):
        def hook(_module, _args, _output):
            if id(own) in last:
                sites[name] = last[id(own)]
        return hook

    handles = [model.register_forward_pre_hook(reset)]
    handles += [q.register_forward_hook(on_quantizer) for q in activation_quantizers(model).values()]
    for name, layer in input_layers(model).items():
        own = layer.act_quant if isinstance(layer, QuantMixin) else None
        handles.append(layer.register_forward_hook(on_output(name, own)) if own is not None
                       else layer.register_forward_pre_hook(on_input(name)))
    with _hooks(handles):
        yield sites


def _forward_each(model: nn.Module, images: Any) -> Iterator[None]:
    """Run ``model`` on each image (eval mode, no_grad); yields after each forward."""
    rng = pixel_range(model)
    with eval_mode(model), torch.no_grad():
        for x in iter_images(images, rng, _device(model)):
            model(x)
            yield


# -- S9: feature variance -------------------------------------------------------------------------------------
def _channel_view(x: Tensor, layer: nn.Module) -> Tensor:
    """(C, elements) of one image's layer input: conv (1, C, H, W); linear (..., C) (windows, tokens)."""
    x = x.double()
    return x.reshape(-1, x.shape[-1]).t() if isinstance(layer, nn.Linear) else x.transpose(0, 1).flatten(1)


def _pop_var(values: np.ndarray, axis: int) -> np.ndarray:
    return np.var(values, axis=axis, ddof=0)


def feature_variance(model: nn.Module | str | Path, images: Any, definition: str = "channel_mean",
                     placement: dict | None = None) -> dict[str, Any]:
    """S9: image-wise and channel-wise variance of the inputs X_i of the quantized layers, FP forward
    (quantizers detached, ``fp_mode``). ``channel_mean``: A_i[n, c] = spatial mean of channel c of X_i for
    image n; V_img = (1/L) Σ_i (1/C_i) Σ_c Var_n A_i[n, c], V_ch = (1/L) Σ_i (1/N) Σ_n Var_c A_i[n, c]
    (population variances). ``channel_std``: A = the spatial (population) std instead. ``tensor_mean_std``:
    V_img = Var_n μ_i[n] + Var_n σ_i[n] over the whole tensor; V_ch = the channel-wise terms of both
    ``channel_mean`` and ``channel_std`` added (our reading; METHODS.md §7 defines only the image-wise one).
    Returns {'definition', 'image_wise', 'channel_wise', 'num_images', 'num_layers', 'layers': {name: {...}}}.
    """
    if definition not in DEFINITIONS:
        raise ValueError(f"analysis.var.definition={definition!r}: expected one of {DEFINITIONS}")
    model = as_model(model)
    layers = input_layers(model, placement)
    stats: dict[str, list[np.ndarray]] = {name: [] for name in layers}  # per image: (2, C) channel mean, std
    with fp_mode(model), layer_inputs(model, layers) as seen:
        for _ in _forward_each(model, images):
            for name, layer in layers.items():
                if name in seen:
                    v = _channel_view(seen[name], layer)
                    stats[name].append(torch.stack([v.mean(1), v.std(1, unbiased=False)]).cpu().numpy())
    per_layer = {}
    for name, per_image in stats.items():
        if not per_image:
            continue
        a = np.stack(per_image)  # (N, 2, C)
        if definition == "tensor_mean_std":
            v = _tensor_mean_std(a)
        else:
            k = 0 if definition == "channel_mean" else 1
            v = (float(_pop_var(a[:, k], 0).mean()), float(_pop_var(a[:, k], 1).mean()))
        per_layer[name] = {"image_wise": v[0], "channel_wise": v[1]}
    if not per_layer:
        raise ValueError("feature_variance: no image reached a quantized layer (empty image set?)")
    return {"definition": definition,
            "image_wise": float(np.mean([v["image_wise"] for v in per_layer.values()])),
            "channel_wise": float(np.mean([v["channel_wise"] for v in per_layer.values()])),
            "num_images": len(next(iter(stats.values()))), "num_layers": len(per_layer), "layers": per_layer}


def _tensor_mean_std(a: np.ndarray) -> tuple[float, float]:
    """From per-image channel means m and stds s (N, 2, C): the whole-tensor μ, σ per image, exactly
    (equal channel sizes): μ = mean_c m, σ² = mean_c (s² + m²) − μ²."""
    m, s = a[:, 0], a[:, 1]
    mu = m.mean(1)
    sigma = np.sqrt(np.maximum((s ** 2 + m ** 2).mean(1) - mu ** 2, 0.0))
    image_wise = _pop_var(mu, 0) + _pop_var(sigma, 0)
    channel_wise = _pop_var(m, 1).mean() + _pop_var(s, 1).mean()
    return float(image_wise), float(channel_wise)


# -- S10: feature mismatch ------------------------------------------------------------------------------------
def _fixed_ranges(model: nn.Module, images: Any, j: float) -> dict[str, tuple[float, float]]:
    """Per layer, the mean over images of (P_{100−j}, P_j) of X_i (static ODM-style ranges)."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    with quantizer_sites(model) as sites:
        for _ in _forward_each(model, images):
            for name, (x, _, _) in sites.items():
                sums[name] = sums.get(name, 0) + batch_range(x, j).cpu().numpy()
                counts[name] = counts.get(name, 0) + 1
    return {name: tuple(sums[name] / counts[name]) for name in sums}


def feature_mismatch(model: nn.Module | str | Path, images: Any, quantizer: str = "own",
                     j: float = 99.0) -> dict[str, Any]:
    """S10: per image n and layer i, μ_i[n] and σ_i[n] (population) over the whole pre-quantizer tensor X_i and
    the mismatch ‖X_i − q_i(X_i)‖₂ in the quantized forward. ``quantizer='own'``: q_i is the layer's quantizer
    as it ran in the forward (eval mode; per image for DAQ and DDTB); ``fixed``: static ranges re-calibrated on
    ``images`` (mean (P_{100−j}, P_j), ``uniform_quantize`` at the quantizer's bits).
    Returns {'var_mean': mean_i Var_n μ, 'var_std': mean_i Var_n σ, 'mismatch': mean over i and n, 'layers'}.
    """
    if quantizer not in QUANTIZER_CHOICES:
        raise ValueError(f"analysis.mismatch.quantizer={quantizer!r}: expected one of {QUANTIZER_CHOICES}")
    model = as_model(model)
    images = list(images) if quantizer == "fixed" else images  # two passes
    ranges = _fixed_ranges(model, images, j) if quantizer == "fixed" else {}
    rows: dict[str, list[tuple[float, float, float]]] = {}
    with quantizer_sites(model) as sites:
        for _ in _forward_each(model, images):
            for name, (x, q, module) in sites.items():
                if quantizer == "fixed":
                    q = uniform_quantize(x, *ranges[name], int(module.bits))
                x64 = x.double()
                rows.setdefault(name, []).append((float(x64.mean()), float(x64.std(unbiased=False)),
                                                  float((x64 - q.double()).norm())))
    if not rows:
        raise ValueError("feature_mismatch: the model has no activation quantizer on a quantized layer "
                         "(an FP model has nothing to mismatch), or the image set is empty")
    per_layer = {name: {"var_mean": float(_pop_var(np.array(r)[:, 0], 0)),
                        "var_std": float(_pop_var(np.array(r)[:, 1], 0)),
                        "mismatch": float(np.array(r)[:, 2].mean())} for name, r in rows.items()}
    return {"quantizer": quantizer, "num_images": len(next(iter(rows.values()))), "num_layers": len(rows),
            **{k: float(np.mean([v[k] for v in per_layer.values()])) for k in ("var_mean", "var_std", "mismatch")},
            "layers": per_layer}


def odm_initialized(model: nn.Module | str | Path, images: Any, bits: int = 2, j: float = 99.0,
                    quantize_weights: bool = True, placement: dict | None = None) -> nn.Module:
    """S10's "before QAT" network (``analysis.mismatch.before=fp_odm_init``): a copy of the FP ``model`` under
    ODM at ``bits`` (weights too unless ``quantize_weights=False``), ranges initialised with j on ``images``."""
    from odm_sr.config import merge_config, method_defaults
    from odm_sr.quant.base import Bits
    from odm_sr.quant.calibration import calibrate_activation_ranges
    from odm_sr.quant.odm import ODM

    net = copy.deepcopy(as_model(model))
    images = list(images)
    cfg = {"init": {"j": float(j), "num_batches": max(1, len(images))}, "placement": placement or {}}
    ODM(merge_config(method_defaults("odm"), cfg), Bits(w=bits if quantize_weights else 32, a=bits)).quantize(net)
    rng = pixel_range(net)
    calibrate_activation_ranges(net, iter_images(images, rng, _device(net)), j=float(j),
                                num_batches=max(1, len(images)), progress=False)
    return net.eval()


# -- Figure S1: activation histograms ------------------------------------------------------------------------
def static_levels(quantizer: Quantizer | None) -> np.ndarray | None:
    """The fixed levels of a static quantizer (its ``static_range`` laid out on its ``level_grid``), else None
    (DAQ, dynamic DDTB, FP). ODM: l + k·(u − l)/(2^b − 1); PAMS: α·k/Q, |k| ≤ Q = 2^(b−1) − 1; DDTB (static):
    the zero-anchored grid k/σ, σ = (2^b − 1)/(u − l)."""
    bounds = quantizer.static_range() if quantizer is not None and quantizer.bits < 32 else None
    if bounds is None:  # FP, dynamic (DAQ, gated DDTB) or passing through (DDTB's calibration epoch)
        return None
    lower, upper = bounds
    bits = int(quantizer.bits)
    n = 2 ** bits - 1
    if quantizer.level_grid == "uniform":
        return lower + np.arange(n + 1) * (upper - lower) / n
    if quantizer.level_grid == "zero_anchored":
        sigma = n / (upper - lower)
        return np.arange(round(sigma * lower), round(sigma * upper) + 1) / sigma
    if quantizer.level_grid == "symmetric_zero":
        q_max = 2 ** (bits - 1) - 1
        return upper * np.arange(-q_max, q_max + 1) / q_max
    raise ValueError(f"{type(quantizer).__name__}.level_grid={quantizer.level_grid!r}: expected one of "
                     f"{LEVEL_GRIDS}")


def pick_layers(names: Sequence[str], layers: Sequence[str | int]) -> list[str]:
    """'first' / 'middle' / 'last', an index, or a name -> layer names (``analysis.hist.layers``)."""
    position = {"first": 0, "middle": (len(names) - 1) // 2, "last": len(names) - 1}
    picked = []
    for item in layers:
        if isinstance(item, int) or item in position:
            picked.append(names[position.get(item, item)])  # type: ignore[arg-type]
        elif item in names:
            picked.append(item)
        else:
            raise KeyError(f"layer {item!r}: expected first/middle/last, an index or one of {list(names)[:6]}...")
    return list(dict.fromkeys(picked))


def activation_histograms(model: nn.Module | str | Path, image: Any, layers: Sequence[str | int] = ("first", "middle",
                          "last"), bins: int = 100, path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Figure S1: histograms of X_i (the pre-quantizer tensor, quantized forward of one image) with the
    quantizer's static levels. Returns {layer: {'counts', 'edges', 'levels' (None if dynamic or FP),
    'quantizer', 'bits', 'min', 'max', 'mean', 'std'}}; saves a PNG at ``path``."""
    model = as_model(model)
    if quantized_layers(model):
        context, pick = quantizer_sites(model), lambda seen: {n: (x, m) for n, (x, _, m) in seen.items()}
    else:
        context, pick = layer_inputs(model, input_layers(model)), lambda seen: {n: (x, None) for n, x in seen.items()}
    captured: dict[str, tuple[Tensor, nn.Module | None]] = {}
    with context as seen:
        for _ in _forward_each(model, image):
            captured = pick(seen)
    if not captured:
        raise ValueError("activation_histograms: no layer input was captured (no image?)")
    chosen = pick_layers([n for n in input_layers(model) if n in captured], layers)
    out = {}
    for name in chosen:
        x, quantizer = captured[name]
        values = x.double().flatten().cpu().numpy()
        levels = static_levels(quantizer)
        lo, hi = values.min(), values.max()
        if levels is not None:
            lo, hi = min(lo, levels.min()), max(hi, levels.max())
        counts, edges = np.histogram(values, bins=bins, range=(lo, hi if hi > lo else lo + 1.0))
        out[name] = {"counts": counts, "edges": edges, "levels": levels,
                     "quantizer": type(quantizer).__name__ if quantizer is not None else None,
                     "bits": quantizer.bits if quantizer is not None else None, "min": float(values.min()),
                     "max": float(values.max()), "mean": float(values.mean()), "std": float(values.std())}
    if path is not None:
        from odm_sr.analysis.plots import plot_histograms

        plot_histograms(out, path)
    return out


# -- Figure S2: weight statistics ------------------------------------------------------------------------------
def weight_stats(model: nn.Module | str | Path, placement: dict | None = None) -> list[dict[str, Any]]:
    """Figure S2 (``analysis.wstats.source=latent``): per quantized layer, min / max / mean of the latent
    (float) weights, and the weight quantizer's clip bound u_w where it has one (ODM WCC, LSQ)."""
    model = as_model(model)
    rows = []
    for name, layer in input_layers(model, placement).items():
        w = layer.weight.detach().double()
        row = {"layer": name, "min": float(w.min()), "max": float(w.max()), "mean": float(w.mean()), "clip": None}
        quantizer = layer.weight_quant if isinstance(layer, QuantMixin) else None
        if isinstance(quantizer, Quantizer):
            with torch.no_grad():
                value = quantizer.weight_clip_bound(layer.weight)
            if value is not None:
                row["clip"] = float(value) if not math.isnan(float(value)) else None
        rows.append(row)
    return rows
