"""DDTB's batched weight quantization (``WeightBatch``: the percentile/min-max clipped conv weights and the
gates' conv weights of all layers in one computation per forward) and the gated bounds in one product, against
independent references written here with plain autograd ops: values and the gradients of every input and
parameter to 1e-6 relative, with weights that tie with their clip bounds."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import make_method

from odm_sr.models import build_model
from odm_sr.quant.base import Bits
from odm_sr.quant.blocks import ActSite
from odm_sr.quant.ddtb import (
    DdtbActQuantizer,
    DdtbWeightQuantizer,
    WeightBatch,
    quantize_weights_rows,
)
from odm_sr.quant.functional import TAIL_TOPK_MAX_ELEMENTS, max_abs_weight_quantize_rows, percentile_rows

RTOL = 1e-6
DT = torch.float64


def ste(x):
    return x + (torch.round(x) - x).detach()


def ref_zero_anchored(x, lower, upper, bits):
    sigma = (2**bits - 1) / (upper - lower)
    return ste(sigma * torch.max(torch.min(x, upper), lower)) / sigma


def ref_weight(w, bits, clip):
    """DDTB's weight quantizer: bounds [p1, p99] (``torch.quantile``, linear) or [min, max], detached."""
    flat = w.detach().reshape(-1)
    if clip == "percentile":
        lower, upper = torch.quantile(flat, torch.tensor([0.01, 0.99], dtype=flat.dtype))
    else:
        lower, upper = flat.min(), flat.max()
    return ref_zero_anchored(w, lower, upper, bits)


def ref_max_abs(w, bits):
    q = float(2 ** (bits - 1) - 1)
    m = w.detach().abs().max() + 1e-8
    return ste(w * (q / m)) * (m / q)


def weights_with_ties(count=3, shape=(8, 4, 3, 3), dtype=DT):
    """Random weights; the first has its six smallest and six largest values equal (p1 and p99 land on them:
    ties with both bounds), the second two far outliers."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(count)]
    ws[0].view(-1)[:6] = -5.0
    ws[0].view(-1)[6:12] = 5.0
    if count > 1:
        ws[1].view(-1)[0], ws[1].view(-1)[1] = -40.0, 30.0
    return [w.requires_grad_() for w in ws]


def compare_lists(fused, ref, inputs):
    """``fused(inputs)`` (a list) against ``[ref(t) for t in inputs]``: values and every input's gradient."""
    a = [t.detach().clone().requires_grad_() for t in inputs]
    b = [t.detach().clone().requires_grad_() for t in inputs]
    qa, qb = fused(a), [ref(t) for t in b]
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(q.shape, generator=g, dtype=q.dtype) for q in qb]
    for x, y in zip(qa, qb, strict=True):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=0)
    ga = torch.autograd.grad(qa, a, grads)
    gb = torch.autograd.grad(qb, b, grads)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=1e-12)
    return ga


# -- the batched functions ------------------------------------------------------------------------------
def test_percentile_rows_matches_quantile_of_each_row():
    ws = weights_with_ties(4)
    rows = torch.stack([w.detach().reshape(-1) for w in ws])
    got = percentile_rows(rows, (1.0, 99.0, 95.0))
    want = torch.stack([torch.quantile(r, torch.tensor([0.01, 0.99, 0.95], dtype=DT)) for r in rows], dim=1)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)
    assert got[0, 0] == -5.0 and got[1, 0] == 5.0  # the tied values exactly
    # float32 rows: q/100 rounded to float32 as ``torch.quantile`` does
    rows32 = rows.float()
    want32 = torch.stack([torch.quantile(r, torch.tensor([0.01, 0.99])) for r in rows32], dim=1)
    torch.testing.assert_close(percentile_rows(rows32, (1.0, 99.0)), want32, rtol=RTOL, atol=0)
    # only the tail path: a median, or rows above the top-k size, are left to ``percentile``
    assert percentile_rows(rows, (50.0,)) is None
    assert percentile_rows(torch.zeros(2, TAIL_TOPK_MAX_ELEMENTS + 1), (1.0, 99.0)) is None


