"""The grid offset l_a of ODM activations, folded exactly (border map), checked on hand-computed cases."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from odm_sr.export.integer import IntegerConv2d, IntegerLinear
from odm_sr.export.runtime import session
from odm_sr.export.spec import ActGrid, WeightCodes


class _One(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def run_onnx(layer: nn.Module, x: torch.Tensor) -> np.ndarray:
    buf = io.BytesIO()
    torch.onnx.export(_One(layer), (x,), buf, dynamo=False, opset_version=17, input_names=["lr"])
    return session(buf.getvalue(), threads=1).run(None, {"lr": x.numpy()})[0]


def conv_layer(codes: torch.Tensor, u_w: float, grid: ActGrid, bias: float = 0.0) -> IntegerConv2d:
    conv = nn.Conv2d(codes.shape[1], codes.shape[0], 3, padding=1)
    nn.init.constant_(conv.bias, bias)
    return IntegerConv2d(conv, WeightCodes("odm", 2, codes.to(torch.int8), u_w), grid)


def test_offset_folds_over_the_valid_taps_only():
    """x = l_a everywhere (code 0), weight codes 1 with u_w = 3 (s_w = 1): y = l_a·(taps inside the image),
    i.e. 4 at a corner, 6 on an edge, 9 inside; zero padding is the value 0, not l_a."""
    grid = ActGrid("odm", 2, (0.5, 3.5))  # s_a = 1, offset 0.5: not a multiple of s_a
    layer = conv_layer(torch.ones(1, 1, 3, 3), 3.0, grid, bias=0.25)
    y = run_onnx(layer, torch.full((1, 1, 3, 4), 0.5))[0, 0]
    expected = 0.5 * np.array([[4, 6, 6, 4], [6, 9, 9, 6], [4, 6, 6, 4]]) + 0.25
    np.testing.assert_array_equal(y, expected)


def test_offset_and_codes_against_a_hand_loop():
    """Random codes and odd weight codes: y[o, i, j] = Σ_{c, taps inside} (l_a + k·s_a)·code·s_w + b."""
    torch.manual_seed(0)
    lower, step, u_w = -0.7, 0.4, 1.5
    grid = ActGrid("odm", 2, (lower, lower + 3 * step))
    codes = torch.randint(0, 2, (2, 3, 3, 3)) * 2 - 1 + torch.randint(0, 2, (2, 3, 3, 3)) * 2 * torch.sign(
        torch.randn(2, 3, 3, 3)).to(torch.int64)  # values in {±1, ±3}
    codes = codes.clamp(-3, 3)
    layer = conv_layer(codes, u_w, grid, bias=0.1)
    k = torch.randint(0, 4, (1, 3, 5, 4)).float()
    x = lower + k * float(grid.step())
    y = run_onnx(layer, x)[0]
    s_w = u_w / 3
    expected = np.zeros((2, 5, 4))
    for o in range(2):
        for i in range(5):
            for j in range(4):
                total = 0.1
                for c in range(3):
                    for di in range(3):
                        for dj in range(3):
                            ii, jj = i + di - 1, j + dj - 1
                            if 0 <= ii < 5 and 0 <= jj < 4:
                                total += (lower + float(k[0, c, ii, jj]) * step) * int(codes[o, c, di, dj]) * s_w
                expected[o, i, j] = total
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)


def test_pams_zero_point_pads_with_zero():
    """PAMS grid (zero is the code Q): x = 0 gives only the bias, x = α gives α·s_w·(taps inside)."""
    conv = nn.Conv2d(1, 1, 3, padding=1)
    nn.init.constant_(conv.bias, 0.0)
    layer = IntegerConv2d(conv, WeightCodes("pams", 2, torch.ones(1, 1, 3, 3, dtype=torch.int8), 2.0),
                          ActGrid("pams", 2, (1.5,)))
    np.testing.assert_array_equal(run_onnx(layer, torch.zeros(1, 1, 3, 3)), np.zeros((1, 1, 3, 3)))
    y = run_onnx(layer, torch.full((1, 1, 3, 3), 1.5))[0, 0]
    np.testing.assert_array_equal(y, 1.5 * 2.0 * np.array([[4, 6, 4], [6, 9, 6], [4, 6, 4]]))


@pytest.mark.parametrize("kind", ["odm", "pams"])
def test_linear_offset_is_one_constant_per_output(kind):
    """MatMulInteger: y = s_a·s_w·Σ k·code + l_a·s_w·Σ code + b (no padding, so no border)."""
    grid = ActGrid("odm", 4, (-0.3, 1.2)) if kind == "odm" else ActGrid("pams", 4, (1.2,))
    linear = nn.Linear(5, 3)
    codes = torch.randint(-7, 8, (3, 5)) * (2 if kind == "odm" else 1) + (1 if kind == "odm" else 0)
    codes = codes.clamp(-15, 15)
    layer = IntegerLinear(linear, WeightCodes(kind, 4, codes.to(torch.int8), 0.9), grid)
    x = torch.rand(2, 7, 5) * 2 - 0.5
    y = run_onnx(layer, x)
    values = grid.dequantize(grid.codes(x))  # offset + k·s_a, float64
    expected = values @ (codes.double() * WeightCodes(kind, 4, codes, 0.9).scale).t() + linear.bias.double()
    np.testing.assert_allclose(y, expected.float().detach().numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("kind", "padding"), [("odm", 1), ("odm", 0), ("pams", 1)])
def test_ort_layer_equals_the_exact_value_bit_for_bit(kind, padding):
    """ConvInteger's int32 sum is exact; the rescale, offset fold and bias must not add float32 round-off:
    ORT gives float32(exact y) (to one ulp: float64 round-off), bit-identical to the layer's PyTorch forward
    (``odm-sr-eval eval.exact=true``), which computes the same float64 ops in the same order.
    A float32 rescale was off by one ulp on ~40 % of these outputs: enough to flip a 2-bit code of the next
    quantizer where an activation lies that close to a rounding boundary (bench/README.md, B100)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=padding)
    if kind == "odm":
        codes, grid = torch.randint(0, 4, (8, 16, 3, 3)) * 2 - 3, ActGrid("odm", 2, (-0.37, 1.91))
    else:
        codes, grid = torch.randint(-1, 2, (8, 16, 3, 3)), ActGrid("pams", 2, (0.77,))
    layer = IntegerConv2d(conv, WeightCodes(kind, 2, codes.to(torch.int8), 0.123), grid)
    x = torch.randn(1, 16, 40, 33)
    y = run_onnx(layer, x)
    np.testing.assert_array_equal(y, layer.reference(x).numpy())
    exact = nn.functional.conv2d(grid.dequantize(grid.codes(x)), codes.double() * layer.codes.scale,
                                 conv.bias.detach().double(), padding=padding)
    np.testing.assert_array_max_ulp(y, exact.float().numpy(), maxulp=1)  # float64 round-off of another order


