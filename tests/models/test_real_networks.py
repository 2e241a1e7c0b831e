"""IMDN and PAN: the official FP files load strictly (and a wrong file fails naming itself and the shapes), the
placement quantizes the block convs only, and the FP networks reproduce their published Set5 numbers at x2/x3/x4
(``../shared/models/README.md``: IMDN's paper, PAN's authors' test logs)."""

from __future__ import annotations

import re

import pytest
import torch

from odm_sr.data import SRDataModule
from odm_sr.evaluation import eval_gray_mode, evaluate_sets, network_upscale
from odm_sr.models import build_model, load_pretrained
from odm_sr.models.checkpoint import guess_scale, read_checkpoint
from odm_sr.quant.backbones import select_layers

FILES = {"imdn": "imdn/IMDN_x{s}.pth", "pan": "pan/PANx{s}_DF2K.pth"}
PARAMS = {("imdn", 2): 694_404, ("imdn", 3): 703_059, ("imdn", 4): 715_176,  # the models README
          ("pan", 2): 261_403, ("pan", 3): 261_403, ("pan", 4): 272_419}
# Set5 Y-PSNR / SSIM (crop = scale) as published: IMDN paper; PAN test logs (results/PANx{s}_DF2K/*.log)
SET5 = {("imdn", 2): (38.00, 0.9605), ("imdn", 3): (34.36, 0.9270), ("imdn", 4): (32.21, 0.8948),
        ("pan", 2): (38.0007, 0.96049), ("pan", 3): (34.4003, 0.92717), ("pan", 4): (32.1311, 0.89481)}


def _file(root, net, scale):
    return root / FILES[net].format(s=scale)


@pytest.mark.parametrize("net,scale", list(PARAMS))
def test_official_file_loads_strictly(models_root, net, scale):
    model = load_pretrained(build_model(net, scale), _file(models_root, net, scale))
    assert sum(p.numel() for p in model.parameters()) == PARAMS[net, scale]
    state = read_checkpoint(_file(models_root, net, scale))  # IMDN's `module.` prefix is gone
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert guess_scale(state) == (scale if net == "imdn" or scale == 4 else None)  # PAN x2 == x3 in shapes


def test_wrong_scale_names_the_file_and_the_shapes(models_root):
    path = _file(models_root, "imdn", 3)
    with pytest.raises(ValueError) as error:
        load_pretrained(build_model("imdn", 4), path)
    message = str(error.value)
    assert str(path) in message and "checkpoint looks like scale 3, model is scale 4" in message
    assert "shape mismatch for upsampler.0.weight: checkpoint (27, 64, 3, 3), model (48, 64, 3, 3)" in message


def test_pan_x2_and_x3_files_are_told_apart_by_name(models_root):
    path = _file(models_root, "pan", 3)
    with pytest.raises(ValueError, match=re.escape(f"{path}: does not match model 'pan'") + r"[\s\S]*"
                       "the file name says scale 3, model is scale 2"):
        load_pretrained(build_model("pan", 2), path)
    with pytest.raises(ValueError, match="unexpected key"):  # x4 has the second U-PA stage
        load_pretrained(build_model("pan", 2), _file(models_root, "pan", 4))


def test_other_network_is_refused(models_root):
    path = _file(models_root, "pan", 4)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*does not match model 'imdn'[\s\S]*missing key"):
        load_pretrained(build_model("imdn", 4), path)


def test_placement_quantizes_the_block_convs_only():
    imdn, pan = select_layers(build_model("imdn", 4)), select_layers(build_model("pan", 4))
    assert len(imdn) == 30 and imdn[:5] == [f"IMDB1.c{i}" for i in range(1, 6)]
    assert len(pan) == 96 and pan[:6] == [f"SCPA_trunk.0.{n}" for n in
                                          ("conv1_a", "conv1_b", "k1.0", "PAConv.k3", "PAConv.k4", "conv3")]
    assert not any("cca" in n or "k2" in n for n in imdn + pan)  # the attention gates stay FP


# Set14 x4 (with bridge, a gray image, compared as Y of its RGB replica: eval_gray_mode "official" for both)
SET14 = {("imdn", 4): (28.58, 0.7811), ("pan", 4): (28.6107, 0.78215)}


@pytest.mark.data
@pytest.mark.parametrize("net,scale,set_name", [(*k, "Set5") for k in SET5] + [(*k, "Set14") for k in SET14])
def test_fp_network_reproduces_published_numbers(models_root, data_root, net, scale, set_name):
    model = load_pretrained(build_model(net, scale), _file(models_root, net, scale)).eval()
    dm = SRDataModule(train=None, val=[], test=[set_name], scale=scale, lr_patch=16, batch_size=1,
                      data_root=str(data_root))
    psnr, ssim = evaluate_sets(network_upscale(model), dm, eval_gray_mode(model))[set_name]
    published = (SET5 if set_name == "Set5" else SET14)[net, scale]
    assert psnr == pytest.approx(published[0], abs=0.02)
    assert ssim == pytest.approx(published[1], abs=0.001)


def test_imdn_contrast_gradient_is_finite_on_a_constant_channel():
    """A constant channel (variance 0) has an infinite gradient under the release's pow(0.5); here it is 0 for
    the std term, and the std's forward and gradient elsewhere equal torch's."""
    from odm_sr.models.imdn import channel_std

    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x[0, 1] = 0.7  # constant channel
    x.requires_grad_(True)
    std = channel_std(x)
    reference = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2).mean(dim=(2, 3), keepdim=True).pow(0.5)
    assert torch.equal(std, reference)
    std.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[0, 1], torch.zeros(4, 4, dtype=torch.float64))
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref - x_ref.mean(dim=(2, 3), keepdim=True)).pow(2).mean(dim=(2, 3), keepdim=True).pow(0.5).sum().backward()
    assert torch.isnan(x_ref.grad[0, 1]).all()  # the release's form: inf * 0
    mask = torch.ones_like(x.grad, dtype=torch.bool)
    mask[0, 1] = False
    assert torch.allclose(x.grad[mask], x_ref.grad[mask], rtol=1e-12, atol=0)


@pytest.mark.parametrize("net_name,quantized_weights", [
    ("imdn", 6 * (64 * 64 * 9 + 2 * 48 * 64 * 9 + 48 * 16 * 9 + 64 * 64)),  # c1, c2, c3, c4, c5 per IMDB
    ("pan", 16 * (2 * 40 * 20 + 3 * 20 * 20 * 9 + 40 * 40)),  # conv1_a/b, k1/k3/k4, conv3 per SCPA (no biases)
])
def test_storage_counts_the_quantized_block_weights(tmp_path, net_name, quantized_weights):
    from helpers import compose_config

    from odm_sr.analysis.complexity import summarize
    from odm_sr.quant import build_method

    cfg = compose_config(["method=odm", "bits=w2a2", f"model={net_name}"], tmp_path)
    method = build_method(cfg.method, cfg.bits)
    net = build_model(net_name, 4)
    fp_params = sum(p.numel() for p in net.parameters())
    counts = summarize(method.quantize(net), "odm", 2, (8, 8), dynamic_ratio=method.gate_ratio())
    n_layers = len(select_layers(build_model(net_name, 4)))
    # 2-bit weights count 2/32 of an FP parameter; ODM adds l_a, u_a, gamma_w per quantized layer
    expected = fp_params - quantized_weights + quantized_weights * 2 / 32 + 3 * n_layers
    assert counts["complexity/storage_k"] == pytest.approx(expected / 1000, rel=1e-12)