@pytest.mark.parametrize("clip", ["percentile", "minmax"])
@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_weights_rows_matches_reference(bits, clip):
    grads = compare_lists(lambda ws: quantize_weights_rows(ws, bits, clip),
                          lambda w: ref_weight(w, bits, clip), weights_with_ties(3))
    flat = grads[0].view(-1)
    if clip == "percentile":  # the tied weights sit on the bounds: half the gradient (autograd's min/max)
        g = torch.randn(weights_with_ties(3)[0].shape, generator=torch.Generator().manual_seed(1), dtype=DT)
        torch.testing.assert_close(flat[:12], 0.5 * g.view(-1)[:12], rtol=RTOL, atol=0)
    else:  # min/max clip: the outliers are the bounds themselves
        assert grads[1].view(-1)[0] != 0
    # one row, and the module's own (per-layer) path give the same
    w = weights_with_ties(1)[0]
    torch.testing.assert_close(quantize_weights_rows([w, w], bits, clip)[1], DdtbWeightQuantizer(bits, clip)(w),
                               rtol=RTOL, atol=0)


@pytest.mark.parametrize("bits", [2, 3])
def test_max_abs_rows_matches_reference(bits):
    ws = [t.reshape(8, -1) for t in weights_with_ties(3)]

    def fused(ts):
        return list(max_abs_weight_quantize_rows(torch.stack([t.reshape(-1) for t in ts]), bits).unbind())

    compare_lists(fused, lambda t: ref_max_abs(t, bits).reshape(-1), ws)


# -- the gated quantizer against a plain-autograd reference of the gate and the bounds ------------------
def ref_gated(quant: DdtbActQuantizer, bn: torch.nn.BatchNorm2d, x, use_gate: bool):
    """GAP → 2-bit min/max quantizer → ternary conv1 → BN → ReLU → quantizer (STE unless frozen) → conv2 →
    (σ_u, σ_l) = 2·sigmoid(g) scaling (u, l) per image, then the zero-anchored grid."""
    gate = quant.gate

    def act(t, detach):
        lo, hi = t.detach().min(), t.detach().max()
        sigma = 3 / (hi - lo).clamp_min(1e-8)
        q = torch.round(sigma * t.detach()) / sigma
        return q if detach else t + (q - t).detach()

    grouped = x.reshape(x.shape[0], x.shape[1], -1)
    h = act(grouped.detach().mean(2)[:, :, None, None], True)
    h = F.relu(bn(F.conv2d(h, ref_max_abs(gate.conv1.weight, 2))))
    h = act(h, gate.detach_inner)
    logits = F.conv2d(h, ref_max_abs(gate.conv2.weight, 2)).flatten(1)
    if not use_gate:
        return ref_zero_anchored(x, quant.alpha_lower, quant.alpha_upper, quant.bits) + 0 * logits.sum()
    scale = 2.0 * torch.sigmoid(logits)
    lower = (scale[:, 1] * quant.alpha_lower)[:, None, None]
    upper = (scale[:, 0] * quant.alpha_upper)[:, None, None]
    return ref_zero_anchored(grouped, lower, upper, quant.bits).reshape(x.shape)


@pytest.mark.parametrize("frozen", [False, True])
def test_gated_quantizer_matches_reference(frozen):
    torch.manual_seed(0)
    quant = DdtbActQuantizer(2, ActSite("q", 4, False), gate_frozen_first_conv=frozen).double().train()
    quant.is_dynamic = quant.use_gate = quant.initialized = True
    with torch.no_grad():
        quant.alpha_lower.fill_(-3.0)
        quant.alpha_upper.fill_(4.0)
    x = torch.randn(3, 4, 3, 3, dtype=DT) * 4
    x.view(-1)[:5] = -3.0  # ties with l (the first image's σ_l·l differs: outside or inside)
    x.requires_grad_()
    bn = copy.deepcopy(quant.gate.bn)
    ref_quant = copy.deepcopy(quant)
    ref_quant.gate.bn = bn
    xr = x.detach().clone().requires_grad_()
    out, want = quant(x), ref_gated(ref_quant, bn, xr, True)
    torch.testing.assert_close(out, want, rtol=RTOL, atol=0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    params = [x, *quant.parameters()]
    ref_params = [xr, *ref_quant.parameters()]
    got = torch.autograd.grad(out, params, g, allow_unused=True)
    exp = torch.autograd.grad(want, ref_params, g, allow_unused=True)
    names = ["x", *(n for n, _ in quant.named_parameters())]
    for name, a, b in zip(names, got, exp, strict=True):
        assert (a is None) == (b is None) or (a is not None and not a.any()) or (b is not None and not b.any()), name
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-12, msg=name)
    assert got[names.index("alpha_lower")].abs() > 0 and got[names.index("gate.conv2.weight")].abs().sum() > 0


