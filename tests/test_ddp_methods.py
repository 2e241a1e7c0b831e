"""Every method trains under 2-process DDP (Lightning's ``ddp_fork`` on CPU, gloo) through every stage of its
schedule (issue 14): PAMS's α-tracking epoch then clipping; DDTB's FP calibration epoch, its regularisation
epoch (gates unused) and the final one (gates used); ODM/LSQ's calibration then steps; DAQ; FP.

A method that leaves a parameter out of a step's graph (PAMS's detached α while tracking, the gates of DDTB's
non-dynamic quantizers) stopped DDP with "parameters that were not used". Epochs are 2 steps here.
The runs share one subprocess (one import of torch and Lightning instead of eight), so that forking never meets an
OpenMP pool the test session already started; a run that fails records its traceback and the next one runs.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import make_method

pytestmark = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                                reason="ddp_fork needs the fork start method (Linux/macOS)")

SCRIPT = textwrap.dedent("""
    import json, sys, traceback
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from helpers import TINY_TRAIN, compose_config
    from odm_sr.train import train
    import torch

    for name, overrides in json.loads(sys.argv[3]).items():
        out = Path(sys.argv[1]) / name
        print(f"=== run {name}", flush=True)
        print(f"=== run {name}", file=sys.stderr, flush=True)
        try:
            cfg = compose_config(TINY_TRAIN + ["+trainer.strategy=ddp_fork", "trainer.devices=2",
                                               "data.iters_per_epoch=2", "test_after_fit=false",
                                               "trainer.val_check_interval=100",
                                               "callbacks.model_checkpoint.every_n_train_steps=1"] + overrides,
                                 out / "run")
            train(cfg)
            ckpt = torch.load(out / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            summary = {"iterations": ckpt["odm_sr_step_count"], "steps": ckpt["global_step"]}
        except BaseException:
            summary = {"error": traceback.format_exc()}
        (out / "summary.json").write_text(json.dumps(summary))
""")

# method overrides, optimizer steps; each schedule fits in them with 2-step epochs
RUNS = {
    "fp": (["method=fp"], 2),
    "pams": (["method=pams", "bits=w2a2"], 4),  # α tracking (steps 0-1), then clipping (2-3)
    "pams_official": (["method=pams", "bits=w2a2", "method.official=true"], 4),  # α quantizes live while tracking
    "daq": (["method=daq", "bits=w2a2"], 2),
    # FP calibration (iterations 0-1, no optimizer step), gates unused + L_reg (2-3), gates used (4-5)
    "ddtb": (["method=ddtb", "bits=w2a2", "method.stages.reg_epochs=1", "method.dynamic_ratio=0.5"], 4),
    "odm": (["method=odm", "bits=w2a2", "method.init.num_batches=2"], 2),
    "lsq": (["method=lsq", "bits=w2a2", "method.init.num_batches=2"], 2),
}


def _logged(run_dir: Path, key: str) -> list[float]:
    rows = []
    for path in run_dir.glob("csv/*/metrics.csv"):
        with path.open() as f:
            rows += [float(r[key]) for r in csv.DictReader(f) if r.get(key)]
    return rows


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """All runs, one after the other, in one subprocess (its imports are paid once); each run's log by name."""
    out = tmp_path_factory.mktemp("ddp_runs")
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    runs = {name: [*overrides, f"trainer.max_steps={steps}"] for name, (overrides, steps) in RUNS.items()}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(Path(__file__).parent), json.dumps(runs)],
                          env=env, capture_output=True, text=True, timeout=1200)
    logs: dict[str, str] = {}
    for stream in (proc.stdout, proc.stderr):
        for part in stream.split("=== run ")[1:]:
            name, _, text = part.partition("\n")
            logs[name] = logs.get(name, "") + text
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, logs


@pytest.mark.parametrize("name", list(RUNS))
def test_each_method_trains_under_ddp_through_its_schedule(ddp_runs, name):
    out, logs = ddp_runs
    overrides, steps = RUNS[name]
    summary = json.loads((out / name / "summary.json").read_text())
    assert "error" not in summary, summary.get("error", "")[-4000:] + logs[name][-3000:]
    assert "Starting with 2 processes" in logs[name]
    assert summary["steps"] == steps
    run = out / name / "run"
    if name.startswith("pams"):
        assert set(_logged(run, "train/alpha_tracking")) == {0.0, 1.0}
    elif name == "ddtb":
        assert summary["iterations"] == 6  # 2 calibration iterations + 4 optimizer steps
        assert set(_logged(run, "train/gates_used")) == {0.0, 1.0}
        assert min(_logged(run, "train/dynamic_quantizers")) > 0


def test_ddp_strategy_looks_for_unused_parameters_only_where_a_method_leaves_some_out():
    from odm_sr.quant import Bits
    from odm_sr.quant.base import FullPrecision
    from odm_sr.train import ddp_strategy

    w2a2 = Bits(w=2, a=2)
    assert ddp_strategy("ddp", make_method("pams", {}, w2a2)) == "ddp_find_unused_parameters_true"
    assert ddp_strategy("ddp_fork", make_method("ddtb", {}, w2a2)) == "ddp_fork_find_unused_parameters_true"
    live = make_method("pams", {"quirks": {"alpha_grad_while_tracking": True}}, w2a2)  # α takes part in every step
    assert ddp_strategy("ddp", live) == "ddp"
    assert ddp_strategy("ddp", FullPrecision()) == "ddp"
    assert ddp_strategy("auto", make_method("pams", {}, w2a2)) == "auto"
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        ddp_strategy("ddp_find_unused_parameters_false", make_method("pams", {}, w2a2))
