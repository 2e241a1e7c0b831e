"""The float tail of EDSR/RDN as one composed conv in the exported graph (``export.tail``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_network
from torch import nn

from odm_sr.export.integer import extract_spec, integer_model
from odm_sr.export.onnx_graph import to_onnx
from odm_sr.export.runtime import OnnxEngine, session
from odm_sr.export.tail import ComposedTail, compose_tail, tail_modules
from odm_sr.models.edsr import EDSR
from odm_sr.models.rdn import RDN


def _with_biases(model: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None and m.bias.requires_grad:
                m.bias.normal_(0, 0.5)
    return model.eval()


def test_one_conv_and_shuffle_is_its_own_kernel():
    """Hand case: conv 3x3 (2 → 4) + PixelShuffle(2) is already one conv on the LR grid followed by a shuffle: the
    composed kernel and bias are the conv's own (CRD channel order kept), radius 1, and the conv's own zero padding
    is the LR padding: no border band."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    tail = ComposedTail([conv, nn.PixelShuffle(2)], scale=2, channels=2)
    assert tail.radius == 1 and tail.band == 0
    assert torch.allclose(tail.weight, conv.weight, atol=1e-7) and torch.allclose(tail.bias, conv.bias, atol=1e-7)


def test_one_by_one_tail():
    """Hand case: conv 1x1 (1 → 4, weights 1, 2, 3, 4, bias 0.5) + PixelShuffle(2): output pixel (2i + a, 2j + b)
    is (1 + 2a + b)·x[i, j] + 0.5: a 1x1 composed kernel [1, 2, 3, 4], radius 0, no band."""
    conv = nn.Conv2d(1, 4, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(4, 1, 1, 1))
        conv.bias.fill_(0.5)
    tail = ComposedTail([conv, nn.PixelShuffle(2)], scale=2, channels=1)
    assert tail.radius == 0 and tail.band == 0
    assert tail.weight.flatten().tolist() == [1.0, 2.0, 3.0, 4.0] and tail.bias.tolist() == [0.5] * 4


NETWORKS = {"edsr": lambda s: EDSR(s, n_resblocks=1, n_feats=8, name="edsr_baseline"),
            "rdn": lambda s: RDN(s, G0=8, D=1, C=2, G=4)}


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("family", list(NETWORKS))
def test_composed_tail_equals_the_sequential_tail(family, scale):
    """The composed tail (conv + shuffle inside, the sequential tail on border strips) equals the network's own
    tail in float64 to the float32 rounding of the composed kernel, on inputs from 2x2 up; the kernel is 5x5
    (at x4, output row 4i + a reads LR rows i − 2 … i + 2) and the band where the layers' own zero padding shows is
    the outermost LR row/column."""
    net = _with_biases(NETWORKS[family](scale))
    composed = compose_tail(copy.deepcopy(net))
    tails = [m for m in composed.modules() if isinstance(m, ComposedTail)]
    assert len(tails) == 1 and (tails[0].radius, tails[0].band) == (2, 1)
    assert not any(isinstance(m, nn.PixelShuffle) for m in composed.modules() if m not in tails[0].modules())
    net64, composed64 = net.double(), composed.double()
    for h, w in [(2, 2), (3, 5), (7, 4), (13, 11)]:
        x = torch.rand(2, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(h * w)) * 255
        with torch.no_grad():
            want, got = net64(x), composed64(x)
        assert got.shape == want.shape == (2, 3, scale * h, scale * w)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), (h, w)


def test_graph_tail_agrees_with_the_sequential_graph(tmp_path):
    """In ONNX Runtime the composed graph of a tiny EDSR x4 integer model agrees with its sequential-tail graph to
    float32 round-off (1e-3 grey levels) and the ODM-FQ model (integer tail convs) keeps its sequential tail."""
    net, _ = tiny_network("edsr", "odm", 2, tmp_path, scale=4)
    model = integer_model(net, extract_spec(net))
    x = np.random.default_rng(0).random((1, 3, 9, 12), dtype=np.float32) * 255
    composed = session(to_onnx(model, (9, 12)), threads=1).run(None, {"lr": x})[0]
    sequential = session(to_onnx(model, (9, 12), compose=False), threads=1).run(None, {"lr": x})[0]
    assert np.abs(composed - sequential).max() <= 1e-3 and tail_modules(model) == ["tail", "add_mean"]
    fq, _ = tiny_network("edsr", "odm_fq", 2, tmp_path)
    assert tail_modules(integer_model(fq, extract_spec(fq))) == []
    imdn, _ = tiny_network("imdn", "odm", 2, tmp_path)
    assert tail_modules(imdn) == []


def test_engine_refuses_one_pixel_inputs(tmp_path):
    net, _ = tiny_network("edsr", "odm", 4, tmp_path)
    engine = OnnxEngine(integer_model(net, extract_spec(net)), threads=1)
    assert engine(np.ones((1, 3, 2, 3), np.float32) * 100).shape == (1, 3, 4, 6)
    with pytest.raises(ValueError, match=r"1x5 pixels: the graph's composed tail takes inputs of at least 2x2"):
        engine(np.ones((1, 3, 1, 5), np.float32))
