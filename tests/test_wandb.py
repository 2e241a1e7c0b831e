"""An offline wandb run: the run directory exists, is named as documented, and holds the dashboard metrics."""

from __future__ import annotations

import numpy as np
from helpers import TINY_TRAIN, compose_config
from PIL import Image

from odm_sr.train import train


def test_offline_wandb_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [o for o in TINY_TRAIN if not o.startswith("logger=")] + [
        "logger=wandb", "method=odm", "bits=w2a2", "method.init.num_batches=2",
        "callbacks.wandb_histograms.every_n_steps=3", "callbacks.wandb_sr_crops.crop=32"]
    import wandb

    try:
        results = train(compose_config(overrides, tmp_path))
    finally:
        wandb.teardown()  # wandb keeps the mode of its first set-up in the process: let later tests set theirs
    assert results["run_name"] == "edsr-x2-odm-w2a2"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "exactly one offline run directory"
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1, "the offline run log (what `wandb sync` uploads)"
    # wandb-core writes no summary file offline; the record log is uncompressed, so keys appear verbatim
    record_log = logs[0].read_bytes()
    for key in ("edsr-x2-odm-w2a2", "train/loss_rec", "train/loss_mismatch", "train/cos", "train/weight",
                "lr/theta", "lr/act_qparams", "quant/", "val/sample_test/psnr", "val/sample_test/ssim",
                "complexity/bitops_g", "complexity/storage_k", "time/train_seconds", "hist/act/body.0.body.0",
                "hist/weight/body.0.body.2"):
        assert key.encode() in record_log, f"{key} was not logged"
    crops = list((runs[0] / "files" / "media" / "images" / "crops").glob("sample_test_*.png"))
    assert crops, "SR crops were logged"
    panel = np.asarray(Image.open(crops[0]))
    assert panel.shape[1] == 3 * panel.shape[0]  # bicubic | SR | HR, square crops
