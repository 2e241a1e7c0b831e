"""Complexity accounting (METHODS.md §6) against counts written out by hand from the architectures."""

from __future__ import annotations

import pytest
import torch
from helpers import method_config

from odm_sr.analysis.complexity import bitops, complexity_table, find_quantizers, storage, summarize
from odm_sr.cli.complexity import main
from odm_sr.models import build_model
from odm_sr.quant import build_method
from odm_sr.quant.ddtb import DynamicGate  # a rename must fail this file, not skip the DDTB checks
from odm_sr.quant.layers import QuantMixin

ODM = "odm_sr.quant.odm.ODM"
DDTB = "odm_sr.quant.ddtb.DDTB"


def quantized(name: str, scale: int, target: str, bits: int = 2, cfg: dict | None = None, **kwargs):
    model = build_model(name, scale, **kwargs)
    method = method_config(target.rsplit(".", 1)[1].lower(), cfg)  # odm_sr.quant.odm.ODM -> conf/method/odm.yaml
    build_method(method, {"w": bits, "a": bits}).quantize(model)
    return model


def small_edsr(target: str | None = None, cfg: dict | None = None):
    """4 blocks, 32 features, x2: 8 block convs."""
    if target is None:
        return build_model("edsr", 2, n_resblocks=4, n_feats=32)
    return quantized("edsr", 2, target, cfg=cfg, n_resblocks=4, n_feats=32)


# -- EDSR-baseline x4, hand count (MeanShift excluded from both storage and BitOPs) ------------------------
HEAD_P = 3 * 64 * 9 + 64  # conv 3->64 3x3 + bias
BLOCK_W, BLOCK_B = 64 * 64 * 9, 64  # each of the 32 block convs
BODY_FINAL_P = 64 * 64 * 9 + 64
UP_P = 64 * 256 * 9 + 256  # each of the two upsampler convs 64->256
LAST_P = 64 * 3 * 9 + 3
FP_PARAMS = HEAD_P + 32 * (BLOCK_W + BLOCK_B) + BODY_FINAL_P + 2 * UP_P + LAST_P

HEAD_MACS = 64 * 64 * 64 * 3 * 9  # H_o W_o C_o C_i k^2 at 64x64
BLOCK_MACS = 64 * 64 * 64 * 64 * 9  # each of the 32 block convs
BODY_FINAL_MACS = 64 * 64 * 64 * 64 * 9
UP1_MACS = 64 * 64 * 256 * 64 * 9  # at 64x64
UP2_MACS = 128 * 128 * 256 * 64 * 9  # at 128x128 after the first pixel shuffle
LAST_MACS = 256 * 256 * 3 * 64 * 9  # at 256x256
FP_MACS = HEAD_MACS + 32 * BLOCK_MACS + BODY_FINAL_MACS + UP1_MACS + UP2_MACS + LAST_MACS


def test_hand_count_matches_methods_table():
    assert FP_PARAMS == 1_517_571  # METHODS.md §2.1, EDSR-baseline x4
    assert FP_MACS == 8_123_056_128


def test_edsr_baseline_fp_storage_and_bitops():
    model = build_model("edsr_baseline", 4)
    s = storage(model)
    assert s["total_k"] == pytest.approx(FP_PARAMS / 1000)  # 1517.571
    assert s["overhead_k"] == 0.0
    b = bitops(model, (64, 64))
    assert b["macs"] == FP_MACS
    assert b["total"] == FP_MACS * 32 * 32
    assert "sub_mean" not in b["layers"] and "add_mean" not in b["layers"]
    assert b["layers"]["tail.0.2"]["macs"] == UP2_MACS


def test_edsr_baseline_odm_2bit_storage_and_bitops():
    model = quantized("edsr_baseline", 4, ODM)
    s = storage(model)
    backbone = FP_PARAMS - 32 * BLOCK_W + 32 * BLOCK_W * 2 / 32  # 32 block weights at 2 bits
    overhead = 32 * 3  # l_a, u_a, gamma_w per quantized layer
    assert s["backbone_k"] == pytest.approx(backbone / 1000)  # 411.651
    assert s["overhead_k"] == pytest.approx(overhead / 1000)
    assert s["total_k"] == pytest.approx((backbone + overhead) / 1000)  # 411.747
    assert s["by_role"]["weight_qparam"] == pytest.approx(32 / 1000)
    assert s["layers"]["body.0.body.0"]["role"] == "mixed"  # 2-bit weight + FP bias
    b = bitops(model, (64, 64))
    assert b["macs"] == FP_MACS
    assert b["quantized_macs"] == 32 * BLOCK_MACS
    assert b["total"] == (FP_MACS - 32 * BLOCK_MACS) * 32 * 32 + 32 * BLOCK_MACS * 2 * 2
    assert b["layers"]["body.5.body.2"]["w_bits"] == b["layers"]["body.5.body.2"]["a_bits"] == 2


