"""bench/mini_repro.py: every stage it trains composes from conf/ and validates, with the budget it documents.

The script itself takes 35-75 minutes; these tests only check the configs and the table it would write.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
from helpers import check_config

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def mini_repro():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("mini_repro", BENCH / "mini_repro.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("method,bits", [("fp", 32), ("pams", 4), ("daq", 2), ("ddtb", 2), ("odm", 4), ("odm", 2)])
def test_every_stage_composes_with_the_documented_budget(mini_repro, tmp_path, method, bits):
    args = mini_repro.parse_args(["--no-progress"])
    ckpt = tmp_path / "fp" / "checkpoints" / "last.ckpt"
    cfg = mini_repro.compose_cfg(mini_repro.stage_overrides(args, method, bits, ckpt), tmp_path / method)
    check_config(cfg)
    steps = 1500 if method == "fp" else 300
    assert cfg.trainer.max_steps == steps
    assert cfg.optim.milestones == [int(0.7 * steps)]
    assert cfg.data.iters_per_epoch == (1000 if method == "fp" else 30)
    assert cfg.trainer.enable_progress_bar is False
    assert (cfg.model.name, cfg.model.kwargs.n_feats, cfg.model.scale) == ("edsr", 32, 4)
    assert cfg.data.train == "sr291"
    if method == "fp":
        assert cfg.method.name == "fp" and cfg.model.pretrained is None
    else:
        assert cfg.method.name == method and (cfg.bits.w, cfg.bits.a) == (bits, bits)
        assert cfg.model.pretrained == str(ckpt)
    if method == "odm":
        assert cfg.method.init.num_batches == 20


def test_progress_flag_reaches_the_trainer(mini_repro, tmp_path):
    args = mini_repro.parse_args(["--progress"])
    cfg = mini_repro.compose_cfg(mini_repro.stage_overrides(args, "fp", 32, Path()), tmp_path)
    assert cfg.trainer.enable_progress_bar is True


def test_table_layout(mini_repro):
    args = mini_repro.parse_args(["--fp-steps", "20", "--qat-steps", "10"])
    rows = [{"label": "Bicubic", "method": "bicubic", "bits": 32, "metrics": {"Set5": [28.4321, 0.81111]}},
            {"label": "ODM", "method": "odm", "bits": 2, "seconds": 90.0,
             "metrics": {"Set5": [30.0, 0.85], "Set14": [27.126, 0.7], "B100": [26.0, 0.66]}}]
    lines = mini_repro.markdown(rows, args).splitlines()
    assert "FP 20 steps, QAT 10 optimizer steps" in lines[0]
    assert lines[4] == "| Bicubic | – | 28.43/0.8111 | – | – |  |  |"
    assert lines[5] == "| ODM | 2 | 30.00/0.8500 | 27.13/0.7000 | 26.00/0.6600 | 1.5 | 31.50 |"
