"""Complexity accounting (METHODS.md §6, Table S8 style): storage in K 32-bit-equivalent params and BitOPs.

**Quantizers** are the ``quant.quantizer.Quantizer`` modules that are not layers themselves (ODM-FQ's
``SkipQuantizer`` hosts an ``act_quant``, which is the quantizer). Only the top-most one counts; what lives
inside it (DDTB's ``gate``) belongs to it. ``weight_quant`` children are weight quantizers, every other one an
activation quantizer.

**Storage** [K] = (1/1000)·Σ_p n_p·b_p/32 over ``model.named_parameters()``, by role:

- ``quantized_weight``: the ``weight`` of a quantized layer whose weight quantizer has bits < 32, at b_w;
- ``fp``: everything else outside quantizers (biases, FP layers, norms, RPB tables), at 32 bits;
- ``act_bound``: direct parameters of an activation quantizer (ODM l_a/u_a, PAMS α, DDTB l/u), at 32;
- ``weight_qparam``: direct parameters of a weight quantizer (ODM γ_w, folded into u_w at export; LSQ s);
- ``gate_weight``: conv/linear weights nested in a quantizer (DDTB's ternary gate convs), at ``gate_bits``;
- ``gate_norm``: other nested parameters (gate BN affine), at 32 if ``ddtb_count_bn``.

The overhead is every quantizer role. ``rule='full'`` counts them all; ``rule='paper_like'`` only
``act_bound`` and ``gate_weight`` (it reproduces the summary's ODM 0.06K and DDTB 1.9K for EDSR, §6), except on
SwinIR/HAT, where it counts ``act_bound`` plus one 32-bit weight scale per quantized layer (as ``weight_qparam``)
and no gates: this reproduces Table S8's SwinIR-light ×4 DDTB 160.4K, the same as ODM's (the full rule gives
166.8K, the EDSR counting 164.9K).
Buffers (BN statistics, percentiles, max|W|, std) are never counted. **MeanShift is not counted**: it is a
fixed conv (requires_grad False) derived from ``rgb_range`` and the DIV2K mean, and §2.1's parameter counts
exclude it. A gate counts only where its quantizer is dynamic (``is_dynamic``); before DDTB's calibration
epoch has chosen them, ⌊N·ratio⌋ of the N gates are assumed (``dynamic_ratio``; default DDTB's own auto
ratio for the backbone), each at the mean gate size (exact when all gates have the same width, as in EDSR).

**BitOPs** = Σ_MAC b_w·b_a, FP at 32×32, from one shape-only forward on zeros (1, 3, H, W) in eval mode and
without gradients: every conv/linear returns zeros of its output shape and records its MACs (conv
H_o·W_o·C_o·(C_i/groups)·k², linear tokens·C_i·C_o); every quantizer is bypassed (identity), so nothing is
calibrated or updated, and tags its output with its bits. A layer's b_w is its weight quantizer's bits; its
b_a is its own input quantizer's bits or, without one, the bits of the quantizer that produced its input
(PAMS/DDTB conv1 after q1, RDN dense layers), else 32. Window attention (Q·Kᵀ and A·V) adds 2·N_q·N_k·C per
window, i.e. 2·H·W·M²·C per Swin layer (M = 24 keys for HAT's OCAB), at 32×32 (every method keeps them
FP) unless ``bitops(quant_attn_matmul=True)``. Not counted: adds, norms, softmax, activations, pixel shuffle,
and **MeanShift** (weight I/std with std 1, i.e. a bias add; SwinIR/HAT subtract the mean without any conv).
DDTB gates add C·32 + 64 MACs per image and dynamic quantizer at 2×2 bits; DAQ's runtime statistics add
``daq_ops_per_elem`` FP operations (32×32) per input element of each of its activation quantizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

from odm_sr.models.edsr import MeanShift
from odm_sr.quant.backbones import backbone_of
from odm_sr.quant.daq import DaqActQuantizer
from odm_sr.quant.ddtb import GATE_BITS
from odm_sr.quant.layers import QuantMixin
from odm_sr.quant.quantizer import Quantizer

FP_BITS = 32
RULES = ("full", "paper_like")
OVERHEAD_ROLES = ("act_bound", "weight_qparam", "gate_weight", "gate_norm")
PAPER_LIKE_ROLES = ("act_bound", "gate_weight")
RUNTIME_STAT_QUANTIZERS: tuple[type[nn.Module], ...] = (DaqActQuantizer,)  # §6: DAQ's μ_c, σ_c per image


# -- quantizer discovery -----------------------------------------------------------------------------------
def is_quantizer(name: str, module: nn.Module) -> bool:
    """The rule in the module docstring: a ``Quantizer`` that is not a (quantized) layer."""
    return isinstance(module, Quantizer) and not isinstance(module, (nn.Conv2d, nn.Linear, QuantMixin))


def find_quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Top-most quantizer modules of ``model`` by qualified name, in module order."""
    found: dict[str, Quantizer] = {}
    for name, module in model.named_modules():
        if name and owning_quantizer(name, found) is None and is_quantizer(name, module):
            found[name] = module
    return found


