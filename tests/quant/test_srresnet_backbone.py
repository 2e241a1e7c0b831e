"""model=srresnet (the DAQ release's SRResNet): official names, sizes, placement, and every method trains one step
on it with storage and BitOPs counted by hand (as tests/quant/test_new_backbone.py does for a registered net)."""

from __future__ import annotations

import pytest
import torch
from helpers import compose_config, make_method, quantize_and_train_one_step

from odm_sr.analysis.complexity import summarize
from odm_sr.models import build_model
from odm_sr.quant import build_method
from odm_sr.quant.layers import quantized_layers

# The release's keys (Cheeun/DAQ-pytorch src/model/srresnet.py, common_srresnet.py): one block shown, x4 tail
RELEASE_KEYS = {"sub_mean.weight", "sub_mean.bias", "add_mean.weight", "add_mean.bias", "head.0.weight",
                "head.1.weight", "body.16.weight", "tail.0.0.weight", "tail.0.2.weight", "tail.0.3.weight",
                "tail.0.5.weight", "tail.1.weight"} | {f"body.17.{k}" for k in (
                    "weight", "bias", "running_mean", "running_var", "num_batches_tracked")} | {
                f"body.0.{m}.{k}" for m in ("bn1", "bn2") for k in (
                    "weight", "bias", "running_mean", "running_var", "num_batches_tracked")} | {
                "body.0.conv1.weight", "body.0.conv2.weight"}


def test_official_names_and_parameter_count():
    net = build_model("srresnet", 4)
    keys = set(net.state_dict())
    assert RELEASE_KEYS <= keys and not any(k.startswith("body.0.") for k in keys - RELEASE_KEYS)
    assert len(keys) == len(RELEASE_KEYS) + 15 * 12  # 15 more blocks of 12 entries each
    # head 3·64·81 + 1 PReLU; 16 blocks of 2·64·64·9 convs + 2 BN·128; body conv 64·64·9 + BN 128; two stages of
    # 64·256·9 + 1 PReLU; last 64·3·81 (no biases; MeanShift left out as in METHODS.md §2.1)
    by_hand = 15553 + 16 * (73728 + 256) + 36992 + 2 * (147456 + 1) + 15552
    assert sum(p.numel() for n, p in net.named_parameters() if "mean" not in n) == by_hand == 1546755
    x = torch.rand(1, 3, 6, 6) * 255
    for scale in (2, 3, 4):
        assert build_model("srresnet", scale, n_resblocks=1, n_feats=8)(x).shape == (1, 3, 6 * scale, 6 * scale)


@pytest.mark.parametrize("method_name", ["odm", "lsq", "pams", "daq", "ddtb", "quantsr"])
def test_full_size_placement_is_both_convs_of_the_16_blocks(method_name):
    net = make_method(method_name, bits={"w": 2, "a": 2}).quantize(build_model("srresnet", 4))
    assert list(quantized_layers(net)) == [f"body.{i}.conv{c}" for i in range(16) for c in (1, 2)]  # 32 layers


def test_odm_fq_is_refused_naming_the_families_it_supports():
    with pytest.raises(ValueError, match="fully-quantized mode is implemented for EDSR only"):
        make_method("odm_fq", bits={"w": 4, "a": 4, "sc": 8}).quantize(build_model("srresnet", 4))


# Hand counts, SRResNet x2 with 1 block of 8 features at LR 8x8 (64 pixels; the last conv runs at 16x16):
HEAD = 64 * 8 * 3 * 81  # 9x9 head conv: 124 416 MACs
BLOCK_CONV = 64 * 8 * 8 * 9  # 36 864 per block conv (two, quantized)
BODY_CONV = BLOCK_CONV  # the body-final conv, FP
UP = 64 * 32 * 8 * 9  # conv 8 -> 32: 147 456
LAST = 256 * 3 * 8 * 81  # 9x9 conv 8 -> 3 at 16x16: 497 664
FP_MACS = HEAD + 2 * BLOCK_CONV + BODY_CONV + UP + LAST  # 880 128
# params: head 1944 + PReLU 1; block 2·576 + 2 BN·16; body conv 576 + BN 16; up 2304 + PReLU 1; last 1944
FP_PARAMS = 1945 + 1184 + 592 + 2305 + 1944  # 7970
W2 = FP_PARAMS - 2 * 576 + 2 * 576 * 2 / 32  # the two block convs' weights at 2 bits (no biases): 6890
W2A2_BITOPS = 2 * BLOCK_CONV * 2 * 2 + (FP_MACS - 2 * BLOCK_CONV) * 32 * 32
DAQ_STAT_OPS = 2 * 4 * (8 * 64) * 32 * 32  # 4 FP ops per input element of its 2 activation quantizers
# overhead per quantized conv: ODM l_a, u_a, γ_w; LSQ l_a, u_a, s; PAMS α; DDTB l, u (⌊2·0.3⌋ = 0 gates);
# QuantSR 8 shifts + α_a + α_w; its learnable shortcut (1 per block) counts as a 32-bit network parameter
CASES = {
    "fp": (32, FP_PARAMS, 0, FP_MACS * 32 * 32),
    "odm": (2, W2 + 6, 6, W2A2_BITOPS),
    "lsq": (2, W2 + 6, 6, W2A2_BITOPS),
    "pams": (2, W2 + 2, 2, W2A2_BITOPS),
    "ddtb": (2, W2 + 4, 4, W2A2_BITOPS),
    "daq": (2, W2, 0, W2A2_BITOPS + DAQ_STAT_OPS),
    "quantsr": (2, W2 + 20 + 1, 20, W2A2_BITOPS),
}


@pytest.mark.parametrize("method_name", list(CASES))
def test_every_method_trains_one_step_and_is_counted_by_hand(method_name, tmp_path):
    bits, params, overhead, bitops = CASES[method_name]
    cfg = compose_config([f"method={method_name}", f"bits={'fp32' if bits == 32 else 'w2a2'}",
                          "data.iters_per_epoch=1"], tmp_path)
    method = build_method(cfg.method, cfg.bits)
    net = quantize_and_train_one_step(method, lambda: build_model("srresnet", 2, n_resblocks=1, n_feats=8))
    assert list(quantized_layers(net)) == ([] if bits == 32 else ["body.0.conv1", "body.0.conv2"])
    counts = summarize(net, method_name, bits, (8, 8), dynamic_ratio=method.gate_ratio())
    assert counts["complexity/macs_g"] == pytest.approx(FP_MACS / 1e9, rel=1e-12)
    assert counts["complexity/storage_k"] == pytest.approx(params / 1000, rel=1e-12)
    assert counts["complexity/overhead_k"] == pytest.approx(overhead / 1000, abs=1e-12)
    assert counts["complexity/bitops_g"] == pytest.approx(bitops / 1e9, rel=1e-12)
