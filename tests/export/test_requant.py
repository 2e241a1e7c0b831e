"""Requantizing ``QLinearConv`` (``export.requant``): the codes it gives equal the reference's bit for bit."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_network
from torch import nn

from odm_sr.export.integer import IntegerConv2d
from odm_sr.export.requant import RequantPair, border_masks, fit
from odm_sr.export.runtime import session
from odm_sr.export.spec import ActGrid, WeightCodes


def make_layer(kind: str, bits: int, grid: ActGrid, c_in: int, c_out: int, seed: int) -> IntegerConv2d:
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1)
    with torch.no_grad():
        conv.bias.copy_(torch.randn(c_out, generator=gen) * 0.3)
    n = 2 ** bits - 1
    if kind == "odm":  # odd codes −n … n
        codes = torch.randint(0, n + 1, (c_out, c_in, 3, 3), generator=gen) * 2 - n
    else:
        q = 2 ** (bits - 1) - 1
        codes = torch.randint(-q, q + 1, (c_out, c_in, 3, 3), generator=gen)
    return IntegerConv2d(conv, WeightCodes(kind, bits, codes.to(torch.int8), 0.4), grid)


def pair(kind: str, bits: int, seed: int = 0) -> RequantPair:
    if kind == "odm":  # input offset not a multiple of the step (border fold), output grid from 0 (after ReLU)
        g_in, g_out = ActGrid("odm", bits, (-0.37, 1.91)), ActGrid("odm", bits, (0.0, 2.3))
    else:
        g_in, g_out = ActGrid("pams", bits, (1.3,)), ActGrid("pams", bits, (2.1,))
    first = make_layer(kind, bits, g_in, 16, 12, seed)
    second = make_layer(kind, bits, g_out, 12, 8, seed + 1)
    req = fit(first, nn.ReLU(), g_out)
    assert req is not None, "the rule refused a 2/4-bit 3x3 layer"
    return RequantPair(first, nn.ReLU(), second, req)


class _Codes(nn.Module):
    def __init__(self, layer: RequantPair) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def graph_with_codes(layer: RequantPair, x: torch.Tensor) -> bytes:
    """The pair's graph with the Clip output (the next layer's codes) as a second output."""
    buf = io.BytesIO()
    torch.onnx.export(_Codes(layer), (x,), buf, dynamo=False, opset_version=17, input_names=["lr"],
                      dynamic_axes={"lr": {0: "n", 2: "h", 3: "w"}})
    model = onnx.load_from_string(buf.getvalue())
    qlinear = next(n for n in model.graph.node if n.op_type == "QLinearConv")
    clip = next(n for n in model.graph.node if n.op_type == "Clip" and n.input[0] == qlinear.output[0])
    model.graph.output.append(onnx.helper.make_tensor_value_info(clip.output[0], onnx.TensorProto.UINT8, None))
    return model.SerializeToString()


@pytest.mark.parametrize(("kind", "bits"), [("odm", 2), ("pams", 2), ("pams", 4)])
def test_qlinearconv_codes_equal_the_reference_bit_for_bit(kind, bits):
    """Random inputs of several sizes (every border configuration, 2-pixel sides included): the uint8 codes out
    of QLinearConv + Clip equal the reference's (float64 rescale, ReLU, the quantizer's float32 ops), and the
    pair's output equals its PyTorch forward bit for bit."""
    layer = pair(kind, bits)
    sess = session(graph_with_codes(layer, torch.randn(1, 16, 9, 9)), threads=1)
    gen = torch.Generator().manual_seed(3)
    for h, w in [(9, 9), (2, 7), (5, 2), (2, 2), (31, 17)]:
        x = torch.randn(2, 16, h, w, generator=gen) * 3
        y, codes = sess.run(None, {"lr": x.numpy()})
        with torch.no_grad():
            want = layer.second.grid.codes(torch.relu(layer.first.reference(x)))
            np.testing.assert_array_equal(codes, want.numpy().astype(np.uint8))
            np.testing.assert_array_equal(y, layer.reference(x).numpy())


def test_a_moved_rounding_edge_is_caught():
    """The check fails when a code changes: one channel's int32 bias moved by one code step (K·u sum units)
    changes that channel's codes in ORT, and only that channel's."""
    layer = pair("odm", 2)
    x = torch.randn(1, 16, 12, 10, generator=torch.Generator().manual_seed(4)) * 3
    with torch.no_grad():
        want = layer.second.grid.codes(torch.relu(layer.first.reference(x))).numpy()
    step = round(1.0 / float(layer.req.multiplier[0]))  # = K·u: one code
    layer.req.bias[0] += step
    codes = session(graph_with_codes(layer, x), threads=1).run(None, {"lr": x.numpy()})[1]
    assert (codes[0, 0] != want[0, 0]).any() and np.array_equal(codes[0, 1:], want[0, 1:])


def test_border_masks_of_a_3x3_conv():
    """Zero padding 1: interior, 4 edges, 4 corners (9 taps, 6, 4), for inputs of at least 2 pixels a side."""
    layer = make_layer("odm", 2, ActGrid("odm", 2, (-1.0, 2.0)), 2, 2, 0)
    masks = border_masks(layer)
    assert sorted(int(m.sum()) for m in masks) == [4, 4, 4, 4, 6, 6, 6, 6, 9]
    corner = torch.tensor([[False, False, False], [False, True, True], [False, True, True]])
    assert any(torch.equal(m, corner) for m in masks)


def test_too_narrow_windows_keep_convinteger():
    """ODM W4A4 here: 15 steps per channel leave windows of ~0.03 sum units for the intercept, finer than the
    1/K = 1/8 the int8 weights (codes ±15) allow: refused (the layer keeps ConvInteger + the float64 rescale)."""
    first = make_layer("odm", 4, ActGrid("odm", 4, (-0.37, 1.91)), 16, 12, 0)
    assert fit(first, nn.ReLU(), ActGrid("odm", 4, (0.0, 2.3))) is None


def test_eight_bit_activations_keep_convinteger():
    """8-bit codes times int8 weights can saturate AVX2's 16-bit pair sums: the rule refuses them."""
    grid = ActGrid("odm", 8, (-1.0, 2.0))
    first = make_layer("odm", 2, grid, 4, 4, 0)
    assert fit(first, nn.ReLU(), ActGrid("odm", 8, (0.0, 3.0))) is None


def test_engine_refuses_one_pixel_inputs(tmp_path):
    """A 1-pixel side has border configurations outside the verified ones: the engine says so."""
    from odm_sr.export.integer import extract_spec, integer_model
    from odm_sr.export.runtime import OnnxEngine

    net, _ = tiny_network("edsr", "odm", 2, tmp_path)
    engine = OnnxEngine(integer_model(net, extract_spec(net)), threads=1)
    assert engine(np.random.rand(1, 3, 2, 5).astype(np.float32) * 255).shape == (1, 3, 4, 10)
    with pytest.raises(ValueError, match="at least 2x2"):
        engine(np.zeros((1, 3, 1, 5), np.float32))