def owning_quantizer(name: str, quantizers: dict[str, Quantizer]) -> str | None:
    """The quantizer ``name`` is, or lives under, if any."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in quantizers:
            return prefix
    return None


def layer_bits(bits_like: Any) -> int:
    """``module.bits`` capped at 32 (32 = float)."""
    return min(int(bits_like), FP_BITS)


def _gated(quantizers: dict[str, Quantizer]) -> dict[str, Quantizer]:
    """Quantizers that hold sub-modules with parameters (DDTB's dynamic gates)."""
    return {n: q for n, q in quantizers.items()
            if any(True for child in q.children() for _ in child.parameters())}


def gate_shares(model: nn.Module, quantizers: dict[str, Quantizer],
                dynamic_ratio: float | None = None) -> tuple[dict[str, Fraction], bool]:
    """Per gated quantizer, the share of its gate to count (1 dynamic, 0 static), and whether assumed.

    Gates without an ``is_dynamic`` flag always count. If no flagged gate is dynamic yet (DDTB before its
    calibration epoch), ⌊N·ratio⌋ of the N flagged gates are assumed dynamic, spread evenly as ⌊N·ratio⌋/N.
    """
    gated = _gated(quantizers)
    flags = {n: bool(q.is_dynamic) for n, q in gated.items()  # a bool or a 0-d tensor buffer
             if q.is_dynamic is not None}
    shares = {n: Fraction(1) for n in gated if n not in flags}
    if any(flags.values()) or not flags:
        shares.update({n: Fraction(int(flag)) for n, flag in flags.items()})
        return shares, False
    ratio = default_dynamic_ratio(model) if dynamic_ratio is None else float(dynamic_ratio)
    share = Fraction(int(len(flags) * ratio), len(flags))  # exact: no 13.999… gates
    shares.update(dict.fromkeys(flags, share))
    return shares, True


def default_dynamic_ratio(model: nn.Module) -> float:
    """DDTB's 'auto' dynamic ratio for this backbone (§4.3: EDSR 0.3, RDN 0.5, transformers 0.3)."""
    return float(backbone_of(model).ddtb_auto["dynamic_ratio"])


# -- storage -------------------------------------------------------------------------------------------------
def _meanshift_params(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, MeanShift) for p in m.parameters()}


def _param_role(param_name: str, param: nn.Parameter, model: nn.Module, quantizers: dict[str, Quantizer],
                quantized_weights: dict[int, int], gate_bits: int) -> tuple[str, int, str | None]:
    """(role, bits, owning quantizer) of one parameter, per the module docstring."""
    owner_name, _, leaf = param_name.rpartition(".")
    qname = owning_quantizer(owner_name, quantizers) if owner_name else None
    if qname is None:
        if id(param) in quantized_weights:
            return "quantized_weight", quantized_weights[id(param)], None
        return "fp", FP_BITS, None
    if owner_name == qname:
        kind = "weight_qparam" if qname.rpartition(".")[2] == "weight_quant" else "act_bound"
        return kind, FP_BITS, qname
    owner = model.get_submodule(owner_name)
    if isinstance(owner, (nn.Conv2d, nn.Linear)) and leaf == "weight":
        return "gate_weight", gate_bits, qname
    return "gate_norm", FP_BITS, qname