@pytest.mark.parametrize("kind", ["odm", "pams"])
def test_ort_linear_equals_the_exact_value_bit_for_bit(kind):
    torch.manual_seed(1)
    grid = ActGrid("odm", 4, (-0.3, 1.2)) if kind == "odm" else ActGrid("pams", 4, (1.2,))
    linear = nn.Linear(24, 16)
    codes = torch.randint(-7, 8, (16, 24)) * (2 if kind == "odm" else 1) + (1 if kind == "odm" else 0)
    layer = IntegerLinear(linear, WeightCodes(kind, 4, codes.clamp(-15, 15).to(torch.int8), 0.9), grid)
    x = torch.rand(2, 50, 24) * 2 - 0.5
    y = run_onnx(layer, x)
    np.testing.assert_array_equal(y, layer.reference(x).detach().numpy())
    exact = grid.dequantize(grid.codes(x)) @ layer.weight_values().t() + linear.bias.double()
    np.testing.assert_array_max_ulp(y, exact.float().detach().numpy(), maxulp=1)


def test_fp_conv_before_the_quantizers_is_exact_bit_for_bit():
    """EDSR's head conv (FP) feeds every block's skip: ORT's float32 Conv (MLAS) and PyTorch's (oneDNN) sum in
    different orders, a few ulps apart, enough to flip a 2-bit code downstream. ``ExactConv2d`` (exact im2col,
    float64 MatMul) gives float32(exact) in both."""
    from odm_sr.export.integer import ExactConv2d

    torch.manual_seed(2)
    conv = nn.Conv2d(3, 16, 3, padding=1)
    layer = ExactConv2d(conv)
    x = torch.rand(1, 3, 37, 29) * 255 - 120
    y = run_onnx(layer, x)
    np.testing.assert_array_equal(y, layer.reference(x).numpy())
    exact = nn.functional.conv2d(x.double(), conv.weight.detach().double(), conv.bias.detach().double(), padding=1)
    np.testing.assert_array_max_ulp(y, exact.float().numpy(), maxulp=1)
    with torch.no_grad():
        np.testing.assert_array_equal(layer.reference(x).numpy(), exact.float().numpy())
