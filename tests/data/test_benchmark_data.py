"""Checks against the real benchmark data (skipped where ../shared/data is absent).

* our MATLAB bicubic reproduces the stored LR files (made by MATLAB imresize on uint8 HR);
* bicubic upscaling of the stored LR scores the published bicubic Y-PSNR/SSIM (e.g. EDSR/VDSR tables).
"""

import numpy as np
import pytest
import torch

from odm_sr.data.imresize import imresize
from odm_sr.data.registry import build_dataset, build_source
from odm_sr.metrics import SRMetrics

pytestmark = pytest.mark.data

SETS = ("Set5", "Set14", "B100")
SCALES = (2, 3, 4)
# Published bicubic (PSNR dB, SSIM), Y channel, border = scale.
PUBLISHED = {
    ("Set5", 2): (33.66, 0.9299),
    ("Set5", 3): (30.39, 0.8682),
    ("Set5", 4): (28.42, 0.8104),
    ("Set14", 2): (30.24, 0.8688),
    ("Set14", 3): (27.55, 0.7742),
    ("Set14", 4): (26.00, 0.7027),
    ("B100", 2): (29.56, 0.8431),
    ("B100", 3): (27.21, 0.7385),
    ("B100", 4): (25.96, 0.6675),
}


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Many small float64 ops: one thread avoids OpenMP spin-waits, 3-8x slower on busy 2-core boxes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def benchmark_pairs(data_root):
    """{(set, scale): [(name, lr uint8 CHW, mod-cropped hr uint8 CHW)]}, decoded once for the module."""
    pairs = {}
    for set_name in SETS:
        for scale in SCALES:
            ds = build_source(set_name, "test", scale, data_root)
            pairs[set_name, scale] = [(ds.names[i], *map(_chw, ds.load_pair(i))) for i in range(len(ds))]
    return pairs


@pytest.mark.parametrize("set_name", SETS)
@pytest.mark.parametrize("scale", SCALES)
def test_imresize_reproduces_stored_lr(benchmark_pairs, set_name, scale):
    maes = []
    for _, lr, hr in benchmark_pairs[set_name, scale]:
        ours = imresize(hr, 1.0 / scale)
        assert ours.shape == lr.shape
        maes.append((ours.double() - lr.double()).abs().mean().item())
    assert np.mean(maes) < 0.05, f"{set_name} x{scale}: mean |LR - imresize(HR)| = {np.mean(maes):.4f}"


@pytest.mark.parametrize("set_name", SETS)
@pytest.mark.parametrize("scale", SCALES)
def test_bicubic_baseline_matches_published(benchmark_pairs, set_name, scale):
    metric = SRMetrics(scale)
    for _, lr, hr in benchmark_pairs[set_name, scale]:
        metric.update(imresize(lr, scale), hr)
    result = dict(zip(("psnr", "ssim", "count"), metric.compute().tolist(), strict=True))
    psnr_pub, ssim_pub = PUBLISHED[set_name, scale]
    assert result["count"] == len(benchmark_pairs[set_name, scale])
    where = f"{set_name} x{scale}"
    assert abs(result["psnr"] - psnr_pub) < 0.02, f"{where}: PSNR {result['psnr']:.4f} vs {psnr_pub}"
    assert abs(result["ssim"] - ssim_pub) < 0.002, f"{where}: SSIM {result['ssim']:.5f} vs {ssim_pub}"


def test_set14_grayscale_bridge_item(data_root):
    ds = build_dataset("set14", "test", 3, data_root)
    assert len(ds) == 14
    item = ds[ds.names.index("img_003")]
    assert item["hr_channels"] == 1 and item["hr"].shape[0] == 1
    assert item["lr"].shape[0] == 3
    torch.testing.assert_close(item["lr"][0], item["lr"][2])
    assert item["hr"].shape[-2:] == tuple(3 * s for s in item["lr"].shape[-2:])


def test_training_sets_are_found(data_root):
    sr291 = build_source("sr291", "train", 4, data_root)
    assert len(sr291) == 291
    assert min(min(sr291.lr_size(i)) for i in range(len(sr291))) >= 78 // 4
    with pytest.raises(FileNotFoundError, match="DIV2K"):
        build_source("div2k", "train", 2, data_root / "no_such_root")
