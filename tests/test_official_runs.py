"""``method.official=true`` (every released quirk on) composes and takes one CPU training step for PAMS, DAQ and
DDTB on EDSR and RDN (issue 9)."""

from __future__ import annotations

import pytest
from helpers import TINY_TRAIN, compose_config

from odm_sr.train import train

RDN_TINY = ["model=rdn", "model.scale=2", "+model.kwargs.G0=8", "+model.kwargs.D=2", "+model.kwargs.C=2",
            "+model.kwargs.G=4"]


@pytest.mark.parametrize("model", ["edsr", "rdn"])
@pytest.mark.parametrize("method", ["pams", "daq", "ddtb"])
def test_official_run_takes_a_training_step(tmp_path, method, model):
    overrides = TINY_TRAIN + [f"method={method}", "method.official=true", "bits=w2a2", "trainer.max_steps=1",
                              "trainer.val_check_interval=1", "test_after_fit=false",
                              "callbacks.model_checkpoint.every_n_train_steps=1"]
    if model == "rdn":  # TINY_TRAIN's model entries are EDSR's
        overrides = [o for o in overrides if not o.startswith("model")] + RDN_TINY
    results = train(compose_config(overrides, tmp_path))
    calibration = 3 if method == "ddtb" else 0  # DDTB's calibration epoch (data.iters_per_epoch=3) comes first
    assert results["steps"] == calibration + 1
    assert results["config"]["method"]["official"] is True