def storage(model: nn.Module, rule: str = "full", *, ddtb_count_bn: bool = True, gate_bits: int = GATE_BITS,
            dynamic_ratio: float | None = None, count_meanshift: bool = False) -> dict[str, Any]:
    """Storage in K 32-bit-equivalent parameters (METHODS.md §6; roles and rules in the module docstring).

    Returns ``total_k`` (backbone + overhead), ``backbone_k``, ``overhead_k``, ``params`` (counted
    parameters), ``by_role`` (K per role), ``layers`` ({owning module: {params, k, role}}, role 'mixed' for a
    quantized layer's weight + bias), ``dynamic_gates`` and ``gates_assumed``.
    """
    if rule not in RULES:
        raise ValueError(f"analysis.storage.rule={rule!r}: expected one of {RULES}")
    counted_roles = set(PAPER_LIKE_ROLES if rule == "paper_like" else OVERHEAD_ROLES)
    per_layer_scale = rule == "paper_like" and backbone_of(model).per_layer_scale_storage  # Table S8
    if per_layer_scale:
        counted_roles = {"act_bound"}
    if not ddtb_count_bn:
        counted_roles.discard("gate_norm")
    quantizers = find_quantizers(model)
    shares, assumed = gate_shares(model, quantizers, dynamic_ratio)
    quantized_weights = {id(m.weight): layer_bits(m.weight_quant.bits) for m in model.modules()
                         if isinstance(m, QuantMixin) and m.weight_quant is not None
                         and layer_bits(m.weight_quant.bits) < FP_BITS}
    skip = set() if count_meanshift else _meanshift_params(model)
    by_role = dict.fromkeys(("quantized_weight", "fp", *OVERHEAD_ROLES), Fraction(0))  # exact sums
    layers: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if id(p) in skip:
            continue
        role, bits, qname = _param_role(name, p, model, quantizers, quantized_weights, gate_bits)
        if role in OVERHEAD_ROLES and role not in counted_roles:
            continue
        count = p.numel() * (shares.get(qname, Fraction(1)) if role.startswith("gate_") else 1)
        k = Fraction(count) * bits / FP_BITS / 1000
        by_role[role] += k
        entry = layers.setdefault(name.rpartition(".")[0],
                                  {"params": Fraction(0), "k": Fraction(0), "role": role})
        entry["params"] += count
        entry["k"] += k
        if entry["role"] != role:
            entry["role"] = "mixed"
    if per_layer_scale:
        by_role["weight_qparam"] += Fraction(len(quantized_weights), 1000)
    overhead = sum(by_role[r] for r in OVERHEAD_ROLES)
    total = sum(by_role.values())
    return {"rule": rule, "total_k": float(total), "backbone_k": float(total - overhead),
            "overhead_k": float(overhead), "params": float(sum(e["params"] for e in layers.values())),
            "by_role": {r: float(k) for r, k in by_role.items()},
            "layers": {n: {"params": float(e["params"]), "k": float(e["k"]), "role": e["role"]}
                       for n, e in layers.items()},
            "dynamic_gates": float(sum(shares.get(n, 0) for n in _gated(quantizers))),
            "gates_assumed": assumed}


