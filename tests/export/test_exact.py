"""Exact FP parts of SwinIR's integer model (``export.exact``): float64 LayerNorm, attention and GELU, equal in
ONNX Runtime and in PyTorch (``odm-sr-eval eval.exact=true``) at every integer layer's input."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_network
from torch import nn

from odm_sr.evaluation import eval_pad_mode, window_padding
from odm_sr.export.exact import ExactGELU, ExactLayerNorm, erf64
from odm_sr.export.integer import _IntegerLayer, extract_spec, integer_model
from odm_sr.export.onnx_graph import code_chains, to_onnx
from odm_sr.export.runtime import session


def test_erf64_equals_torch_erf_in_float64():
    z = torch.linspace(-9, 9, 400_001, dtype=torch.float64)
    assert (erf64(z) - torch.erf(z)).abs().max() <= 3e-16
    assert erf64(torch.tensor([0.0], dtype=torch.float64)).item() == 0.0
    assert erf64(torch.tensor([7.0, -30.0], dtype=torch.float64)).tolist() == [1.0, -1.0]


def test_exact_gelu_is_the_float64_gelu_rounded_once():
    """float32(GELU64(x)) bit for bit where GELU is not a cancellation (1 + erf ≈ 0, below x ≈ −3.7, where
    float64 GELU itself has only absolute accuracy; the largest difference there is 1e-14)."""
    x = torch.linspace(-3.7, 12, 1_000_001, dtype=torch.float64).float()
    ref = nn.functional.gelu(x.double()).float()
    np.testing.assert_array_equal(ExactGELU()(x).numpy(), ref.numpy())
    tail = torch.linspace(-12, -3.7, 100_001)
    np.testing.assert_allclose(ExactGELU()(tail).numpy(), nn.functional.gelu(tail.double()).numpy(),
                               rtol=6e-8, atol=1e-14)  # float32 rounding + the float64 absolute error
    assert ExactGELU()(torch.tensor([-12.0])).item() == 0.0  # not a positive round-off of 1 + erf
    assert (ExactGELU()(x) != nn.functional.gelu(x)).any()  # float32 GELU is not the exact value everywhere


def test_exact_layer_norm_is_the_float64_layer_norm_rounded_once():
    torch.manual_seed(3)
    norm = nn.LayerNorm(24)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.2)
    x = torch.randn(64, 50, 24) * 3 + 0.7
    with torch.no_grad():
        ref = nn.functional.layer_norm(x.double(), (24,), norm.weight.double(), norm.bias.double(), norm.eps)
        y = ExactLayerNorm(norm)(x)
    np.testing.assert_array_max_ulp(y.numpy(), ref.float().numpy(), maxulp=1)  # float64 round-off of another order
    assert (y == ref.float()).double().mean() > 0.9999
    by_hand = (x.double() - x.double().mean(-1, keepdim=True)) / torch.sqrt(x.double().var(-1, unbiased=False,
                                                                                            keepdim=True) + 1e-5)
    expected = (by_hand * norm.weight.detach().double() + norm.bias.detach().double()).numpy()
    np.testing.assert_allclose(y.numpy(), expected, rtol=0, atol=1e-6)


def _ort_layer_inputs(graph: bytes, x: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
    """ORT output and the float input of every integer layer's code chain (Max → … → Cast uint8), in graph
    order (= forward order)."""
    model = onnx.load_from_string(graph)
    for _, name in code_chains(model):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    out = session(model.SerializeToString(), threads=1).run(None, {"lr": x.numpy()})
    return out[0], out[1:]


def _torch_layer_inputs(int_model, x, pad_mode=None):
    """The integer layers of ``int_model``, the float input each sees in the exact PyTorch forward of ``x``
    (window padding ``pad_mode``), and the output."""
    torch_inputs = []
    layers = [m for m in int_model.modules() if isinstance(m, _IntegerLayer) and m.grid is not None]
    for layer in layers:
        layer.register_forward_hook(lambda _m, inputs, _o: torch_inputs.append(inputs[0].detach().clone()))
    with torch.no_grad(), window_padding(int_model, pad_mode):
        ref = int_model(x).numpy()
    return layers, torch_inputs, ref


def test_tiny_swinir_ort_equals_the_exact_forward_at_every_integer_layer_input(tmp_path):
    """Every quantizer of the integer graph sees the same float32 values, bit for bit, as the PyTorch exact
    forward (LayerNorm → qkv, attention → proj, LayerNorm → fc1, GELU → fc2, residual stream → RSTB conv;
    the shifted block with its mask). With float32 LayerNorm/softmax/GELU/matmuls (before this module) 3-74 %
    of these inputs differed by an ulp or more. The output (float32 convs after the body, no quantizer) agrees
    to float32 round-off."""
    net, _ = tiny_network("swinir", "odm", 2, tmp_path)
    int_model = integer_model(net, extract_spec(net))
    x = torch.rand(1, 3, 13, 11)
    y, ort_inputs = _ort_layer_inputs(to_onnx(int_model, (13, 11)), x)
    layers, torch_inputs, ref = _torch_layer_inputs(int_model, x, eval_pad_mode(int_model, "official"))
    assert len(ort_inputs) == len(torch_inputs) == len(layers) == 9  # 2 blocks x (qkv, proj, fc1, fc2) + conv
    for a, b in zip(ort_inputs, torch_inputs, strict=True):
        np.testing.assert_array_equal(a.reshape(b.shape), b.numpy())
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5)
    codes = [layer.grid.codes(t) for layer, t in zip(layers, torch_inputs, strict=True)]
    assert all(len(torch.unique(k)) > 1 for k in codes)  # the inputs span several codes (not all clipped)


def test_swinir_integer_model_has_the_exact_modules(tmp_path):
    net, _ = tiny_network("swinir", "odm", 2, tmp_path)
    int_model = integer_model(net, extract_spec(net))
    kinds = {name: type(m).__name__ for name, m in int_model.named_modules()}
    assert kinds["conv_first"] == "ExactConv2d" and kinds["patch_embed.norm"] == "ExactLayerNorm"
    block = "layers.0.residual_group.blocks.1"
    assert kinds[f"{block}.norm1"] == kinds[f"{block}.norm2"] == "ExactLayerNorm"
    assert kinds[f"{block}.attn"] == "ExactWindowAttention" and kinds[f"{block}.mlp.act"] == "ExactGELU"
    assert kinds["norm"] == "LayerNorm"  # feeds no quantizer: float32
    assert math.isclose(int_model.get_submodule(f"{block}.attn").scale, (12 // 2) ** -0.5)


@pytest.mark.parametrize("backbone", ["imdn", "pan"])
@pytest.mark.parametrize("method", ["odm", "pams"])
def test_imdn_pan_ort_equals_the_exact_forward_at_every_integer_layer_input(backbone, method, tmp_path):
    """IMDN's channel attention (mean/std pooling, 1×1 convs, sigmoid) feeds ``c5``'s quantizer and PAN's pixel
    attention gate (1×1 conv, sigmoid, product) feeds ``k4``'s: in float64 (``ExactCCA``, ``ExactPAConv``)
    every integer layer input is bit-identical in ORT and the exact PyTorch forward (in float32, 23-47 % of
    the ``c5``/``k4`` inputs differed by an ulp or more)."""
    from odm_sr.export.exact import ExactCCA, ExactPAConv

    net, _ = tiny_network(backbone, method, 2, tmp_path)
    int_model = integer_model(net, extract_spec(net))
    exact = ExactCCA if backbone == "imdn" else ExactPAConv
    assert sum(isinstance(m, exact) for m in int_model.modules()) == 2  # one per block
    x = torch.rand(1, 3, 13, 11)
    y, ort_inputs = _ort_layer_inputs(to_onnx(int_model, (13, 11)), x)
    layers, torch_inputs, ref = _torch_layer_inputs(int_model, x)
    assert len(ort_inputs) == len(torch_inputs) == len(layers) == (10 if backbone == "imdn" else 12)
    for a, b in zip(ort_inputs, torch_inputs, strict=True):
        np.testing.assert_array_equal(a.reshape(b.shape), b.numpy())
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5)
