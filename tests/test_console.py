"""The console filters drop exactly the three known texts; expected errors of the commands are one line, with the
traceback on request (odm_sr.console)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from odm_sr.cli.complexity import main as complexity_main
from odm_sr.cli.export import main as export_main
from odm_sr.cli.upscale import main as upscale_main
from odm_sr.console import _NO_TIPS, _TIP_LOGGERS, one_line_errors, quiet_known_noise


def test_only_the_known_texts_are_dropped(caplog):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()
        warnings.warn("Using ModelCheckpoint with manual optimization and every_n_train_steps, but ...", UserWarning,
                      stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("method=odm starts from RANDOM weights", UserWarning, stacklevel=1)
        # the same text in another category is kept
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["method=odm starts from RANDOM weights",
                                              "`isinstance(treespec, LeafSpec)` is deprecated"]
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    try:
        with caplog.at_level(logging.INFO):
            rank_zero_info("💡 Tip: For seamless cloud logging ...")
            rank_zero_info("GPU available: False")
        assert [r.getMessage() for r in caplog.records] == ["GPU available: False"]
    finally:
        for name in _TIP_LOGGERS:
            logging.getLogger(name).removeFilter(_NO_TIPS)


# -- expected errors as one line (issue 22, item 21) ---------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def _cli(module: str, *args: str, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO / "src")}
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_odm_sr_train_shows_a_bad_value_as_one_line_and_the_traceback_on_request(tmp_path):
    args = ("trainer.max_steps=0", f"hydra.run.dir={tmp_path}")
    done = _cli("odm_sr.cli.train", *args)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        "odm-sr-train: error: trainer.max_steps=0: expected a positive number"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    full = _cli("odm_sr.cli.train", *args, full_error=True)
    assert full.returncode == 1 and "Traceback" in full.stderr and "trainer.max_steps=0" in full.stderr


def test_odm_sr_eval_shows_a_missing_checkpoint_as_one_line(tmp_path):
    done = _cli("odm_sr.cli.eval", f"ckpt={tmp_path / 'none.ckpt'}", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("odm-sr-eval: error: ")
    assert str(tmp_path / "none.ckpt") in done.stderr


def test_odm_sr_upscale_one_line_and_traceback_switch(tmp_path):
    args = [str(tmp_path / "none.ckpt"), str(tmp_path / "in.png"), str(tmp_path / "out.png")]
    with pytest.raises(SystemExit) as stop:
        upscale_main(args)
    assert str(stop.value.code).startswith("odm-sr-upscale: error: ") and "none.ckpt" in str(stop.value.code)
    with pytest.raises(FileNotFoundError):  # --traceback: the error itself, with its traceback
        upscale_main([*args, "--traceback"])


def test_odm_sr_export_and_complexity_show_a_user_error_as_one_line(tmp_path):
    missing = tmp_path / "none.ckpt"
    with pytest.raises(SystemExit) as stop:
        export_main([str(missing), str(tmp_path / "m.onnx")])
    assert str(stop.value.code).startswith("odm-sr-export: error: ") and str(missing) in str(stop.value.code)
    with pytest.raises(FileNotFoundError):
        export_main([str(missing), str(tmp_path / "m.onnx"), "--traceback"])
    refused = ["--model", "imdn", "--method", "odm_fq", "--bits", "4"]  # ODM-FQ is EDSR-only
    with pytest.raises(SystemExit) as stop:
        complexity_main(refused)
    assert str(stop.value.code).startswith("odm-sr-complexity: error: ") and "\n" not in str(stop.value.code)
    with pytest.raises(ValueError):
        complexity_main([*refused, "--traceback"])


def test_a_bug_keeps_its_traceback():
    with pytest.raises(TypeError), one_line_errors("odm-sr-x"):
        raise TypeError("a bug, not a user error")
    with pytest.raises(SystemExit, match=r"^odm-sr-x: error: bad$"), one_line_errors("odm-sr-x"):
        raise ValueError("bad")
