"""Backbones: parameter counts (METHODS.md 2.1), official state-dict keys (2.2), shapes, pixel ranges."""

from __future__ import annotations

import pytest
import torch

from odm_sr.models import MODEL_NAMES, build_model

SCALES = (2, 3, 4)

# METHODS.md 2.1: every nn.Parameter except MeanShift's.
PARAM_COUNTS = {
    "edsr_baseline": (1_369_859, 1_554_499, 1_517_571),
    "edsr": (40_729_603, 43_680_003, 43_089_923),
    "rdn": (22_123_395, 22_308_035, 22_271_107),
    "swinir_light": (910_152, 918_267, 929_628),
    "swinir_classical": (11_752_487, 11_937_127, 11_900_199),
    "hat_s": (9_473_471, 9_658_111, 9_621_183),
    "imdn": (694_404, 703_059, 715_176),  # ../shared/models/README.md
    "pan": (261_403, 261_403, 272_419),
    # the DAQ release's SRResNet: x4 by hand in tests/quant/test_srresnet_backbone.py; x2 one stage (64·256·9 + 1)
    # less, x3 that stage as 64·576·9 + 1
    "srresnet": (1_399_298, 1_583_618, 1_546_755),
}
SWINIR_LIGHT_WITHOUT_RPB = (877_752, 885_867, 897_228)
RPB_ENTRIES = {"swinir_classical": 48_600, "hat_s": 262_332}

# Tiny variants (same classes, same code paths) for forwards that must stay fast on 2 CPU cores.
TINY = {
    "edsr_baseline": dict(n_resblocks=2, n_feats=16),
    "edsr": dict(n_resblocks=2, n_feats=16),
    "rdn": dict(D=2, C=2, G=8, G0=8),
    "swinir_light": dict(embed_dim=12, depths=(2, 2), num_heads=(2, 2), img_size=16),
    "swinir_classical": dict(embed_dim=12, depths=(2,), num_heads=(2,), img_size=16),
    "hat_s": dict(embed_dim=24, depths=(2,), num_heads=(2,), compress_ratio=6, squeeze_factor=6, img_size=32),
    "imdn": dict(nf=16, num_modules=2),
    "pan": dict(nf=8, unf=4, nb=2),
    "srresnet": dict(n_resblocks=2, n_feats=16),
}


def count_params(model: torch.nn.Module, with_rpb: bool = True) -> int:
    return sum(p.numel() for name, p in model.named_parameters()
               if not name.startswith(("sub_mean.", "add_mean."))
               and (with_rpb or "relative_position_bias_table" not in name))


def wb(prefix: str) -> set[str]:
    return {f"{prefix}.weight", f"{prefix}.bias"}


def official_edsr_keys(n_resblocks: int, scale: int) -> set[str]:
    """EDSR-PyTorch `edsr.py`: MeanShift convs, head.0, ResBlocks body.i.body.{0,2}, body.R, tail."""
    keys = wb("sub_mean") | wb("add_mean") | wb("head.0") | wb(f"body.{n_resblocks}") | wb("tail.1")
    for i in range(n_resblocks):
        keys |= wb(f"body.{i}.body.0") | wb(f"body.{i}.body.2")
    keys |= wb("tail.0.0") | (wb("tail.0.2") if scale == 4 else set())
    return keys


def official_rdn_keys(scale: int, blocks: int = 16, convs: int = 8) -> set[str]:
    keys = wb("SFENet1") | wb("SFENet2") | wb("GFF.0") | wb("GFF.1") | wb("UPNet.0") | wb("UPNet.2")
    keys |= wb("UPNet.4") if scale == 4 else set()
    for i in range(blocks):
        keys |= wb(f"RDBs.{i}.LFF")
        for c in range(convs):
            keys |= wb(f"RDBs.{i}.convs.{c}.conv.0")
    return keys


def official_swin_block_keys(prefix: str, shifted: bool) -> set[str]:
    keys = {f"{prefix}.attn.relative_position_bias_table", f"{prefix}.attn.relative_position_index"}
    for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
        keys |= wb(f"{prefix}.{sub}")
    return keys | ({f"{prefix}.attn_mask"} if shifted else set())


