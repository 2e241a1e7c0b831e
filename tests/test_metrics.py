"""PSNR/SSIM (MATLAB convention): hand-computed cases and scikit-image references."""

import math

import numpy as np
import pytest
import torch
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from odm_sr.metrics import SRMetrics, evaluate_pair, psnr, rgb_to_y, ssim, to_uint8


def _random_pair(seed=0, shape=(3, 40, 52), noise=12.0):
    g = torch.Generator().manual_seed(seed)
    hr = torch.randint(0, 256, shape, generator=g, dtype=torch.int64)
    # smooth the truth a little so SSIM is not near zero
    hr = torch.nn.functional.avg_pool2d(hr[None].double(), 3, 1, 1)[0].round().to(torch.uint8)
    sr = (hr.double() + noise * torch.randn(shape, generator=g, dtype=torch.float64)).round().clamp(0, 255)
    return sr.to(torch.uint8), hr


def test_to_uint8_scales_rounds_and_clamps():
    x = torch.tensor([-0.2, 0.0, 0.4 / 255, 1.4 / 255, 100.6 / 255, 1.0, 1.3])
    assert to_uint8(x).tolist() == [0, 0, 0, 1, 101, 255, 255]
    assert to_uint8(torch.tensor([12.4, 12.6, 300.0]), pixel_range=255).tolist() == [12, 13, 255]
    assert to_uint8(np.array([0.5])).dtype == torch.uint8
    sr, hr = _random_pair()
    assert psnr(sr[None], hr[None], 2) == psnr(sr, hr, 2)


def test_rgb_to_y_matches_matlab_formula_and_skimage():
    img = torch.tensor([[[0, 255, 10]], [[0, 255, 200]], [[0, 255, 30]]], dtype=torch.uint8)  # (3, 1, 3)
    y = rgb_to_y(img)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y[0, :2], torch.tensor([16.0, 235.0], dtype=torch.float64))
    expected = 16 + (65.481 * 10 + 128.553 * 200 + 24.966 * 30) / 255
    assert y[0, 2].item() == pytest.approx(expected, abs=1e-12)
    sr, _ = _random_pair()
    ref = rgb2ycbcr(sr.permute(1, 2, 0).numpy())[..., 0]  # skimage: same BT.601 16-235 formula
    np.testing.assert_allclose(rgb_to_y(sr).numpy(), ref, atol=1e-9)


def test_psnr_matches_skimage_on_y_channel():
    sr, hr = _random_pair()
    border = 3
    ys, yh = rgb_to_y(sr).numpy(), rgb_to_y(hr).numpy()
    ref = peak_signal_noise_ratio(yh[3:-3, 3:-3], ys[3:-3, 3:-3], data_range=255)
    assert psnr(sr, hr, border) == pytest.approx(ref, abs=1e-10)


def test_ssim_matches_skimage_gaussian_valid_region():
    sr, hr = _random_pair(seed=1)
    border = 2
    ys, yh = (rgb_to_y(t)[border:-border, border:-border].numpy() for t in (sr, hr))
    _, smap = structural_similarity(
        yh, ys, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, full=True
    )
    # skimage pads (mode 'reflect'); dropping 5 px (the 11x11 window radius) leaves Wang's valid region
    ref = smap[5:-5, 5:-5].mean()
    assert ssim(sr, hr, border) == pytest.approx(ref, abs=1e-10)
    # and the padded mean differs, so the valid-region convention matters
    assert abs(smap.mean() - ref) > 1e-6


def test_hand_computed_constant_images():
    # gray (1-channel) images are compared directly, no Y transform
    hr = torch.full((1, 20, 20), 100, dtype=torch.uint8)
    sr = torch.full((1, 20, 20), 105, dtype=torch.uint8)
    assert psnr(sr, hr, border=2) == pytest.approx(10 * math.log10(255**2 / 25))
    # constant images: sigma = 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 255)^2
    c1 = (0.01 * 255) ** 2
    assert ssim(sr, hr, border=2) == pytest.approx((2 * 100 * 105 + c1) / (100**2 + 105**2 + c1), abs=1e-12)
    # RGB black vs white: Y = 16 vs 235
    black = torch.zeros(3, 16, 16, dtype=torch.uint8)
    white = torch.full((3, 16, 16), 255, dtype=torch.uint8)
    assert psnr(white, black, border=1) == pytest.approx(20 * math.log10(255 / 219))
    assert psnr(hr, hr, border=0) == math.inf
    assert ssim(hr, hr, border=0) == pytest.approx(1.0)


def test_gray_truth_with_rgb_output_uses_rounded_channel_mean():
    hr = torch.full((1, 14, 14), 11, dtype=torch.uint8)
    sr = torch.stack([torch.full((14, 14), v, dtype=torch.uint8) for v in (10, 11, 13)])  # mean 11.33 -> 11
    assert psnr(sr, hr, border=1) == math.inf
    sr2 = torch.stack([torch.full((14, 14), v, dtype=torch.uint8) for v in (10, 12, 13)])  # mean 11.67 -> 12
    assert psnr(sr2, hr, border=1) == pytest.approx(10 * math.log10(255**2))


