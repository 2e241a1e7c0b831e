"""Images that are unusual rather than broken (issue 22, items 5, 9, 10, 17): too small to score, stored sideways
with an EXIF orientation, animated, or too large to upscale in one piece."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN, compose_config
from PIL import Image

from odm_sr.data.io import ImageReadError, image_size, read_image
from odm_sr.eval import evaluate
from odm_sr.train import train
from odm_sr.upscale import UpscaleMemoryError, upscale_image, write_upscaled

ORIENTATION = 0x0112
RNG = np.random.default_rng(0)


def _save(path, pixels: np.ndarray, orientation: int | None = None) -> None:
    img = Image.fromarray(pixels)
    if orientation is None:
        img.save(path)
        return
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    img.save(path, exif=exif.tobytes())


def _benchmark(root, name: str, scale: int, hr_hw: tuple[int, int], small: str | None = None,
               orientation: int | None = None) -> dict[str, np.ndarray]:
    """``<root>/benchmark/<name>`` with images a, b (HR, and LR = HR / scale); ``small``: that one 12x12 HR.
    ``orientation``: each HR is stored transposed with that EXIF orientation; returns the upright HRs."""
    hr_dir, lr_dir = root / "benchmark" / name / "HR", root / "benchmark" / name / "LR_bicubic" / f"X{scale}"
    hr_dir.mkdir(parents=True)
    lr_dir.mkdir(parents=True)
    upright = {}
    for stem in ("a", "b"):
        h, w = (12, 12) if stem == small else hr_hw
        upright[stem] = hr = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
        stored = np.ascontiguousarray(np.rot90(hr, k=1)) if orientation == 6 else hr  # 6: shown turned clockwise
        _save(hr_dir / f"{stem}.png", stored, orientation)
        _save(lr_dir / f"{stem}x{scale}.png", RNG.integers(0, 256, (h // scale, w // scale, 3), dtype=np.uint8))
    return upright


# -- 5. images too small for the metrics fail up front, named ----------------------------------------------------
def test_a_test_image_too_small_for_ssim_fails_before_training_naming_it(tmp_path):
    _benchmark(tmp_path / "data", "Set14", 2, (40, 48), small="b")
    overrides = TINY_TRAIN + [f"data.data_root={tmp_path / 'data'}", "data.val=[sample_test]", "data.test=[Set14]"]
    with pytest.raises(ValueError, match=r"Set14/HR/b\.png .*: the 12x12 ground truth is too small to score at x2: "
                                         r".*at least 15x15 \(LR 8x8\)"):
        train(compose_config(overrides, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()  # no training step ran


@pytest.mark.parametrize("scale, need", [(2, 15), (4, 19)])
def test_odm_sr_eval_names_an_image_too_small_for_ssim(scale, need, tmp_path):
    """12x12 at x2: 8x8 are left after the crop (SSIM needs 11x11); at x4 only 4x4 are left."""
    _benchmark(tmp_path / "data", "Set14", scale, (40, 48), small="a")
    cfg = compose_config([f"scale={scale}", f"data.data_root={tmp_path / 'data'}", "data.test=[Set14]"], tmp_path,
                         "eval")
    with pytest.raises(ValueError, match=rf"Set14/HR/a\.png .*too small to score at x{scale}: .*at least "
                                         rf"{need}x{need}"):
        evaluate(cfg)


@pytest.mark.parametrize("side, ok", [(14, False), (16, True)])
def test_the_size_limit_is_that_of_ssim_after_the_crop(side, ok, tmp_path):
    """x2: 16x16 leaves 12x12 after the crop (SSIM: 2x2 windows); 14x14 leaves 10x10, less than one window."""
    _benchmark(tmp_path / "data", "B100", 2, (side, side))
    cfg = compose_config(["scale=2", f"data.data_root={tmp_path / 'data'}", "data.test=[B100]"], tmp_path, "eval")
    if ok:
        assert set(evaluate(cfg)["bicubic"]) == {"B100"}
    else:
        with pytest.raises(ValueError, match="at least 15x15"):
            evaluate(cfg)


# -- 9. EXIF orientation applied on reading ----------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied_on_reading(suffix, tmp_path):
    stored = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    path = tmp_path / f"sideways{suffix}"
    _save(path, stored, orientation=6)  # "rotate 90 degrees clockwise to view" (EXIF 2.3, tag 0x0112)
    pixels, _ = read_image(path)
    shown = np.rot90(np.asarray(Image.open(path).convert("RGB")), k=-1)  # the stored pixels turned clockwise
    assert pixels.shape == (10, 6, 3) and image_size(path) == (10, 6)
    np.testing.assert_array_equal(pixels, shown)


def test_a_sideways_hr_pairs_with_its_upright_lr_and_is_scored_upright(tmp_path):
    upright = _benchmark(tmp_path / "data", "Urban100", 2, (40, 48), orientation=6)
    dm = compose_config([f"data.data_root={tmp_path / 'data'}", "data.test=[Urban100]", "model.scale=2"], tmp_path)
    from odm_sr.builders import build_datamodule

    datamodule = build_datamodule(dm)
    datamodule.check_eval_sets()  # old code: "LR must be floor(HR / scale)" (the stored HR is 48x40)
    _, hr = datamodule.test_sets[0].load_pair(0)
    np.testing.assert_array_equal(hr, upright["a"])


def test_upscale_writes_an_upright_image_of_a_sideways_input(tmp_path):
    stored = RNG.integers(0, 256, (5, 8, 3), dtype=np.uint8)
    _save(tmp_path / "in.png", stored, orientation=6)
    net = torch.nn.Upsample(scale_factor=2, mode="nearest")
    net.scale = 2
    upscale_image(net, tmp_path / "in.png", tmp_path / "out.png")
    out = np.asarray(Image.open(tmp_path / "out.png"))
    upright = np.rot90(stored, k=-1)
    np.testing.assert_array_equal(out, upright.repeat(2, axis=0).repeat(2, axis=1))


# -- 10. animated images are refused --------------------------------------------------------------------------------
def test_an_animated_gif_is_refused_and_a_still_one_read(tmp_path):
    frames = [Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "still.gif")
    with pytest.raises(ImageReadError, match=r"anim\.gif: an animated GIF of 3 frames; .*save the frame"):
        read_image(tmp_path / "anim.gif")
    net = torch.nn.Upsample(scale_factor=2, mode="nearest")
    net.scale = 2
    with pytest.raises(ImageReadError, match="animated GIF"):
        upscale_image(net, tmp_path / "anim.gif", tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()
    assert read_image(tmp_path / "still.gif")[0].shape == (8, 8, 3)


# -- 17. running out of memory suggests --tile ------------------------------------------------------------------
class _Greedy(torch.nn.Module):
    """A x2 network whose whole-image forward asks the CPU allocator for more than any machine has (a real
    allocator error, as a 2000x2000 image under a memory limit gives); tiles of at most 16 pixels run."""

    scale = 2

    def forward(self, x):
        if max(x.shape[-2:]) > 16:
            torch.empty(1 << 52, dtype=torch.uint8)
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")


def test_running_out_of_memory_suggests_tiles_and_tiles_work(tmp_path):
    _save(tmp_path / "big.png", RNG.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    with pytest.raises(UpscaleMemoryError, match=r"upscaling .*big\.png \(40x30 LR pixels\) ran out of memory: run "
                                                 r"it in tiles with --tile 256 .*DefaultCPUAllocator"):
        upscale_image(_Greedy(), tmp_path / "big.png", tmp_path / "out.png")
    with pytest.raises(UpscaleMemoryError, match=r"use a smaller --tile than 20"):
        upscale_image(_Greedy(), tmp_path / "big.png", tmp_path / "out.png", tile=20, overlap=0)
    upscale_image(_Greedy(), tmp_path / "big.png", tmp_path / "out.png", tile=8, overlap=0)
    assert np.asarray(Image.open(tmp_path / "out.png")).shape == (80, 60, 3)


def test_other_errors_of_the_network_are_not_called_out_of_memory(tmp_path):
    _save(tmp_path / "in.png", RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8))

    def broken(out):
        def run(lr):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        return run

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as err:
        write_upscaled(broken, 2, tmp_path / "in.png", tmp_path / "out.png")
    assert not isinstance(err.value, UpscaleMemoryError)
