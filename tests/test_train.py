"""End-to-end: a tiny full-precision training through ``train(cfg)``, then eval and upscale of its checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN, compose_config
from PIL import Image

from odm_sr.train import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(TINY_TRAIN, out)
    results = train(cfg)
    return out, results


def test_training_writes_results_and_checkpoints(tiny_run):
    out, results = tiny_run
    assert results["steps"] == 6
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["metrics"]) == {"bicubic", saved["run_name"]}
    for row in saved["metrics"].values():
        psnr, ssim = row["sample_test"]["psnr"], row["sample_test"]["ssim"]
        assert math.isfinite(psnr) and 10 < psnr < 60 and 0 < ssim <= 1
    assert (out / "checkpoints" / "last.ckpt").is_file()
    # eval.select_best_on=null (default): the test rows are those of the last weights, and no best.ckpt is kept
    assert saved["test_checkpoint"] == {"select_best_on": None, "checkpoint": "last", "path": None, "val_psnr": None}
    assert not (out / "checkpoints" / "best.ckpt").exists()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["odm_sr_step_count"] == 6
    # the csv logger received losses and learning rates
    metrics_csv = next(out.glob("csv/version_*/metrics.csv")).read_text()
    assert "train/loss_rec" in metrics_csv and "lr/net" in metrics_csv and "val/sample_test/psnr" in metrics_csv


def test_eval_of_checkpoint_matches_training_test(tiny_run, tmp_path):
    from odm_sr.eval import evaluate

    out, results = tiny_run
    cfg = compose_config([f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "data=sample"], tmp_path, "eval")
    rows = evaluate(cfg)
    name = results["run_name"]
    assert rows[name]["sample_test"][0] == pytest.approx(results["metrics"][name]["sample_test"]["psnr"], abs=1e-6)
    assert rows["bicubic"]["sample_test"][0] == pytest.approx(results["metrics"]["bicubic"]["sample_test"]["psnr"])


def test_upscale_writes_an_image_of_scale_times_the_input(tiny_run, tmp_path):
    from odm_sr.upscale import main as upscale_main

    out, _ = tiny_run
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(src)
    dst = tmp_path / "sub" / "out.png"
    upscale_main([str(out / "checkpoints" / "last.ckpt"), str(src), str(dst), "--tile", "8"])
    assert Image.open(dst).size == (60, 40)


def test_eval_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    from odm_sr.checkpoint import read_checkpoint

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.ckpt"):
        read_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        read_checkpoint(tmp_path / "missing.ckpt")