def test_border_is_cropped():
    hr = torch.zeros(1, 20, 20, dtype=torch.uint8)
    sr = hr.clone()
    sr[0, :2] = 200  # only inside a border of 2
    assert psnr(sr, hr, border=2) == math.inf
    assert psnr(sr, hr, border=1) < 30


def test_input_validation():
    sr, hr = _random_pair()
    with pytest.raises(TypeError, match="to_uint8"):
        psnr(sr.float(), hr, 2)
    with pytest.raises(ValueError, match="differ"):
        psnr(sr[:, :-1], hr, 2)
    with pytest.raises(ValueError, match="SSIM needs"):
        ssim(sr[:, :12, :12], hr[:, :12, :12], 2)


def test_evaluate_pair_and_metric_average_per_image():
    metric = SRMetrics(scale=2)
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' own warning
        empty = metric.compute().tolist()
    assert math.isnan(empty[0]) and math.isnan(empty[1]) and empty[2] == 0
    pairs = [_random_pair(seed=s, noise=n) for s, n in ((0, 4.0), (1, 20.0))]
    values = [evaluate_pair(sr, hr, scale=2) for sr, hr in pairs]
    assert values[0] == (psnr(*pairs[0], 2), ssim(*pairs[0], 2))
    for sr, hr in pairs:
        metric.update(sr, hr)
    # mean of per-image PSNR, not PSNR of the pooled MSE
    got = metric.compute().tolist()
    assert got[2] == 2
    assert got[0] == pytest.approx((values[0][0] + values[1][0]) / 2, abs=1e-12)
    assert got[1] == pytest.approx((values[0][1] + values[1][1]) / 2, abs=1e-12)
    pooled = 10 * math.log10(255**2 / ((10 ** (-values[0][0] / 10) + 10 ** (-values[1][0] / 10)) / 2 * 255**2))
    assert abs(got[0] - pooled) > 0.1
    # a batch of two is the two single updates; weight 0 leaves an image out, weight per image
    batched = SRMetrics(scale=2)
    batched.update(torch.stack([pairs[0][0], pairs[1][0]]), torch.stack([pairs[0][1], pairs[1][1]]))
    assert batched.compute().tolist() == pytest.approx(got, abs=1e-12)
    batched.update(pairs[1][0], pairs[1][1], weight=0)
    batched.update(torch.stack([pairs[0][0], pairs[1][0]]), torch.stack([pairs[0][1], pairs[1][1]]),
                   weight=torch.tensor([0.0, 1.0]))
    want = [(values[0][k] + 2 * values[1][k]) / 3 for k in (0, 1)]
    assert batched.compute().tolist() == pytest.approx([*want, 3], abs=1e-12)
    # an identical pair: inf PSNR counted, and an uncounted one adds nothing (not nan)
    perfect = SRMetrics(scale=2)
    perfect.update(pairs[0][1], pairs[0][1], weight=0)
    perfect.update(*pairs[0])
    assert perfect.compute().tolist() == pytest.approx([*values[0], 1], abs=1e-12)
    perfect.update(pairs[0][1], pairs[0][1])
    assert perfect.compute().tolist()[0] == math.inf
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute().tolist()[2] == 0


def test_metric_planes_stay_on_the_device_of_the_output():
    """PSNR/SSIM are computed where the network's output is (issue 14: not copied to the CPU); the ``meta``
    device stands in for a GPU, and the HR image follows the output there."""
    from odm_sr.metrics import _compare_channels

    sr = torch.zeros(3, 16, 16, dtype=torch.uint8, device="meta")
    hr = torch.zeros(3, 16, 16, dtype=torch.uint8)
    planes = _compare_channels(sr, hr, border=2)
    assert [p.device for p in planes] == [torch.device("meta")] * 2 and planes[0].shape == (12, 12)


def test_gray_truth_as_rgb_compares_y_of_the_replica():
    """gray="rgb": the gray truth is replicated to RGB and both sides go through Y, so a constant difference d
    shrinks to d·(65.481 + 128.553 + 24.966)/255 in Y (IMDN's / PAN's scripts); "channel" compares it as is."""
    hr = torch.full((1, 16, 16), 100, dtype=torch.uint8)
    sr = torch.full((3, 16, 16), 110, dtype=torch.uint8)
    y_diff = 10 * (65.481 + 128.553 + 24.966) / 255
    assert psnr(sr, hr, 2) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-12)
    assert psnr(sr, hr, 2, gray="rgb") == pytest.approx(10 * math.log10(255**2 / y_diff**2), abs=1e-9)
    m = SRMetrics(scale=2, gray="rgb")
    m.update(sr, hr)
    assert m.compute()[0].item() == pytest.approx(10 * math.log10(255**2 / y_diff**2), abs=1e-9)
    rgb_hr = hr.expand(3, -1, -1)
    assert evaluate_pair(sr, hr, 2, gray="rgb") == evaluate_pair(sr, rgb_hr, 2)  # RGB truth: unchanged by the mode
    with pytest.raises(ValueError, match="gray='y'"):
        SRMetrics(scale=2, gray="y")
