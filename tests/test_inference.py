"""Tiled inference equals whole-image inference when the overlap covers the receptive field."""

import pytest
import torch
from torch import nn

from odm_sr.inference import forward_chopped


def _tiny_sr_net(scale: int) -> nn.Module:
    # three 3x3 convs (radius 3) + a 3x3 conv before the pixel shuffle: receptive-field radius 4 LR px
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 3 * scale * scale, 3, padding=1),
        nn.PixelShuffle(scale),
    ).eval()


@pytest.mark.parametrize("scale", [2, 3])
def test_tiled_equals_whole_image(scale):
    net = _tiny_sr_net(scale)
    lr = torch.rand(2, 3, 23, 29)
    with torch.no_grad():
        whole = net(lr)
        tiled = forward_chopped(net, lr, scale, tile=8, overlap=4)
        too_small = forward_chopped(net, lr, scale, tile=8, overlap=2)
        untiled = forward_chopped(net, lr, scale, tile=None, overlap=4)
    assert tiled.shape == whole.shape == (2, 3, 23 * scale, 29 * scale)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(untiled, whole, rtol=0, atol=0)
    # an overlap below the receptive field leaves seams: the test above is not vacuous
    assert (too_small - whole).abs().max() > 1e-4


def test_tiles_are_bounded_and_errors():
    seen = []

    def model_fn(x):
        seen.append(tuple(x.shape[-2:]))
        return x.repeat_interleave(2, -2).repeat_interleave(2, -1)

    lr = torch.rand(1, 3, 40, 33)
    out = forward_chopped(model_fn, lr, 2, tile=10, overlap=3)
    torch.testing.assert_close(out, model_fn(lr))
    assert len(seen) - 1 == 4 * 4 and max(max(s) for s in seen[:-1]) <= 10 + 2 * 3
    # a context wider than the tile is fine (e.g. tile 8 with the default overlap 16)
    torch.testing.assert_close(forward_chopped(model_fn, lr, 2, tile=8, overlap=16), out)
    with pytest.raises(ValueError, match="tile > 0"):
        forward_chopped(model_fn, lr, 2, tile=0, overlap=3)
    with pytest.raises(ValueError, match="scale=3"):
        forward_chopped(model_fn, lr, 3, tile=16, overlap=3)
