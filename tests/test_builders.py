"""Config → objects: every model config builds its backbone (empty ``kwargs`` included)."""

from __future__ import annotations

from helpers import compose_config

from odm_sr.builders import build_backbone


def test_model_configs_with_empty_kwargs_build(tmp_path):
    net = build_backbone(compose_config(["model=edsr_baseline"], tmp_path).model)
    assert sum(p.numel() for n, p in net.named_parameters() if "mean" not in n) == 1_517_571  # METHODS.md §2.1
    small = build_backbone(compose_config(["model=edsr_small"], tmp_path).model)
    assert len(small.body) == 4 + 1  # 4 ResBlocks + the body-final conv