def official_swinir_keys(layers: int, scale: int, light: bool) -> set[str]:
    """SwinIR `network_swinir.py` with upsampler pixelshuffledirect (light) or pixelshuffle (classical)."""
    keys = wb("conv_first") | wb("patch_embed.norm") | wb("norm") | wb("conv_after_body") | wb("upsample.0")
    for i in range(layers):
        keys |= wb(f"layers.{i}.conv")
        for j in range(6):
            keys |= official_swin_block_keys(f"layers.{i}.residual_group.blocks.{j}", shifted=j % 2 == 1)
    if not light:
        keys |= wb("conv_before_upsample.0") | wb("conv_last") | (wb("upsample.2") if scale == 4 else set())
    return keys


def official_hat_keys(scale: int, layers: int = 6, depth: int = 6) -> set[str]:
    """HAT `hat_arch.py`: shared index buffers, HABs (attention + CAB), one OCAB per RHAG."""
    keys = {"relative_position_index_SA", "relative_position_index_OCA"}
    keys |= wb("conv_first") | wb("patch_embed.norm") | wb("norm") | wb("conv_after_body")
    keys |= wb("conv_before_upsample.0") | wb("upsample.0") | wb("conv_last")
    keys |= wb("upsample.2") if scale == 4 else set()
    for i in range(layers):
        group = f"layers.{i}.residual_group"
        keys |= wb(f"layers.{i}.conv")
        for j in range(depth):
            block = f"{group}.blocks.{j}"
            keys.add(f"{block}.attn.relative_position_bias_table")
            for sub in ("norm1", "attn.qkv", "attn.proj", "conv_block.cab.0", "conv_block.cab.2",
                        "conv_block.cab.3.attention.1", "conv_block.cab.3.attention.3", "norm2",
                        "mlp.fc1", "mlp.fc2"):
                keys |= wb(f"{block}.{sub}")
        ocab = f"{group}.overlap_attn"
        keys.add(f"{ocab}.relative_position_bias_table")
        for sub in ("norm1", "qkv", "proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= wb(f"{ocab}.{sub}")
    return keys


def official_imdn_keys(scale: int, blocks: int = 6) -> set[str]:
    """IMDN `model/architecture.py` (saved under `module.`, stripped by the loader): IMDB{i}.c1..c5 and cca."""
    keys = wb("fea_conv") | wb("c.0") | wb("LR_conv") | wb("upsampler.0")
    for i in range(1, blocks + 1):
        for sub in ("c1", "c2", "c3", "c4", "c5", "cca.conv_du.0", "cca.conv_du.2"):
            keys |= wb(f"IMDB{i}.{sub}")
    return keys


def official_pan_keys(scale: int, blocks: int = 16) -> set[str]:
    """PAN `PAN_arch.py`: SCPA convs without biases, PAConv.k2 (1x1, bias), U-PA stages (x4: two)."""
    keys = wb("conv_first") | wb("trunk_conv") | wb("upconv1") | wb("att1.conv") | wb("HRconv1") | wb("conv_last")
    if scale == 4:
        keys |= wb("upconv2") | wb("att2.conv") | wb("HRconv2")
    for i in range(blocks):
        keys |= {f"SCPA_trunk.{i}.{sub}.weight" for sub in ("conv1_a", "conv1_b", "k1.0", "PAConv.k3",
                                                             "PAConv.k4", "conv3")}
        keys |= wb(f"SCPA_trunk.{i}.PAConv.k2")
    return keys


def official_keys(name: str, scale: int) -> set[str]:
    return {
        "edsr_baseline": lambda: official_edsr_keys(16, scale),
        "edsr": lambda: official_edsr_keys(32, scale),
        "rdn": lambda: official_rdn_keys(scale),
        "swinir_light": lambda: official_swinir_keys(4, scale, light=True),
        "swinir_classical": lambda: official_swinir_keys(6, scale, light=False),
        "hat_s": lambda: official_hat_keys(scale),
        "imdn": lambda: official_imdn_keys(scale),
        "pan": lambda: official_pan_keys(scale),
        "srresnet": lambda: official_srresnet_keys(scale),
    }[name]()


def official_srresnet_keys(scale: int) -> set[str]:
    """Cheeun/DAQ-pytorch src/model/srresnet.py (FP, 16 blocks): MeanShift pair, head conv + PReLU, blocks with
    conv1/bn1/conv2/bn2 (no conv bias), body conv + BN, upsampler [conv, PS, PReLU] per stage, last conv."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = wb("sub_mean") | wb("add_mean") | {"head.0.weight", "head.1.weight", "body.16.weight", "tail.1.weight"}
    keys |= {f"body.{i}.{c}.weight" for i in range(16) for c in ("conv1", "conv2")}
    keys |= {f"body.{i}.{b}.{k}" for i in range(16) for b in ("bn1", "bn2") for k in bn}
    keys |= {f"body.17.{k}" for k in bn}
    stages = 2 if scale == 4 else 1
    keys |= {f"tail.0.{3 * s + j}.weight" for s in range(stages) for j in (0, 2)}
    return keys


# Names quoted in METHODS.md 2.2 and the brief, checked explicitly on top of the full key sets.
SPOT_KEYS = {
    "edsr_baseline": ["head.0.weight", "body.15.body.2.weight", "body.16.weight", "tail.0.0.weight",
                      "tail.1.weight", "sub_mean.weight", "add_mean.bias"],
    "edsr": ["body.31.body.2.weight", "body.32.weight"],
    "rdn": ["RDBs.15.convs.7.conv.0.weight", "RDBs.0.LFF.weight", "GFF.0.weight", "GFF.1.bias",
            "UPNet.2.weight"],
    "swinir_light": ["layers.3.residual_group.blocks.5.attn.relative_position_bias_table",
                     "layers.0.residual_group.blocks.1.attn_mask",
                     "layers.0.residual_group.blocks.0.attn.relative_position_index",
                     "conv_after_body.weight", "upsample.0.weight", "patch_embed.norm.weight"],
    "swinir_classical": ["layers.5.residual_group.blocks.5.mlp.fc2.weight", "conv_before_upsample.0.weight",
                         "upsample.0.weight", "conv_last.weight"],
    "hat_s": ["relative_position_index_SA", "relative_position_index_OCA",
              "layers.0.residual_group.overlap_attn.relative_position_bias_table",
              "layers.0.residual_group.blocks.0.conv_block.cab.3.attention.1.weight",
              "layers.5.residual_group.overlap_attn.mlp.fc2.bias", "conv_before_upsample.0.weight"],
}
SPOT_KEYS |= {"imdn": ["IMDB1.c1.weight", "IMDB6.cca.conv_du.2.bias", "c.0.weight", "upsampler.0.weight"],
              "pan": ["SCPA_trunk.15.PAConv.k2.bias", "SCPA_trunk.0.k1.0.weight", "att1.conv.weight"]}
SPOT_KEYS |= {"srresnet": ["head.1.weight", "body.15.conv2.weight", "body.0.bn1.running_var", "body.17.bias"]}
X4_SPOT_KEYS = {"srresnet": ["tail.0.5.weight"], "edsr_baseline": ["tail.0.2.weight"], "rdn": ["UPNet.4.weight"],
                "hat_s": ["upsample.2.weight"], "pan": ["upconv2.weight", "att2.conv.bias"]}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("scale", SCALES)
def test_param_count_and_official_keys(name: str, scale: int) -> None:
    model = build_model(name, scale)
    assert count_params(model) == PARAM_COUNTS[name][SCALES.index(scale)]
    state = model.state_dict()
    assert set(state) == official_keys(name, scale)
    spot = SPOT_KEYS[name] + (X4_SPOT_KEYS.get(name, []) if scale == 4 else [])
    assert [k for k in spot if k not in state] == []
    assert (model.name, model.scale) == (name, scale)
    assert model.pixel_range == (255.0 if name in ("edsr_baseline", "edsr", "rdn", "srresnet") else 1.0)
    if name == "swinir_light":
        assert count_params(model, with_rpb=False) == SWINIR_LIGHT_WITHOUT_RPB[SCALES.index(scale)]
    if name in RPB_ENTRIES:
        assert count_params(model) - count_params(model, with_rpb=False) == RPB_ENTRIES[name]
    if name.startswith(("swinir", "hat")):
        check_transformer_buffers(name, state)


def check_transformer_buffers(name: str, state: dict[str, torch.Tensor]) -> None:
    """attn_mask sized for img_size in SwinIR's shifted blocks only; none in HAT; no `mean` anywhere."""
    assert "mean" not in state
    if name == "hat_s":
        assert not any("attn_mask" in k for k in state)
        assert state["relative_position_index_SA"].shape == (256, 256)
        oca = state["relative_position_index_OCA"]
        assert oca.shape == (256, 576)  # 16x16 queries, 24x24 keys
        # official quirk: the OCA index runs from -880 to 640 and relies on negative indexing into the
        # 39^2 = 1521-entry table; it still hits every entry exactly once
        assert (int(oca.min()), int(oca.max())) == (-880, 640)
        assert len(torch.unique(oca % 1521)) == 1521
        return
    windows = {"swinir_light": 64, "swinir_classical": 36}[name]  # (img_size / 8)^2 for 64 and 48
    assert state["layers.0.residual_group.blocks.1.attn_mask"].shape == (windows, 64, 64)
    assert "layers.0.residual_group.blocks.0.attn_mask" not in state


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("scale", SCALES)
def test_forward_shape_tiny(name: str, scale: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, scale, **TINY[name]).eval()
    x = torch.rand(2, 3, 11, 13) * model.pixel_range
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, 11 * scale, 13 * scale)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["swinir_light", "edsr_baseline"])
def test_forward_full_size_small_input(name: str) -> None:
    model = build_model(name, 4).eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, 9, 10) * model.pixel_range)
    assert y.shape == (1, 3, 36, 40)