# -- BitOPs --------------------------------------------------------------------------------------------------
def conv_output_shape(conv: nn.Conv2d, shape: Sequence[int]) -> tuple[int, ...]:
    """(N, C_o, H_o, W_o) of ``conv`` on an input of ``shape`` (PyTorch's formula; 'same'/'valid' too)."""
    n, _, *spatial = shape
    out = []
    for i, size in enumerate(spatial):
        if conv.padding == "same":
            out.append(size)
            continue
        pad = 0 if conv.padding == "valid" else conv.padding[i]
        span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        out.append((size + 2 * pad - span) // conv.stride[i] + 1)
    return (n, conv.out_channels, *out)


class _Recorder:
    """What the shape-only forward saw: per-layer MACs and bits, attention MACs, runtime-statistic inputs."""

    def __init__(self) -> None:
        self.layers: dict[str, dict[str, Any]] = {}
        self.attention_macs = 0
        self.stat_elements = 0
        self.tags: dict[int, tuple[Tensor, int]] = {}  # id(tensor) -> (tensor kept alive, its bits)

    def tag(self, x: Tensor, bits: int) -> Tensor:
        y = x.view_as(x)  # a fresh tensor object: the tag cannot leak onto the quantizer's input
        self.tags[id(y)] = (y, bits)
        return y

    def input_bits(self, x: Tensor) -> int:
        return self.tags[id(x)][1] if id(x) in self.tags else FP_BITS

    def note_quantizer_input(self, quantizer: nn.Module | None, x: Tensor) -> None:
        if isinstance(quantizer, RUNTIME_STAT_QUANTIZERS):
            self.stat_elements += x.numel()

    def layer(self, name: str, module: nn.Module, x: Tensor, macs: int) -> None:
        weight_q, act_q = (module.weight_quant, module.act_quant) if isinstance(module, QuantMixin) else (None, None)
        self.note_quantizer_input(act_q, x)
        entry = self.layers.setdefault(name, {
            "macs": 0, "w_bits": layer_bits(weight_q.bits) if weight_q is not None else FP_BITS,
            "a_bits": layer_bits(act_q.bits) if act_q is not None else self.input_bits(x),
            "meanshift": isinstance(module, MeanShift)})
        entry["macs"] += int(macs)


@contextmanager
def _override_forward(module: nn.Module, forward) -> Iterator[None]:
    saved = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if saved is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = saved


def _layer_stub(rec: _Recorder, name: str, layer: nn.Module):
    """Record MACs (conv H_o·W_o·C_o·(C_i/groups)·k², linear tokens·C_i·C_o) and return zeros of the shape."""
    def forward(x: Tensor) -> Tensor:
        if isinstance(layer, nn.Linear):
            shape: tuple[int, ...] = (*x.shape[:-1], layer.out_features)
            macs = x.numel() * layer.out_features
        else:
            shape = conv_output_shape(layer, x.shape)
            macs = math.prod(shape) * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
        rec.layer(name, layer, x, macs)
        return x.new_zeros(shape)
    return forward


def _quantizer_stub(rec: _Recorder, quantizer: Quantizer):
    bits = layer_bits(quantizer.bits)

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        rec.note_quantizer_input(quantizer, x)
        return rec.tag(x, bits)
    return forward


def _attention_hook(rec: _Recorder, macs: Callable[[nn.Module, Tensor], int]):
    """Q·Kᵀ and A·V of one attention module, counted by the backbone table's ``attention_macs`` formula."""
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        rec.attention_macs += macs(module, args[0])
    return hook


@torch.no_grad()
def _shape_only_forward(model: nn.Module, quantizers: dict[str, Quantizer],
                        lr_hw: Sequence[int]) -> _Recorder:
    """Run the forward described in the module docstring; the model is left exactly as it was."""
    rec = _Recorder()
    modes = {m: m.training for m in model.modules()}
    ref = next(iter(model.parameters()), None)
    x = torch.zeros(1, 3, int(lr_hw[0]), int(lr_hw[1]), device=ref.device if ref is not None else None,
                    dtype=ref.dtype if ref is not None else None)
    overrides = [(q, _quantizer_stub(rec, q)) for q in quantizers.values()]
    overrides += [(m, _layer_stub(rec, name, m)) for name, m in model.named_modules()
                  if isinstance(m, (nn.Conv2d, nn.Linear)) and owning_quantizer(name, quantizers) is None]
    formulas = backbone_of(model).attention_macs
    handles = [m.register_forward_hook(_attention_hook(rec, formulas[type(m)])) for m in model.modules()
               if type(m) in formulas]
    try:
        model.eval()
        with ExitStack() as stack:
            for module, forward in overrides:
                stack.enter_context(_override_forward(module, forward))
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    return rec


def _activation_bits(quantizers: dict[str, Quantizer]) -> int:
    bits = [layer_bits(q.bits) for n, q in quantizers.items() if n.rpartition(".")[2] != "weight_quant"]
    return min(bits, default=FP_BITS)


def _gate_macs(quantizers: dict[str, Quantizer], shares: dict[str, Fraction]) -> float:
    """Per image: each counted gate's 1×1 convs on the pooled vector, C·32 + 32·2 for DDTB."""
    total = Fraction(0)
    for name, q in _gated(quantizers).items():
        macs = sum(m.weight.numel() for m in q.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        total += shares.get(name, 0) * macs
    return float(total)


def bitops(model: nn.Module, lr_hw: Sequence[int] = (64, 64), *, quant_attn_matmul: bool = False,
           attn_bits: int | None = None, daq_ops_per_elem: float = 4, gate_bits: int = GATE_BITS,
           dynamic_ratio: float | None = None, count_meanshift: bool = False) -> dict[str, Any]:
    """BitOPs of one LR image of size ``lr_hw`` (METHODS.md §6; counting rules in the module docstring).

    ``quant_attn_matmul``: the attention matmuls at ``attn_bits``² (default: the smallest activation
    quantizer bits in the model). Returns ``total`` (BitOPs), ``macs`` (conv/linear + attention + gate
    MACs), ``fp_macs`` and ``quantized_macs`` (conv/linear only), ``attention_macs``, ``gate_macs``,
    ``stat_ops`` (DAQ, FP operations) and ``layers`` ({name: {macs, w_bits, a_bits, bitops}}).
    """
    quantizers = find_quantizers(model)
    rec = _shape_only_forward(model, quantizers, lr_hw)
    layers = {n: {**e, "bitops": e["macs"] * e["w_bits"] * e["a_bits"]} for n, e in rec.layers.items()
              if count_meanshift or not e["meanshift"]}
    conv_linear = sum(e["bitops"] for e in layers.values())
    attn = FP_BITS
    if quant_attn_matmul:
        attn = layer_bits(attn_bits) if attn_bits is not None else _activation_bits(quantizers)
    shares, assumed = gate_shares(model, quantizers, dynamic_ratio)
    gate_macs = _gate_macs(quantizers, shares)
    stat_ops = daq_ops_per_elem * rec.stat_elements
    total = (conv_linear + rec.attention_macs * attn * attn + gate_macs * gate_bits * gate_bits
             + stat_ops * FP_BITS * FP_BITS)
    macs_cl = sum(e["macs"] for e in layers.values())
    quantized = sum(e["macs"] for e in layers.values() if min(e["w_bits"], e["a_bits"]) < FP_BITS)
    return {"total": total, "macs": macs_cl + rec.attention_macs + gate_macs, "fp_macs": macs_cl - quantized,
            "quantized_macs": quantized, "attention_macs": rec.attention_macs, "gate_macs": gate_macs,
            "stat_ops": stat_ops, "gates_assumed": assumed, "lr_hw": tuple(int(v) for v in lr_hw),
            "layers": layers}


# -- summaries and tables ------------------------------------------------------------------------------------
def summarize(model: nn.Module, method_name: str = "", bits: Any = None, lr_hw: Sequence[int] = (64, 64), *,
              rule: str = "full", ddtb_count_bn: bool = True,
              daq_ops_per_elem: float = 4, dynamic_ratio: float | None = None) -> dict[str, float]:
    """The metrics a training run logs: ``complexity/{storage_k, overhead_k, bitops_g, macs_g}``.

    The counts come from the model's own quantizers; ``method_name`` and ``bits`` are only for the caller's
    labels (the attention matmuls stay FP under every method).
    """
    del method_name, bits  # the model's quantizers say everything; kept for the logging call's symmetry
    s = storage(model, rule, ddtb_count_bn=ddtb_count_bn, dynamic_ratio=dynamic_ratio)
    b = bitops(model, lr_hw,
               daq_ops_per_elem=daq_ops_per_elem, dynamic_ratio=dynamic_ratio)
    return {"complexity/storage_k": float(s["total_k"]), "complexity/overhead_k": float(s["overhead_k"]),
            "complexity/bitops_g": float(b["total"]) / 1e9, "complexity/macs_g": float(b["macs"]) / 1e9}


TABLE_COLUMNS = (("model", "model", "{}"), ("method", "method", "{}"), ("bits", "W/A", "{}"),
                 ("storage_k", "storage (K)", "{:,.3f}"), ("overhead_k", "overhead (K)", "{:,.3f}"),
                 ("bitops_g", "BitOPs (G)", "{:,.2f}"), ("macs_g", "MACs (G)", "{:,.2f}"))


def complexity_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of rows with keys model, method, bits, storage_k, overhead_k, bitops_g, macs_g."""
    lines = ["| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |",
             "|" + "|".join("---" if key in ("model", "method", "bits") else "---:"
                            for key, _, _ in TABLE_COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in TABLE_COLUMNS) + " |")
    return "\n".join(lines)
