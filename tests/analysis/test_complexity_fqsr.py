"""FQSR's storage and BitOPs (METHODS.md §6) on a tiny EDSR, counted by hand: input, weight and output quantizers on
every conv (head input and tail.1 output off), one shared clip per ResBlock add, the global add FP."""

from __future__ import annotations

import pytest
from helpers import make_method

from odm_sr.analysis.complexity import bitops, find_quantizers, storage
from odm_sr.cli.complexity import main
from odm_sr.models import build_model
from odm_sr.quant.base import Bits

# EDSR x2, 1 block, 4 features: head 3->4, block 4->4 twice, body-final 4->4, upsampler 4->16, tail.1 4->3 (3x3 each)
WEIGHTS = {"head.0": 3 * 4 * 9, "body.0.body.0": 4 * 4 * 9, "body.0.body.2": 4 * 4 * 9, "body.1": 4 * 4 * 9,
           "tail.0.0": 4 * 16 * 9, "tail.1": 4 * 3 * 9}  # 108 + 3·144 + 576 + 108 = 1224
BIASES = 4 + 4 + 4 + 4 + 16 + 3
# clips: a weight clip on all 6 convs; input clips on 5 (not head.0); output clips on 5 (not tail.1); 1 add clip
WEIGHT_CLIPS, ACT_CLIPS = 6, 5 + 5 + 1


W4A4_SC8 = Bits(w=4, a=4, sc=8)


def _tiny_fqsr():
    net = build_model("edsr", 2, n_resblocks=1, n_feats=4)
    return make_method("fqsr", {}, W4A4_SC8).quantize(net)


def test_storage_counts_every_clip_once_the_shared_add_clip_included():
    net = _tiny_fqsr()
    assert len(find_quantizers(net)) == WEIGHT_CLIPS + ACT_CLIPS  # the add's quantizer shared by both operands
    s = storage(net)
    assert sum(WEIGHTS.values()) == 1224
    assert s["by_role"]["quantized_weight"] == pytest.approx(1224 * 4 / 32 / 1000)  # 0.153 K
    assert s["by_role"]["fp"] == pytest.approx(BIASES / 1000)
    assert s["by_role"]["act_bound"] == pytest.approx(ACT_CLIPS / 1000)
    assert s["by_role"]["weight_qparam"] == pytest.approx(WEIGHT_CLIPS / 1000)
    assert s["total_k"] == pytest.approx((153 + 35 + 11 + 6) / 1000)


def test_bitops_by_hand_at_8x8():
    """MACs = H_o·W_o·C_o·C_i·9; b_w = 4 everywhere, b_a = 4 except head.0 (the image: 32). Output and add
    quantizers do not change any conv's operand widths (each conv quantizes its own input) and adds are not
    counted (§6)."""
    b = bitops(_tiny_fqsr(), (8, 8))
    macs = {"head.0": 64 * 4 * 3 * 9, "body.0.body.0": 64 * 16 * 9, "body.0.body.2": 64 * 16 * 9,
            "body.1": 64 * 16 * 9, "tail.0.0": 64 * 16 * 4 * 9, "tail.1": 256 * 3 * 4 * 9}
    assert {n: e["macs"] for n, e in b["layers"].items()} == macs
    assert {n: (e["w_bits"], e["a_bits"]) for n, e in b["layers"].items()} == {
        n: (4, 32 if n == "head.0" else 4) for n in macs}
    assert b["total"] == 6912 * 4 * 32 + 3 * 9216 * 16 + 36864 * 16 + 27648 * 16 == 2_359_296


def test_cli_counts_output_and_add_clips_at_sc_bits(capsys):
    main(["--model", "edsr_baseline", "--scale", "4", "--method", "fqsr", "--bits", "4"])
    row = [line for line in capsys.readouterr().out.splitlines() if "fqsr" in line][0]
    overhead = float(row.split("|")[5])
    assert overhead == pytest.approx((37 + 36 + 35 + 16) / 1000)  # 124 clips (tests/quant/test_fqsr.py's count)
