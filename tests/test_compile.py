"""``trainer.compile=true``: the student runs through torch.compile in the LightningModule, one training step works,
the graph-break count is reported once, and the state-dict keys stay those of the eager network."""

from __future__ import annotations

import pytest
import torch
from helpers import bare_step_module, make_method

from odm_sr.lit_module import SRLitModule
from odm_sr.models import build_model
from odm_sr.quant import Bits
from odm_sr.train import LIT_TRAINER_KEYS, lightning_trainer_config


def _module(backend: str | None) -> SRLitModule:
    torch.manual_seed(0)
    net = build_model("edsr", 2, n_resblocks=1, n_feats=8, res_scale=1.0)
    method = make_method("odm", {"init": {"num_batches": 1}, "mr": {"mode": "off"}}, Bits(w=2, a=2))
    net = method.quantize(net)
    method.calibrate(net, [torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(3)) * 255])
    return bare_step_module(net, method, compile_backend=backend)


def test_one_training_step_with_compile_matches_eager(capsys):
    pytest.importorskip("torch._dynamo")
    gen = torch.Generator().manual_seed(10)
    batch = {"lr": torch.rand(2, 3, 12, 12, generator=gen), "hr": torch.rand(2, 3, 24, 24, generator=gen)}
    eager, compiled = _module(None), _module("aot_eager")  # aot_eager: no C++ toolchain needed, same graphs
    keys = list(compiled.net.state_dict())
    for lit in (eager, compiled):
        lit.on_fit_start()
        lit.training_step(batch, 0)
    assert eager.graph_breaks is None and isinstance(compiled.graph_breaks, int) and compiled.graph_breaks >= 0
    assert "trainer.compile (aot_eager):" in capsys.readouterr().out
    assert list(compiled.net.state_dict()) == keys  # compiled in place: no _orig_mod. prefix
    for a, b in zip(eager.net.parameters(), compiled.net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # one Adam step from the same gradients
    compiled.training_step(batch, 1)  # reported once: no second report
    assert "trainer.compile" not in capsys.readouterr().out


def test_compile_keys_are_not_passed_to_the_lightning_trainer():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load("conf/trainer/default.yaml")
    assert cfg.compile is False and cfg.compile_backend == "inductor"
    cfg.default_root_dir = "/tmp/x"
    trainer_kwargs = lightning_trainer_config(cfg)
    assert not set(LIT_TRAINER_KEYS) & set(trainer_kwargs) and trainer_kwargs["max_steps"] == 60000
