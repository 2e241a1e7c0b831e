"""Real 2-process DDP training runs on CPU (Lightning's ``ddp_fork`` strategy, gloo), ODM W2A2 through
``train(cfg)``: the test metrics it reports are those of the whole test set, equal to a single-process
evaluation of the checkpoint it wrote; and a run stopped mid-epoch resumes to the weights and metrics of an
uninterrupted one.

Runs in a subprocess, so that forking never meets an OpenMP pool the test session already started.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                                reason="ddp_fork needs the fork start method (Linux/macOS)")

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from helpers import TINY_TRAIN, compose_config
    from odm_sr.eval import evaluate
    from odm_sr.train import train

    out = Path(sys.argv[1])
    cfg = compose_config(TINY_TRAIN + ["method=odm", "bits=w2a2", "method.init.num_batches=2",
                                       "+trainer.strategy=ddp_fork", "trainer.devices=2"], out / "run")
    results = train(cfg)
    ecfg = compose_config([f"ckpt={out / 'run' / 'checkpoints' / 'last.ckpt'}", "data=sample"], out / "eval", "eval")
    rows = evaluate(ecfg)
    (out / "summary.json").write_text(json.dumps({"train": results["metrics"], "eval": rows,
                                                  "run_name": results["run_name"]}))
""")


def test_ddp_test_metrics_equal_a_single_process_evaluation(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Starting with 2 processes" in proc.stderr + proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    name = summary["run_name"]
    assert saved["metrics"] == summary["train"]
    # sample_test holds 2 images: each rank tests one, so a per-rank mean would be one image's PSNR
    got, want = summary["train"][name]["sample_test"], summary["eval"][name]["sample_test"]
    assert got["psnr"] == pytest.approx(want[0], abs=1e-4) and got["ssim"] == pytest.approx(want[1], abs=1e-5)
    bicubic = summary["eval"]["bicubic"]["sample_test"][0]
    assert summary["train"]["bicubic"]["sample_test"]["psnr"] == pytest.approx(bicubic)


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, sys.argv[2])
    from helpers import TINY_TRAIN, compose_config
    from odm_sr.train import train

    out = Path(sys.argv[1])
    # epochs of 4 steps per rank, checkpoints every 3: the stop at step 3 lies mid-epoch
    base = TINY_TRAIN + ["method=odm", "bits=w2a2", "method.init.num_batches=2", "+trainer.strategy=ddp_fork",
                         "trainer.devices=2", "data.iters_per_epoch=4", "eval.bicubic_row=false"]
    full = train(compose_config(base, out / "full"))
    train(compose_config(base + ["trainer.max_steps=3"], out / "stopped"))
    ckpt = out / "stopped" / "checkpoints" / "last.ckpt"
    stopped_step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    resumed = train(compose_config(base + [f"resume={ckpt}"], out / "stopped"))
    states = [torch.load(out / d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
              for d in ("full", "stopped")]
    same = all(torch.equal(states[0]["state_dict"][k], states[1]["state_dict"][k]) for k in states[0]["state_dict"])
    (out / "summary.json").write_text(json.dumps({
        "full": full["metrics"], "resumed": resumed["metrics"], "stopped_step": stopped_step,
        "steps": [s["global_step"] for s in states], "same_weights": same,
        "same_keys": set(states[0]["state_dict"]) == set(states[1]["state_dict"])}))
""")


def test_ddp_run_stopped_mid_epoch_resumes_to_the_same_weights(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path), str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_step"] == 3 and summary["steps"] == [6, 6]
    assert summary["same_keys"] and summary["same_weights"], "resumed DDP weights differ"
    assert summary["resumed"] == summary["full"]
