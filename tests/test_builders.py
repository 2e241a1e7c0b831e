"""Config → objects: every model config builds its backbone (empty ``kwargs`` included)."""

from __future__ import annotations

import pytest
from helpers import compose_config

from odm_sr.builders import build_backbone


def test_model_configs_with_empty_kwargs_build(tmp_path):
    net = build_backbone(compose_config(["model=edsr_baseline"], tmp_path).model)
    assert sum(p.numel() for n, p in net.named_parameters() if "mean" not in n) == 1_517_571  # METHODS.md §2.1
    small = build_backbone(compose_config(["model=edsr_small"], tmp_path).model)
    assert len(small.body) == 4 + 1  # 4 ResBlocks + the body-final conv


def _drop_path_rates(net) -> list[float]:
    from timm.layers import DropPath

    return [m.drop_prob for m in net.modules() if isinstance(m, DropPath)]


@pytest.mark.parametrize("model", ["swinir_light", "hat_s"])
def test_drop_path_rate_is_a_model_key(tmp_path, model):
    """SwinIR/HAT stochastic depth: ``model.drop_path_rate`` (default the official 0.1) sets the last Swin layer's
    rate, the others rise linearly from 0; 0 removes every DropPath."""
    cfg = compose_config([f"model={model}", "model.scale=2"], tmp_path).model
    assert cfg.drop_path_rate == 0.1
    rates = _drop_path_rates(build_backbone(cfg))
    assert rates and max(rates) == pytest.approx(0.1)
    off = compose_config([f"model={model}", "model.scale=2", "model.drop_path_rate=0"], tmp_path).model
    assert _drop_path_rates(build_backbone(off)) == []
