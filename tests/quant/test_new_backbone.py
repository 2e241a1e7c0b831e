"""Adding a backbone touches one place: a tiny VDSR-like plain conv net, defined here and registered in the
backbone table (``quant.backbones``), trains one step under every static method and reports its complexity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import compose_config, method_config, quantize_and_train_one_step
from torch import nn

from odm_sr.analysis.complexity import summarize
from odm_sr.models.base import SRModel
from odm_sr.quant import build_method
from odm_sr.quant.backbones import BACKBONES, Backbone, register_backbone


class TinyVDSR(SRModel):
    """VDSR-like (an ``SRModel``: ``name``, ``scale``, ``pixel_range``): bicubic upsampling, head conv,
    ``depth`` conv+ReLU blocks, tail conv, global residual."""

    def __init__(self, scale: int = 2, feats: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.name, self.scale, self.pixel_range = "vdsr_tiny", scale, 255.0
        self.head = nn.Conv2d(3, feats, 3, padding=1)
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(feats, feats, 3, padding=1), nn.ReLU())
                                    for _ in range(depth)])
        self.tail = nn.Conv2d(feats, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return up + self.tail(self.body(self.head(up)))


def _tail(model: nn.Module) -> nn.Module:
    return model.tail


@pytest.fixture
def vdsr_row():
    spec = register_backbone(Backbone(family="vdsr", rules={"body_convs": (r"body\.\d+\.0",)}, skt_feature=_tail))
    yield spec
    del BACKBONES["vdsr"]


# Hand counts at LR 8x8, x2 (the convs run at 16x16 = 256 pixels), 2 body convs of 8 -> 8 channels:
HEAD_MACS = TAIL_MACS = 256 * 8 * 3 * 9  # 55 296
BODY_MACS = 256 * 8 * 8 * 9  # 147 456 per conv
FP_MACS = HEAD_MACS + TAIL_MACS + 2 * BODY_MACS  # 405 504
FP_PARAMS = (3 * 8 * 9 + 8) + 2 * (8 * 8 * 9 + 8) + (8 * 3 * 9 + 3)  # 1611
W2_BODY = 2 * (8 * 8 * 9 * 2 / 32 + 8)  # two 2-bit weights and their FP biases: 88
W2A2_BITOPS = (HEAD_MACS + TAIL_MACS) * 32 * 32 + 2 * BODY_MACS * 2 * 2
DAQ_STAT_OPS = 2 * 4 * (8 * 16 * 16) * 32 * 32  # 4 FP ops per input element of each activation quantizer
# quantizer parameters per quantized conv: ODM l_a, u_a, γ_w; LSQ l_a, u_a, s; PAMS α; DDTB l, u (no gate is
# dynamic: ⌊2·0.3⌋ = 0); DAQ none
CASES = {
    "fp": (32, FP_PARAMS, FP_MACS * 32 * 32),
    "odm": (2, FP_PARAMS - 2 * 584 + W2_BODY + 2 * 3, W2A2_BITOPS),
    "lsq": (2, FP_PARAMS - 2 * 584 + W2_BODY + 2 * 3, W2A2_BITOPS),
    "pams": (2, FP_PARAMS - 2 * 584 + W2_BODY + 2 * 1, W2A2_BITOPS),
    "ddtb": (2, FP_PARAMS - 2 * 584 + W2_BODY + 2 * 2, W2A2_BITOPS),
    "daq": (2, FP_PARAMS - 2 * 584 + W2_BODY, W2A2_BITOPS + DAQ_STAT_OPS),
}


@pytest.mark.parametrize("method_name", list(CASES))
def test_registered_backbone_trains_and_reports_complexity(vdsr_row, method_name, tmp_path):
    bits, params, bitops = CASES[method_name]
    cfg = compose_config([f"method={method_name}", f"bits={'fp32' if bits == 32 else 'w2a2'}",
                          "data.iters_per_epoch=1"], tmp_path)
    method = build_method(cfg.method, cfg.bits)
    net = quantize_and_train_one_step(method, TinyVDSR)
    quantized = [n for n, m in net.named_modules() if type(m).__name__.startswith("Quant")]
    assert quantized == ([] if bits == 32 else ["body.0.0", "body.1.0"])
    counts = summarize(net, method_name, bits, (8, 8), dynamic_ratio=method.gate_ratio())
    assert counts["complexity/macs_g"] == pytest.approx(FP_MACS / 1e9, rel=1e-12)
    assert counts["complexity/storage_k"] == pytest.approx(params / 1000, rel=1e-12)
    assert counts["complexity/bitops_g"] == pytest.approx(bitops / 1e9, rel=1e-12)


def test_unregistered_backbone_is_refused():
    with pytest.raises(ValueError, match="no placement rule for backbone 'vdsr_tiny'"):
        build_method(method_config("odm"), {"w": 2, "a": 2}).quantize(TinyVDSR())