def test_paper_like_odm_overhead():
    s = storage(quantized("edsr_baseline", 4, ODM), "paper_like")
    assert s["overhead_k"] == pytest.approx(0.064)  # 32 layers x (l_a, u_a): the summary's 0.06K
    assert s["by_role"]["weight_qparam"] == 0.0


def _mark_dynamic(quantizer, flag: bool) -> None:
    if isinstance(quantizer.is_dynamic, torch.Tensor):
        quantizer.is_dynamic.fill_(flag)
    else:
        quantizer.is_dynamic = flag


def test_paper_like_ddtb_overhead_and_gates():
    model = quantized("edsr_baseline", 4, DDTB)
    gate = 64 * 32 + 32 * 2  # ternary 1x1 convs C->32->2
    paper_like = 48 * 2 + 14 * gate * 2 / 32  # 96 + 1848 = 1944: the summary's 1.9K
    s = storage(model, "paper_like")  # uncalibrated: floor(48 * 0.3) = 14 gates assumed
    assert s["gates_assumed"] and s["dynamic_gates"] == 14
    assert s["overhead_k"] == pytest.approx(paper_like / 1000)
    full = storage(model, "full")
    assert full["overhead_k"] == pytest.approx((paper_like + 14 * 2 * 32) / 1000)  # + BN affine at 32
    assert storage(model, ddtb_count_bn=False)["overhead_k"] == pytest.approx(paper_like / 1000)
    gated = [q for q in find_quantizers(model).values() if isinstance(getattr(q, "gate", None), DynamicGate)]
    assert len(gated) == 48
    for i, q in enumerate(gated):
        _mark_dynamic(q, i < 14)  # as after DDTB's calibration epoch
    s = storage(model, "paper_like")
    assert not s["gates_assumed"] and s["overhead_k"] == pytest.approx(paper_like / 1000)
    b = bitops(model, (64, 64))
    assert b["gate_macs"] == 14 * (64 * 32 + 64)
    assert b["total"] == (FP_MACS - 32 * BLOCK_MACS) * 1024 + 32 * BLOCK_MACS * 4 + 14 * (64 * 32 + 64) * 4


# -- structure-sensitive counting on a small EDSR ---------------------------------------------------------
def test_pams_alphas_and_conv1_input_bits():
    model = small_edsr("odm_sr.quant.pams.PAMS")
    assert storage(model)["overhead_k"] == pytest.approx(4 * 3 / 1000)  # q1, q2, q3 per block
    layers = bitops(model, (16, 16))["layers"]
    assert layers["body.0.body.0"]["a_bits"] == 2  # conv1 sees q1(x)
    raw = small_edsr("odm_sr.quant.pams.PAMS", {"quirks": {"conv1_raw_input": True}})
    assert bitops(raw, (16, 16))["layers"]["body.0.body.0"]["a_bits"] == 32


def test_daq_has_no_overhead_and_counts_runtime_statistics():
    model = small_edsr("odm_sr.quant.daq.DAQ")
    assert storage(model)["overhead_k"] == 0.0
    b = bitops(model, (16, 16), daq_ops_per_elem=4)
    assert b["stat_ops"] == 8 * (32 * 16 * 16) * 4  # 8 quantized layers x input elements x 4
    fp = bitops(small_edsr(), (16, 16))
    block_macs = 8 * 16 * 16 * 32 * 32 * 9
    assert b["total"] == fp["total"] - block_macs * 1024 + block_macs * 4 + b["stat_ops"] * 1024


def test_lsq_counts_scale_per_layer():
    s = storage(small_edsr(ODM, {"weight_quantizer": "lsq"}))
    assert s["overhead_k"] == pytest.approx(8 * 3 / 1000)  # l_a, u_a, s


