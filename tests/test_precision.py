"""Precision is what the config says (issue 9): fp32 with TF32 off unless ``tf32=true``, in train, eval and
upscale alike; ``trainer.precision`` other than 32 is rejected before any work, for every method."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_TRAIN, compose_config

from odm_sr import eval as eval_cli
from odm_sr import train as train_cli
from odm_sr import upscale as upscale_cli


class _Stop(Exception):
    """Raised by a stand-in for the first piece of real work, once the precision has been applied."""


def _stop(*args, **kwargs):
    raise _Stop


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_on():
    """Both TF32 flags on (cuDNN's PyTorch default, and what `set_float32_matmul_precision('high')` sets)."""
    saved = (*_tf32_flags(), torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


@pytest.mark.parametrize("tf32", [False, True])
def test_train_applies_tf32_to_matmul_and_cudnn(tf32_on, tmp_path, monkeypatch, tf32):
    monkeypatch.setattr(train_cli, "build_network", _stop)
    with pytest.raises(_Stop):
        train_cli.train(compose_config(TINY_TRAIN + [f"tf32={str(tf32).lower()}"], tmp_path))
    assert _tf32_flags() == (tf32, tf32)


def test_eval_and_upscale_run_in_fp32_by_default(tf32_on, tmp_path, monkeypatch):
    eval_cli.evaluate(compose_config(["scale=2", "data=sample"], tmp_path, "eval"))  # bicubic only
    assert _tf32_flags() == (False, False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    monkeypatch.setattr(upscale_cli, "load_trained", _stop)
    with pytest.raises(_Stop):
        upscale_cli.upscale_file("model.ckpt", "in.png", tmp_path / "out.png")
    assert _tf32_flags() == (False, False)


@pytest.mark.parametrize("method", ["fp", "odm", "pams", "daq", "ddtb"])
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "bf16-true", 16, 64])
def test_precision_other_than_fp32_is_rejected_before_any_work(tmp_path, method, precision):
    bits = "fp32" if method == "fp" else "w4a4"
    cfg = compose_config(TINY_TRAIN + [f"method={method}", f"bits={bits}", f"trainer.precision={precision}"],
                         tmp_path / "run")
    with pytest.raises(ValueError, match=rf"trainer\.precision={precision!r}: expected 32"):
        train_cli.train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("precision", [32, "32", "32-true"])
def test_fp32_precision_is_accepted(tmp_path, monkeypatch, precision):
    monkeypatch.setattr(train_cli, "build_network", _stop)
    with pytest.raises(_Stop):
        train_cli.train(compose_config(TINY_TRAIN + [f"trainer.precision={precision}"], tmp_path))
