"""method=quantsr through odm-sr-train: it trains, evaluates from its checkpoint, and a run killed mid-epoch resumes to
the same weights and metrics, the first-batch sign and step decisions included (they are buffers)."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_TRAIN, KillAt, compose_config, last_state

from odm_sr.eval import evaluate
from odm_sr.train import train

RUN = TINY_TRAIN + ["method=quantsr", "bits=w2a2", "trainer.max_steps=8",
                    "callbacks.model_checkpoint.every_n_train_steps=2", "eval.bicubic_row=false"]



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and the same run killed after step 5 (last checkpoint: step 4) then resumed."""
    import odm_sr.train as train_mod

    out = tmp_path_factory.mktemp("quantsr")
    results = train(compose_config(RUN, out / "full"))
    real = train_mod.build_callbacks
    train_mod.build_callbacks = lambda cfg: real(cfg) + [KillAt(5)]
    try:
        with pytest.raises(SystemExit):  # Lightning shuts down gracefully on the interrupt, then exits
            train(compose_config(RUN, out / "killed"))
    finally:
        train_mod.build_callbacks = real
    killed_state = last_state(out / "killed")
    resumed = train(compose_config(RUN + [f"resume={out / 'killed' / 'checkpoints' / 'last.ckpt'}"], out / "killed"))
    return out, results, killed_state, resumed


def test_trains_reports_complexity_and_evaluates_from_its_checkpoint(runs, tmp_path):
    out, results, _, _ = runs
    out = out / "full"
    state, step = last_state(out)
    assert step == 8 and results["steps"] == 8
    decided = {k: v for k, v in state.items() if k.endswith("act_quant.initialized")}
    assert len(decided) == 2 and all(bool(v) for v in decided.values())  # both convs of the one block
    assert results["complexity"]["complexity/overhead_k"] > 0  # the shifts and steps
    rows = evaluate(compose_config([f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "data=sample"], tmp_path, "eval"))
    (own_row,) = [v for k, v in rows.items() if k != "bicubic"]
    (trained,) = results["metrics"].values()  # the run's own test row
    assert set(own_row) == set(trained) and own_row  # same sets; the eval of the checkpoint gives the run's numbers
    for name, (psnr, ssim) in own_row.items():
        assert psnr == pytest.approx(trained[name]["psnr"], abs=1e-6), name
        assert ssim == pytest.approx(trained[name]["ssim"], abs=1e-6), name


def test_killed_run_resumes_to_the_same_weights_and_metrics(runs):
    out, results, (state, step), resumed = runs
    assert step == 4  # the last checkpoint before the kill, mid-epoch (epochs of 3 steps)
    reference, _ = last_state(out / "full")
    signed = [k for k in reference if k.endswith("act_quant.signed")]
    assert signed and all(torch.equal(state[k], reference[k]) for k in signed)  # decided at step 0, kept
    final, step = last_state(out / "killed")
    assert step == 8 and set(final) == set(reference)
    assert [k for k in reference if not torch.equal(final[k], reference[k])] == [], "resumed weights differ"
    assert resumed["metrics"] == results["metrics"]