# -- the model: batched (hooks) against the per-layer path ------------------------------------------------
def ddtb_model(blocks: int = 3, dynamic: int = 3, use_gate: bool = True):
    torch.manual_seed(0)
    method = make_method("ddtb", {"dynamic_ratio": 0.5}, Bits(w=2, a=2))
    model = method.quantize(build_model("edsr", 2, n_resblocks=blocks, n_feats=8))
    method._set_quantized(model, True)
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 6, 6) * 255)  # bounds initialised from this batch
    for i, q in enumerate(method.act_quantizers(model).values()):
        q.is_dynamic, q.use_gate = i < dynamic, use_gate
    return method, model


def without_batching(model):
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, DdtbWeightQuantizer) or hasattr(m, "batched"):
            m.batch = None
    for hooks in (ref._forward_pre_hooks, ref._forward_hooks):
        for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), WeightBatch)]:
            del hooks[key]
    return ref


def step(model, x):
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("use_gate", [True, False])
def test_model_batched_equals_per_layer(use_gate):
    _, model = ddtb_model(use_gate=use_gate)
    ref = without_batching(model)
    seen = []

    def spy(layer, args, out):  # inside the forward every quantizer holds its row of the batch
        seen.append(layer.weight_quant.batched is not None and layer.weight_quant.batched[0] is layer.weight)

    convs = [m for m in model.modules() if isinstance(getattr(m, "weight_quant", None), DdtbWeightQuantizer)]
    for conv in convs:
        conv.register_forward_hook(spy)
    x = torch.rand(2, 3, 6, 6) * 255
    out, grads = step(model, x)
    ref_out, ref_grads = step(ref, x)
    assert len(seen) == len(convs) == 6 and all(seen)
    torch.testing.assert_close(out, ref_out, rtol=RTOL, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert (g is None) == (ref_grads[name] is None), name  # gates that do not run get no (zero) gradient
        if g is not None:
            torch.testing.assert_close(g, ref_grads[name], rtol=RTOL, atol=1e-7, msg=name)
    # the gates scale the bounds only with use_gate (else their logits feed L_reg, not the output)
    assert (grads["body.0.quant_act1.gate.conv1.weight"] is not None) == use_gate
    assert grads["body.2.quant_act3.gate.conv1.weight"] is None  # not dynamic
    # after the forward nothing is held
    assert all(c.weight_quant.batched is None for c in convs)
    assert all(q.gate.batched is None for q in model.modules() if isinstance(q, DdtbActQuantizer))


def test_batching_cleared_after_a_failed_forward_and_copies_use_their_own_weights():
    _, model = ddtb_model()
    with pytest.raises(RuntimeError):
        model(torch.rand(2, 5, 6, 6))  # wrong channel count
    assert all(m.batched is None for m in model.modules() if isinstance(m, DdtbWeightQuantizer))
    twin = copy.deepcopy(model)
    batch = twin.body[0].body[0].weight_quant.batch  # the copy's own batch, over the copy's layers and hooks
    assert batch is not model.body[0].body[0].weight_quant.batch and batch.layers[0] is twin.body[0].body[0]
    hooks = [h for h in twin._forward_pre_hooks.values() if isinstance(getattr(h, "__self__", None), WeightBatch)]
    assert [h.__self__ for h in hooks] == [batch]
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    x = torch.rand(2, 3, 6, 6) * 255
    with torch.no_grad():
        torch.testing.assert_close(twin(x), without_batching(twin)(x), rtol=RTOL, atol=0)
        torch.testing.assert_close(model(x), without_batching(model)(x), rtol=RTOL, atol=0)
