"""MATLAB bicubic imresize: hand-computed cases, shapes, dtypes, the NumPy reference in shared/data/tools."""

import importlib.util

import numpy as np
import pytest
import torch

from odm_sr.data.imresize import cubic_kernel, imresize, resize_weights


def test_cubic_kernel_values():
    x = torch.tensor([0.0, 0.25, 0.75, 1.0, 1.25, 1.75, 2.0, 2.5], dtype=torch.float64)
    expected = [1.0, 0.8671875, 0.2265625, 0.0, -0.0703125, -0.0234375, 0.0, 0.0]
    torch.testing.assert_close(cubic_kernel(x), torch.tensor(expected, dtype=torch.float64))


def test_hand_computed_1x4_to_1x2():
    # Scale 1/2: h(x) = 0.5 k(0.5 x), output 1 sits at x = 1/0.5 + 0.5(1 - 2) = 1.5 (1-based), so taps
    # -2..5 at distances 3.5 .. -3.5 get 0.5 k(1.75, 1.25, 0.75, 0.25, ...) =
    # [-0.01171875, -0.03515625, 0.11328125, 0.43359375, 0.43359375, 0.11328125, -0.03515625, -0.01171875].
    # Symmetric padding maps taps -2, -1, 0 to pixels 3, 2, 1 and tap 5 to pixel 4, so the coefficients
    # of (x1, x2, x3, x4) are (0.546875, 0.3984375, 0.1015625, -0.046875); output 2 is the mirror image.
    x = torch.tensor([[[10.0, 20.0, 40.0, 80.0]]], dtype=torch.float64)
    out = imresize(x, 0.5)
    assert out.shape == (1, 1, 2)
    c = torch.tensor([0.546875, 0.3984375, 0.1015625, -0.046875], dtype=torch.float64)
    torch.testing.assert_close(out[0, 0, 0], (c * x[0, 0]).sum())
    torch.testing.assert_close(out[0, 0, 1], (c.flip(0) * x[0, 0]).sum())
    torch.testing.assert_close(out[0, 0], torch.tensor([13.75, 61.25], dtype=torch.float64))


def test_weights_are_normalised_and_mirrored():
    for in_len, out_len, scale in [(7, 3, 1 / 3), (10, 40, 4.0), (5, 2, 0.4)]:
        w, idx = resize_weights(in_len, out_len, scale)
        torch.testing.assert_close(w.sum(1), torch.ones(out_len, dtype=torch.float64))
        assert idx.min() >= 0 and idx.max() < in_len


def test_upscale_shape_and_linear_reproduction():
    x = torch.rand(2, 3, 5, 7)
    assert imresize(x, 3).shape == (2, 3, 15, 21)
    assert imresize(x[0], 1 / 2).shape == (3, 3, 4)  # ceil(2.5), ceil(3.5)
    assert imresize(x, out_hw=(9, 4)).shape == (2, 3, 9, 4)
    # Keys' cubic reproduces linear signals: away from the (mirrored) border, the x2 upscale of a ramp
    # equals the ramp sampled at u/2 + 0.25 (1-based).
    ramp = torch.arange(1, 21, dtype=torch.float64).repeat(1, 4, 1)  # (1, 4, 20), value = 1-based index
    up = imresize(ramp, 2)[0, 0]
    u = torch.arange(1, 41, dtype=torch.float64)
    torch.testing.assert_close(up[4:-4], (u / 2 + 0.25)[4:-4])


def test_constant_is_preserved_and_gradients_flow():
    x = torch.full((3, 11, 13), 0.3, requires_grad=True)
    for s in (1 / 4, 1 / 3, 2, 3):
        y = imresize(x, s)
        torch.testing.assert_close(y, torch.full_like(y, 0.3))
    imresize(x, 0.5).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_uint8_in_uint8_out_rounds_each_pass():
    x = (torch.rand(3, 24, 18) * 255).to(torch.uint8)
    y = imresize(x, 1 / 3)
    assert y.dtype == torch.uint8 and y.shape == (3, 8, 6)
    # rounding after each pass stays within one grey level of the unrounded float result
    yf = imresize(x.double(), 1 / 3)
    assert (y.double() - yf).abs().max() <= 1.0
    with pytest.raises(TypeError):
        imresize(x.int(), 0.5)


def test_float_scale_tolerance_in_output_size():
    # 321 * (1/3) is 106.99999999999999 in floating point; MATLAB's ceil must still give 107
    assert imresize(torch.zeros(1, 321, 6), 1 / 3).shape == (1, 107, 2)


def _load_reference(data_root):
    path = data_root / "tools" / "matlab_imresize.py"
    if not path.is_file():
        pytest.skip(f"reference {path} not found")
    spec = importlib.util.spec_from_file_location("matlab_imresize_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.data
def test_matches_numpy_reference(data_root):
    ref = _load_reference(data_root)
    rng = np.random.default_rng(0)
    img = rng.random((23, 17, 3)) * 255
    for kwargs in ({"scale": 1 / 4}, {"scale": 1 / 3}, {"scale": 2}, {"output_shape": (10, 31)}):
        expected = ref.imresize(img, **kwargs)
        x = torch.from_numpy(img).permute(2, 0, 1)
        got = imresize(x, scale=kwargs.get("scale"), out_hw=kwargs.get("output_shape"))
        np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), expected, atol=1e-9)
    # uint8: both round each pass (the reference with np.round, we half away from zero as MATLAB)
    img8 = (img).astype(np.uint8)
    got8 = imresize(torch.from_numpy(img8).permute(2, 0, 1).contiguous(), 1 / 3).permute(1, 2, 0).numpy()
    assert np.abs(got8.astype(int) - ref.imresize(img8, 1 / 3).astype(int)).max() <= 1