def test_edsr_mean_shift_is_fixed_and_cancels() -> None:
    model = build_model("edsr", 2, n_resblocks=4, n_feats=32, res_scale=1.0)
    assert not any(p.requires_grad for p in model.sub_mean.parameters())
    assert not any(p.requires_grad for p in model.add_mean.parameters())
    x = torch.full((1, 3, 5, 5), 128.0)
    mean = 255.0 * torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1)
    assert torch.allclose(model.sub_mean(x), x - mean)
    assert torch.allclose(model.add_mean(model.sub_mean(x)), x, atol=1e-5)
    with torch.no_grad():  # zero every learned layer: the output is add_mean(0) = 255 * mean
        for name, p in model.named_parameters():
            if not name.startswith(("sub_mean", "add_mean")):
                p.zero_()
        assert torch.allclose(model(x), mean.expand(1, 3, 10, 10), atol=1e-4)


@pytest.mark.parametrize("name", ["swinir_light", "hat_s"])
def test_transformer_mean_added_back_in_unit_range(name: str) -> None:
    model = build_model(name, 2, **TINY[name]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        y = model(torch.full((1, 3, 6, 7), 0.5))
    assert torch.allclose(y, model.mean.expand_as(y))
    assert abs(float(model.mean[0, 0, 0, 0]) - 0.4488) < 1e-6


def test_edsr_small_override_and_upsampler_layout() -> None:
    small = build_model("edsr", 3, n_resblocks=4, n_feats=32, res_scale=1.0)
    assert small.body[0].res_scale == 1.0 and len(small.body) == 5
    assert small.tail[0][0].out_channels == 9 * 32  # x3: conv F -> 9F, PixelShuffle(3)
    x4 = build_model("edsr_baseline", 4)
    assert [type(m).__name__ for m in x4.tail[0]] == ["Conv2d", "PixelShuffle"] * 2
    assert build_model("edsr", 2).body[0].res_scale == 0.1
    assert build_model("edsr_full", 2, n_resblocks=1, n_feats=8).name == "edsr"  # alias used by conf/


def test_build_model_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'vdsr'.*edsr_baseline"):
        build_model("vdsr", 2)
    with pytest.raises(ValueError, match=r"scale 8.*\(2, 3, 4\)"):
        build_model("edsr", 8)
    with pytest.raises(ValueError, match="n_blocks.*n_resblocks"):
        build_model("edsr", 2, n_blocks=4)
    with pytest.raises(ValueError, match="pad_mode"):
        build_model("swinir_light", 2, pad_mode="zeros")


def test_hat_channel_attention_pools_without_adaptive_pooling():
    """HAT's channel attention averages over H, W with a plain mean: AdaptiveAvgPool2d(1)'s values, a backward
    CUDA runs deterministically (trainer.deterministic=true), and the same state-dict keys."""
    from odm_sr.models.hat import ChannelAttention

    net = build_model("hat_s", 4, **TINY["hat_s"])
    assert not [m for m in net.modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d)]
    ca = ChannelAttention(12, 3)
    x = torch.randn(2, 12, 5, 7, requires_grad=True)
    ref = torch.nn.AdaptiveAvgPool2d(1)(x)
    assert torch.allclose(ca.attention[0](x), ref, rtol=0, atol=1e-7)
    assert [k for k, _ in ca.state_dict().items()] == ["attention.1.weight", "attention.1.bias",
                                                        "attention.3.weight", "attention.3.bias"]
