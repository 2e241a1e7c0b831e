"""``eval.select_best_on``: the checkpoint of the best validation PSNR on one set is kept beside last.ckpt and the
test rows come from it, as in the released PAMS/DDTB (Set14) and DAQ (Set5) trainers (issue 9)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers import TINY_TRAIN, compose_config

from odm_sr.eval import evaluate
from odm_sr.train import train


def _val_psnr_by_step(out) -> dict[int, float]:
    rows = csv.DictReader(next(out.glob("csv/version_*/metrics.csv")).open())
    return {int(r["step"]): float(r["val/sample_test/psnr"]) for r in rows if r.get("val/sample_test/psnr")}


def test_best_checkpoint_is_kept_and_tested(tmp_path):
    out = tmp_path / "run"
    results = train(compose_config(TINY_TRAIN + ["eval.select_best_on=sample_test"], out))
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "checkpoints" / "best.ckpt").is_file()
    selected = json.loads((out / "results.json").read_text())["test_checkpoint"]
    assert selected["select_best_on"] == "sample_test" and selected["checkpoint"] == "best"
    assert selected["path"] == str(out / "checkpoints" / "best.ckpt")
    by_step = _val_psnr_by_step(out)
    assert len(by_step) == 2  # validations after steps 3 and 6
    best_step = max(by_step, key=by_step.get)
    assert selected["val_psnr"] == pytest.approx(max(by_step.values()), abs=1e-4)
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == best_step + 1  # the csv logger's step is 0-based
    # the test rows are those of best.ckpt (here the validation set is also the test set)
    rows = evaluate(compose_config([f"ckpt={out / 'checkpoints' / 'best.ckpt'}", "data=sample"], tmp_path, "eval"))
    name = results["run_name"]
    assert results["metrics"][name]["sample_test"]["psnr"] == pytest.approx(rows[name]["sample_test"][0], abs=1e-6)
    assert results["metrics"][name]["sample_test"]["psnr"] == pytest.approx(selected["val_psnr"], abs=1e-4)


def test_select_best_on_must_name_a_validation_set(tmp_path):
    with pytest.raises(ValueError, match=r"eval\.select_best_on='Set14': expected one of the validation sets"):
        train(compose_config(TINY_TRAIN + ["eval.select_best_on=Set14"], tmp_path))
