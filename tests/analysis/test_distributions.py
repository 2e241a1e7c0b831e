"""Distribution analyses (S9, S10, Figures S1, S2) against statistics computed by hand in numpy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import method_config
from torch import nn

from odm_sr.analysis.distributions import (
    activation_histograms,
    feature_mismatch,
    feature_variance,
    fp_mode,
    input_layers,
    odm_initialized,
    static_levels,
    weight_stats,
)
from odm_sr.analysis.plots import plot_histograms, plot_weight_stats
from odm_sr.models import build_model
from odm_sr.quant import build_method
from odm_sr.quant.blocks import ActSite
from odm_sr.quant.layers import QuantConv2d
from odm_sr.quant.odm import OdmActQuantizer
from odm_sr.quant.pams import PamsActQuantizer

torch.set_num_threads(1)
RANGES = {"conv1": (0.1, 0.7), "conv2": (0.2, 0.6)}


def odm_quantizer(lower: float, upper: float, bits: int = 2) -> OdmActQuantizer:
    q = OdmActQuantizer(bits)
    q.set_range(lower, upper)
    return q


def identity_conv(act_quant: nn.Module | None) -> QuantConv2d:
    conv = nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
    return QuantConv2d.from_float(conv, act_quant, None)


class IdentityNet(nn.Module):
    """conv1 sees the image itself; conv2 sees q1(image) (identity weights, FP weights, no bias)."""

    def __init__(self):
        super().__init__()
        self.conv1 = identity_conv(odm_quantizer(*RANGES["conv1"]))
        self.conv2 = identity_conv(odm_quantizer(*RANGES["conv2"]))

    def forward(self, x):
        return self.conv2(self.conv1(x))


def np_quantize(x: np.ndarray, lower: float, upper: float, bits: int = 2) -> np.ndarray:
    step = (upper - lower) / (2 ** bits - 1)
    return np.round((np.clip(x, lower, upper) - lower) / step) * step + lower


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).random((4, 3, 6, 5))


def test_feature_variance_matches_numpy(images):
    a = images.mean(axis=(2, 3))  # A[n, c]; both layers see the image in the FP forward
    s = images.std(axis=(2, 3))
    net = IdentityNet()
    v = feature_variance(net, torch.tensor(images, dtype=torch.float32))
    assert v["num_layers"] == 2 and v["num_images"] == 4
    assert v["image_wise"] == pytest.approx(a.var(axis=0).mean(), rel=1e-5)
    assert v["channel_wise"] == pytest.approx(a.var(axis=1).mean(), rel=1e-5)
    v = feature_variance(net, [torch.tensor(x, dtype=torch.float32) for x in images], "channel_std")
    assert v["image_wise"] == pytest.approx(s.var(axis=0).mean(), rel=1e-5)
    v = feature_variance(net, [{"lr": torch.tensor(x, dtype=torch.float32)} for x in images], "tensor_mean_std")
    flat = images.reshape(4, -1)
    assert v["image_wise"] == pytest.approx(flat.mean(1).var() + flat.std(1).var(), rel=1e-4)
    assert v["channel_wise"] == pytest.approx(a.var(axis=1).mean() + s.var(axis=1).mean(), rel=1e-5)
    with pytest.raises(ValueError, match="analysis.var.definition"):
        feature_variance(net, images, "bogus")


def test_feature_mismatch_matches_numpy(images):
    x1 = images
    q1 = np_quantize(x1, *RANGES["conv1"])
    x2, q2 = q1, np_quantize(q1, *RANGES["conv2"])  # conv2's input is q1(x) (identity conv1)
    m = feature_mismatch(IdentityNet(), torch.tensor(images, dtype=torch.float32))
    flat = [x.reshape(4, -1) for x in (x1, x2)]
    assert m["num_layers"] == 2 and m["num_images"] == 4
    assert m["var_mean"] == pytest.approx(np.mean([f.mean(1).var() for f in flat]), rel=1e-4)
    assert m["var_std"] == pytest.approx(np.mean([f.std(1).var() for f in flat]), rel=1e-4)
    norms = [np.linalg.norm((x - q).reshape(4, -1), axis=1) for x, q in ((x1, q1), (x2, q2))]
    assert m["mismatch"] == pytest.approx(np.mean(norms), rel=1e-4)
    assert m["layers"]["conv1"]["mismatch"] == pytest.approx(norms[0].mean(), rel=1e-4)


def test_fixed_quantizer_recalibrates_ranges(images):
    x = torch.tensor(images[:1], dtype=torch.float32)
    m = feature_mismatch(IdentityNet(), x, quantizer="fixed", j=100.0)  # (min, max) of the one image
    q1 = np_quantize(images[0], images[0].min(), images[0].max())
    assert m["layers"]["conv1"]["mismatch"] == pytest.approx(np.linalg.norm(images[0] - q1), rel=1e-4)


class ProducerNet(nn.Module):
    """A block-level quantizer feeding a layer without its own act_quant (the PAMS-style conv1)."""

    def __init__(self):
        super().__init__()
        self.quant_act1 = odm_quantizer(0.2, 0.8)
        self.conv = identity_conv(None)

    def forward(self, x):
        return self.conv(self.quant_act1(x))


def test_mismatch_uses_the_quantizer_that_produced_the_input(images):
    m = feature_mismatch(ProducerNet(), torch.tensor(images, dtype=torch.float32))
    norms = np.linalg.norm((images - np_quantize(images, 0.2, 0.8)).reshape(4, -1), axis=1)
    assert list(m["layers"]) == ["conv"] and m["mismatch"] == pytest.approx(norms.mean(), rel=1e-4)


def test_histogram_levels_of_an_odm_quantizer(images, tmp_path):
    h = activation_histograms(IdentityNet(), torch.tensor(images[0], dtype=torch.float32), ("first", "last"),
                              bins=10, path=tmp_path / "h.png")
    assert list(h) == ["conv1", "conv2"]
    np.testing.assert_allclose(h["conv1"]["levels"], [0.1, 0.3, 0.5, 0.7], atol=1e-6)
    np.testing.assert_allclose(h["conv2"]["levels"], [0.2, 0.2 + 0.4 / 3, 0.2 + 0.8 / 3, 0.6], atol=1e-6)
    assert h["conv1"]["counts"].sum() == images[0].size and h["conv1"]["min"] == pytest.approx(images[0].min())
    assert (tmp_path / "h.png").stat().st_size > 0
    plot_histograms(h)


def test_static_levels_of_other_quantizers():
    pams = PamsActQuantizer(3, ActSite("x", 3, False))
    with torch.no_grad():
        pams.alpha.fill_(1.5)
    np.testing.assert_allclose(static_levels(pams), [-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
    assert static_levels(None) is None and static_levels(odm_quantizer(0, 1, bits=32)) is None


def test_weight_stats_are_min_max_mean(tmp_path):
    model = build_model("edsr", 2, n_resblocks=2, n_feats=4)
    build_method(method_config("odm"), {"w": 2, "a": 2}).quantize(model)
    stats = weight_stats(model)
    layers = input_layers(model)
    assert [s["layer"] for s in stats] == list(layers) == [f"body.{i}.body.{k}" for i in (0, 1) for k in (0, 2)]
    for s in stats:
        w = layers[s["layer"]].weight.detach().double()
        assert (s["min"], s["max"], s["mean"]) == pytest.approx((w.min().item(), w.max().item(), w.mean().item()))
        assert s["clip"] == pytest.approx(torch.quantile(w.abs().flatten(), 0.99).item(), rel=1e-4)  # γ_w = 1
    plot_weight_stats(stats, tmp_path / "w.png")
    assert (tmp_path / "w.png").stat().st_size > 0


def test_fp_model_uses_placement_and_fp_mode_is_the_fp_network():
    torch.manual_seed(0)
    fp = build_model("edsr", 2, n_resblocks=1, n_feats=4).eval()
    x = torch.rand(1, 3, 8, 8)
    assert feature_variance(fp, x)["num_layers"] == 2
    assert list(activation_histograms(fp, x, ("last",))) == ["body.0.body.2"]
    quantized = odm_initialized(fp, [x[0]], bits=2, j=100.0)
    first = quantized.get_submodule("body.0.body.0").act_quant  # j = 100: (min, max) of its FP input
    head = fp.head(fp.sub_mean(x * 255.0))
    assert (first.lower.item(), first.upper.item()) == pytest.approx((head.min().item(), head.max().item()),
                                                                     rel=1e-5)
    with torch.no_grad(), fp_mode(quantized):
        assert torch.allclose(quantized(x * 255.0), fp(x * 255.0))
    with torch.no_grad():
        assert not torch.allclose(quantized(x * 255.0), fp(x * 255.0))
    assert copy.deepcopy(quantized).get_submodule("body.0.body.0").act_quant is not None  # restored
    with pytest.raises(ValueError, match="nothing to mismatch"):
        feature_mismatch(fp, x)


def test_analyze_cli_on_a_checkpoint(tmp_path, capsys):
    """odm-sr-analyze on a checkpoint saved the way training saves it (untrained tiny 2-bit ODM EDSR)."""
    from helpers import TINY_TRAIN, compose_config
    from omegaconf import OmegaConf

    from odm_sr.builders import build_network
    from odm_sr.cli.analyze import main

    cfg = compose_config(TINY_TRAIN + ["method=odm", "bits=w2a2"], tmp_path)
    net, _, _ = build_network(cfg)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"cfg": OmegaConf.to_container(cfg, resolve=True)}}, ckpt)
    for analysis in ("variance", "mismatch", "hist", "wstats"):
        main([analysis, "--ckpt", str(ckpt), "--data", "sample_test", "--limit", "1"])
        assert (tmp_path / "analysis" / f"{analysis}.json").is_file()
        assert torch.is_grad_enabled(), "the CLI must not switch autograd off for the calling process"
    assert (tmp_path / "analysis" / "hist.png").is_file() and (tmp_path / "analysis" / "wstats.png").is_file()
    out = capsys.readouterr().out
    assert "| image-wise variance |" in out and "| odm |" in out and "| body.0.body.0 |" in out
    with pytest.raises(SystemExit, match="no such file"):
        main(["wstats", "--ckpt", str(tmp_path / "missing.ckpt")])
