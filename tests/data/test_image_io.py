"""read_image / to_tensor / save_image: modes, 16-bit, truncated and unreadable files."""

import numpy as np
import pytest
import torch
from PIL import Image

from odm_sr.data.io import ImageReadError, image_size, read_image, save_image, to_tensor


def _rgb(h=9, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_and_grayscale(tmp_path):
    rgb = _rgb()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out, is_gray = read_image(tmp_path / "a.png")
    assert not is_gray and out.dtype == np.uint8 and out.shape == (9, 7, 3) and out.flags.writeable
    np.testing.assert_array_equal(out, rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")  # mode L
    gray, is_gray = read_image(tmp_path / "g.png")
    assert is_gray and gray.shape == (9, 7, 1)
    np.testing.assert_array_equal(gray[..., 0], rgb[..., 0])
    as_rgb, is_gray = read_image(tmp_path / "g.png", mode="RGB")
    assert is_gray and as_rgb.shape == (9, 7, 3)
    np.testing.assert_array_equal(as_rgb, np.repeat(rgb[..., :1], 3, axis=2))
    with pytest.raises(ValueError, match="mode"):
        read_image(tmp_path / "g.png", mode="L")
    assert image_size(tmp_path / "a.png") == (9, 7)


def test_rgba_drops_alpha_and_palette_expands(tmp_path):
    rgb = _rgb()
    rgba = np.concatenate([rgb, np.full((9, 7, 1), 17, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png")[0], rgb)  # not composited
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.save(tmp_path / "p.png")
    out, _ = read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(out, np.asarray(pal.convert("RGB")))


def test_16bit_grayscale_is_scaled_to_8bit(tmp_path):
    values = np.array([[0, 257, 65535], [32896, 1000, 65280]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as img:
        assert img.mode.startswith("I")
    out, is_gray = read_image(tmp_path / "d.png")
    assert is_gray
    assert out.shape == (2, 3, 1)
    np.testing.assert_array_equal(out[..., 0], np.round(values / 257.0).astype(np.uint8))


def test_truncated_and_garbage_files_raise(tmp_path):
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image(tmp_path / "cut.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match=r"junk.png.*expected"):
        read_image(tmp_path / "junk.png")
    assert issubclass(ImageReadError, ValueError)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def test_to_tensor_and_save_roundtrip(tmp_path):
    rgb = _rgb()
    t = to_tensor(rgb)
    assert t.shape == (3, 9, 7) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() <= 1
    torch.testing.assert_close(t[:, 2, 3], torch.from_numpy(rgb[2, 3]).float() / 255)
    save_image(t, tmp_path / "out" / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "out" / "rgb.png")[0], rgb)
    save_image(t[:1] * 255, tmp_path / "g.png", pixel_range=255)
    gray, is_gray = read_image(tmp_path / "g.png")
    assert is_gray
    np.testing.assert_array_equal(gray[..., 0], rgb[..., 0])
    save_image(rgb, tmp_path / "u.png")
    np.testing.assert_array_equal(read_image(tmp_path / "u.png")[0], rgb)