def test_bitops_leaves_the_model_untouched():
    model = small_edsr(ODM)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bitops(model, (16, 16))
    assert model.training and all(m.training for m in model.modules())
    assert all("forward" not in m.__dict__ for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bounds still uncalibrated


# -- transformers: linear and window-attention MACs ----------------------------------------------------------
def test_swinir_linears_and_window_attention():
    model = build_model("swinir_light", 2, img_size=8, embed_dim=12, depths=(2,), num_heads=(2,),
                        window_size=4, drop_path_rate=0.0)
    hw, c = 8 * 8, 12
    per_block = hw * c * 3 * c + hw * c * c + hw * c * 2 * c + hw * 2 * c * c  # qkv, proj, fc1, fc2
    convs = hw * c * 3 * 9 + 2 * hw * c * c * 9 + hw * (3 * 4) * c * 9  # first, RSTB + after_body, upsample
    attention = 2 * (2 * hw * 4 ** 2 * c)  # 2 Swin layers x 2·H·W·M²·C
    b = bitops(model, (8, 8))
    assert b["attention_macs"] == attention
    assert b["macs"] == 2 * per_block + convs + attention
    assert b["total"] == b["macs"] * 1024
    q = quantized("swinir_light", 2, ODM, img_size=8, embed_dim=12, depths=(2,), num_heads=(2,),
                  window_size=4, drop_path_rate=0.0)
    quant_macs = 2 * per_block + hw * c * c * 9  # the Swin linears and the RSTB conv
    bq = bitops(q, (8, 8))
    assert bq["quantized_macs"] == quant_macs
    assert bq["total"] == (b["macs"] - quant_macs) * 1024 + quant_macs * 4
    assert bitops(q, (8, 8), quant_attn_matmul=True)["total"] == bq["total"] - attention * (1024 - 4)


def test_hat_ocab_attends_to_enlarged_key_windows():
    model = build_model("hat_s", 2, img_size=8, embed_dim=12, depths=(2,), num_heads=(2,), window_size=4,
                        compress_ratio=3, squeeze_factor=4, drop_path_rate=0.0)
    hw, c = 8 * 8, 12
    overlap = 4 + int(0.5 * 4)  # OCAB key window: 6 (24 for HAT-S)
    assert bitops(model, (8, 8))["attention_macs"] == 2 * (2 * hw * 16 * c) + 2 * hw * overlap ** 2 * c


def test_backbone_storage_matches_methods_parameter_counts():
    assert storage(build_model("swinir_light", 4))["total_k"] == pytest.approx(929.628)  # with RPB tables


# -- summaries, tables, CLI ----------------------------------------------------------------------------------
def test_summarize_keys_and_rule_validation():
    metrics = summarize(small_edsr(ODM), "odm", {"w": 2, "a": 2}, (16, 16))
    assert set(metrics) == {"complexity/storage_k", "complexity/overhead_k", "complexity/bitops_g",
                            "complexity/macs_g"}
    assert metrics["complexity/overhead_k"] == pytest.approx(0.024)
    with pytest.raises(ValueError, match="rule"):
        storage(small_edsr(), "paper")


def test_complexity_table_markdown():
    table = complexity_table([{"model": "m x4", "method": "odm", "bits": "2", "storage_k": 411.747,
                               "overhead_k": 0.096, "bitops_g": 3389.5345, "macs_g": 8.123}])
    assert table.splitlines()[0].startswith("| model | method | W/A | storage (K)")
    assert table.splitlines()[2] == "| m x4 | odm | 2 | 411.747 | 0.096 | 3,389.53 | 8.12 |"


def test_cli_prints_one_row_per_model_method_bits(capsys):
    main(["--model", "edsr_baseline", "--scale", "4", "--method", "fp", "odm", "ddtb", "--bits", "2",
          "--lr-hw", "16", "16"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| edsr_baseline")]
    assert [r.split(" | ")[1:3] for r in rows] == [["fp", "32"], ["odm", "2"], ["ddtb", "2"]]
    assert rows[0].split(" | ")[3] == "1,517.571"
    assert rows[1].split(" | ")[3:5] == ["411.747", "0.096"]
    assert rows[2].split(" | ")[4] == "2.840"  # 96 bounds + 14 gates x (2112 at 2 bits + 64 BN)


def test_paper_like_swinir_storage_reproduces_table_s8():
    """Table S8, SwinIR-light ×4 at 2 bits: DDTB 160.4K, the same as ODM. On transformers the paper counts each
    quantized layer's activation bounds plus one weight scale, and no gates (full: 166.8K; EDSR counting: 164.9K)."""
    ddtb = quantized("swinir_light", 4, DDTB)
    odm = quantized("swinir_light", 4, ODM)
    layers = len([m for m in ddtb.modules() if isinstance(m, QuantMixin) and m.weight_quant is not None])
    assert layers == 100  # 4 RSTB x 6 Swin layers x 4 linears + 4 RSTB convs
    s = storage(ddtb, "paper_like")
    assert round(s["total_k"], 1) == 160.4 and round(storage(odm, "paper_like")["total_k"], 1) == 160.4
    assert s["by_role"]["act_bound"] == pytest.approx(2 * layers / 1000)  # l, u per quantizer
    assert s["by_role"]["weight_qparam"] == pytest.approx(layers / 1000)
    assert s["by_role"]["gate_weight"] == s["by_role"]["gate_norm"] == 0.0
    assert s["total_k"] == pytest.approx(storage(odm, "full")["total_k"])
    assert round(storage(ddtb, "full")["total_k"], 1) == 166.8
