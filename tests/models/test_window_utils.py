"""Window padding, relative-position indices and attention masks shared by SwinIR and HAT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from odm_sr.models import build_model, pad_to_multiple
from odm_sr.models.windows import relative_position_index, shifted_window_mask


def test_reflect_pad_matches_official_check_image_size() -> None:
    x = torch.rand(1, 3, 13, 21)
    expected = F.pad(x, (0, 3, 0, 3), "reflect")  # SwinIR check_image_size / HAT pre_process
    assert torch.equal(pad_to_multiple(x, 8, "reflect"), expected)
    assert torch.equal(pad_to_multiple(expected, 8, "reflect"), expected)  # already a multiple


@pytest.mark.parametrize("height,width", [(13, 21), (16, 8)])
def test_mirror_pad_matches_main_test_swinir(height: int, width: int) -> None:
    window = 8
    x = torch.rand(1, 3, height, width)
    h_pad = (height // window + 1) * window - height  # main_test_swinir.py: always pads
    w_pad = (width // window + 1) * window - width
    expected = torch.cat([x, torch.flip(x, [2])], 2)[:, :, :height + h_pad, :]
    expected = torch.cat([expected, torch.flip(expected, [3])], 3)[:, :, :, :width + w_pad]
    assert torch.equal(pad_to_multiple(x, window, "mirror"), expected)


@pytest.mark.parametrize("mode", ["reflect", "mirror"])
def test_padding_wider_than_the_image(mode: str) -> None:
    x = torch.rand(1, 3, 3, 1)
    padded = pad_to_multiple(x, 16, mode)
    assert padded.shape == (1, 3, 16, 16)
    assert torch.equal(padded[:, :, :3, :1], x)


def test_relative_position_index_ranges() -> None:
    square = relative_position_index(8)
    assert square.shape == (64, 64) and int(square.min()) == 0 and int(square.max()) == 15 ** 2 - 1
    assert torch.all(square.diagonal() == 7 * 15 + 7)  # zero offset sits in the middle of the table
    overlap = relative_position_index(16, 24)  # HAT's OCA index: negative entries wrap (official)
    assert overlap.shape == (256, 576) and len(torch.unique(overlap % 39 ** 2)) == 39 ** 2


def test_shifted_window_mask_regions() -> None:
    mask = shifted_window_mask(16, 16, 8, 4)
    assert mask.shape == (4, 64, 64)
    assert torch.all(mask[0] == 0)  # the top-left window is not cut by the shift
    assert set(mask[3].unique().tolist()) == {-100.0, 0.0}


def test_stored_mask_and_recomputed_mask_agree() -> None:
    torch.manual_seed(0)
    model = build_model("swinir_light", 2, embed_dim=12, depths=(2,), num_heads=(2,), img_size=16).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        stored = model(x)  # input size == img_size: uses the attn_mask buffers
        for block in model.layers[0].residual_group.blocks:
            block.input_resolution = (-1, -1)  # force the recomputation path
        recomputed = model(x)
    assert torch.equal(stored, recomputed)


def test_padding_is_cropped_from_the_output() -> None:
    model = build_model("swinir_light", 3, embed_dim=12, depths=(2,), num_heads=(2,), img_size=16,
                        pad_mode="mirror").eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 5, 9)).shape == (1, 3, 15, 27)


def _swinir_mirror_by_hand(model, lr: torch.Tensor, window: int = 8) -> torch.Tensor:
    """main_test_swinir.py: pad by flipped copies (always, a full window on a multiple), run, crop."""
    h, w = lr.shape[-2:]
    padded = torch.cat([lr, torch.flip(lr, [2])], 2)[:, :, :(h // window + 1) * window, :]
    padded = torch.cat([padded, torch.flip(padded, [3])], 3)[:, :, :, :(w // window + 1) * window]
    with torch.no_grad():
        return model(padded)[..., :h * model.scale, :w * model.scale]


def test_evaluation_pads_as_the_official_test_scripts() -> None:
    from odm_sr.evaluation import eval_pad_mode, network_upscale

    torch.manual_seed(0)
    swinir = build_model("swinir_light", 2, embed_dim=12, depths=(2,), num_heads=(2,), img_size=16).eval()
    hat = build_model("hat_s", 2, embed_dim=12, depths=(1,), num_heads=(2,), img_size=16, compress_ratio=3,
                      squeeze_factor=3).eval()
    edsr = build_model("edsr", 2, n_resblocks=1, n_feats=8)
    assert swinir.pad_mode == "reflect"  # training / forward: network_swinir.py's check_image_size
    assert [eval_pad_mode(m) for m in (swinir, hat, edsr)] == ["mirror", "reflect", None]
    assert eval_pad_mode(swinir, "reflect") == "reflect"
    lr = torch.rand(1, 3, 16, 13)  # H a multiple of the window: mirror still pads a full window, reflect none
    with torch.no_grad():
        official = network_upscale(swinir)(lr)
        reflect = network_upscale(swinir, pad_mode="reflect")(lr)
        assert torch.equal(reflect, swinir(lr))
    assert torch.allclose(official, _swinir_mirror_by_hand(swinir, lr), atol=1e-6)
    assert (official - reflect).abs().max() > 1e-3  # the choice matters for the reported numbers
    assert swinir.pad_mode == "reflect"  # restored after evaluation
    with pytest.raises(ValueError, match="eval.pad_mode='zeros'"):
        network_upscale(swinir, pad_mode="zeros")


def test_pad_to_multiple_modes_on_a_5x6_image():
    """(moved from the removed ``inference.pad_to_multiple``, same values) mirror = SwinIR's flip-and-concatenate,
    reflect = ``F.pad(..., 'reflect')``; mirror pads a whole window on a multiple, reflect nothing."""
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(1, 2, 5, 6)
    padded = pad_to_multiple(x, 4, mode="mirror")
    assert padded.shape == (1, 2, 8, 8)
    swinir = torch.cat([x, x.flip(2)], 2)[:, :, :8, :]  # SwinIR: cat([x, flip(x)])[:H + pad]
    swinir = torch.cat([swinir, swinir.flip(3)], 3)[:, :, :, :8]
    torch.testing.assert_close(padded, swinir)
    assert padded[..., :5, :6].equal(x)
    torch.testing.assert_close(pad_to_multiple(x, 4, mode="reflect"),
                               torch.nn.functional.pad(x, (0, 2, 0, 3), mode="reflect"))
    assert pad_to_multiple(x[..., :4, :4], 4).shape[-2:] == (4, 4)
    assert pad_to_multiple(x[..., :4, :4], 4, "mirror").shape[-2:] == (8, 8)
    with pytest.raises(ValueError, match="pad mode"):
        pad_to_multiple(x, 4, mode="wrap")
