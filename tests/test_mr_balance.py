"""ODM's MR balance reaches the loggers (``mr/`` panels) and results.json (issue: does ODM's mechanism act?)."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import TINY_TRAIN, compose_config

from odm_sr.train import train


@pytest.fixture(scope="module")
def odm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("odm")
    overrides = TINY_TRAIN + ["method=odm", "bits=w2a2", "method.init.num_batches=2", "method.lambda_m=1e-3",
                              "eval.bicubic_row=false",  # TINY_TRAIN logs every step
                              "analyze.after_fit=[mismatch,variance]", "analyze.data=sample_test"]
    return out, train(compose_config(overrides, out))


def _rows(out):
    with open(next(out.glob("csv/version_*/metrics.csv"))) as f:
        return list(csv.DictReader(f))


def test_rho_is_logged_every_step_and_its_mean_is_in_results(odm_run):
    out, results = odm_run
    rows = _rows(out)
    rho = [float(r["mr/rho"]) for r in rows if r.get("mr/rho")]
    assert len(rho) == 6 and all(v > 0 for v in rho)
    saved = json.loads((out / "results.json").read_text())
    assert saved["mr_balance"]["steps"] == 6
    assert saved["mr_balance"]["rho_mean"] == pytest.approx(sum(rho) / len(rho), rel=1e-6)
    # ρ is what MR contributes relative to L_R: λ_M·w·‖g_M‖/‖g_R‖ from the logged factors of the same step
    for r in (r for r in rows if r.get("mr/rho")):
        expected = 1e-3 * float(r["train/weight"]) * float(r["train/grad_norm_mismatch"]) / float(
            r["train/grad_norm_rec"])
        assert float(r["mr/rho"]) == pytest.approx(expected, rel=1e-5)


def test_per_layer_rho_and_mismatch(odm_run):
    out, _ = odm_run
    rows = _rows(out)
    layer_keys = sorted(k for k in rows[0] if k.startswith("mr/") and k != "mr/rho")
    assert "mr/body.0.body.0/rho" in layer_keys and "mr/body.0.body.0/mismatch" in layer_keys
    assert len(layer_keys) == 2 * 2  # one block of EDSR: two quantized convs, each with ρ_i and M_i
    logged = [r for r in rows if r.get("mr/body.0.body.0/mismatch")]
    assert len(logged) == 6 and all(float(r["mr/body.0.body.0/mismatch"]) > 0 for r in logged)
    # the block's first conv is upstream of the second conv's quantized input, the second conv of none
    assert all(float(r["mr/body.0.body.0/rho"]) > 0 and float(r["mr/body.0.body.2/rho"]) == 0 for r in logged)


def test_fp_run_has_no_balance(tmp_path):
    results = train(compose_config(TINY_TRAIN + ["trainer.max_steps=2", "eval.bicubic_row=false"], tmp_path))
    assert results["mr_balance"] == {"rho_mean": None, "steps": 0}


def test_analyses_after_fit_are_written_and_summarised(odm_run):
    out, results = odm_run
    mismatch = json.loads((out / "analysis" / "mismatch.json").read_text())
    variance = json.loads((out / "analysis" / "variance.json").read_text())
    own = mismatch["results"]["odm"]
    assert mismatch["data"] == "sample_test" and own["num_images"] == 2
    assert results["analysis"]["mismatch"] == {"data": "sample_test", "mismatch": own["mismatch"],
                                               "var_mean": own["var_mean"], "var_std": own["var_std"]}
    assert results["analysis"]["variance"]["image_wise"] == variance["image_wise"] > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["analysis"] == results["analysis"]


def test_unknown_analysis_is_rejected_before_any_work(tmp_path):
    from odm_sr.train import check_values

    cfg = compose_config(TINY_TRAIN + ["analyze.after_fit=[mismatch,timing]"], tmp_path)
    with pytest.raises(ValueError, match=r"analyze.after_fit.*timing"):
        check_values(cfg)
