"""The GPU run of the real-network study as prepared (bench/gpu_real.sh): its dry run on a simulated GPU machine
(only the packages that machine has, plus the wheels), and the step plan and schedule scaling by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_gpu_check import GPU_MACHINE_HAS, _top_levels, _wheel_dir, gpu_machine_python

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_real  # noqa: E402


def test_scaled_schedule_by_hand():
    # ODM's real schedule: 1000 steps, epochs of 100, x0.5 at 250/500/750 -> 1400 steps: epochs of 140,
    # milestones 350/700/1050; 2 steps (dry run): epochs of 1, milestones rounded up to at least 1
    assert gpu_real.scaled_schedule(1000, 100, [250, 500, 750], 1400) == {
        "trainer.max_steps": 1400, "data.iters_per_epoch": 140, "optim.milestones": [350, 700, 1050]}
    assert gpu_real.scaled_schedule(1000, 100, [333, 667], 2)["optim.milestones"] == [1, 1]


def test_plan_steps_by_hand():
    # 400 s, overheads 30+20+20+20 = 90 s; per step 1.25 * (0.05 + 0.04 + 0.03 + 0.04 * 1.1) = 0.205 s
    # -> (400 - 90) / 0.205 = 1512.2 -> 1512
    steps = {"odm": 0.05, "pams": 0.04, "daq": 0.03, "ddtb": 0.04}
    overhead = {"odm": 30.0, "pams": 20.0, "daq": 20.0, "ddtb": 20.0}
    assert gpu_real.plan_steps(steps, overhead, 400.0, 1.25, 100, 20000) == 1512
    assert gpu_real.plan_steps(steps, overhead, 100.0, 1.25, 100, 20000) == 100  # floor: min_steps
    assert gpu_real.plan_steps(steps, overhead, 1e6, 1.25, 100, 5000) == 5000


def test_find_root_order_and_error(tmp_path, monkeypatch):
    good = tmp_path / "data"
    (good / "train" / "BSD200" / "HR").mkdir(parents=True)
    monkeypatch.setenv("ODM_SR_DATA", str(good))
    assert gpu_real.find_root("ODM_SR_DATA", "data", ("train/BSD200/HR",)) == good.resolve()
    monkeypatch.setenv("ODM_SR_DATA", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"no nothing folder with x/y \(looked at .*empty, .*shared/nothing"):
        gpu_real.find_root("ODM_SR_DATA", "nothing", ("x/y",))


@pytest.mark.slow
def test_dry_run_on_a_simulated_gpu_machine(tmp_path, data_root, models_root):
    wheels = _wheel_dir()
    out = tmp_path / "gpu_real.json"
    env = {**os.environ, "GPU_WHEELS": str(wheels), "PYTHON": str(gpu_machine_python(tmp_path)),
           "OMP_NUM_THREADS": "1", "ODM_SR_DATA": str(data_root), "ODM_SR_MODELS": str(models_root)}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", "bench/gpu_real.sh", "--dry-run", "--out", str(out), "--work",
                           str(tmp_path / "runs")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    parts = result["parts"]
    assert list(parts) == ["env", "data", "fp", "plan", "odm", "pams", "daq", "ddtb"]
    assert not [n for n, r in parts.items() if "error" in r]
    assert abs(parts["fp"]["Set5"]["psnr"] - 32.21) < 0.02  # the official weights, evaluated as published
    for method in gpu_real.METHODS:
        assert parts[method]["steps"] >= 2 and "Set5" in parts[method], parts[method]
        assert parts["plan"]["step_time"][method]["step_ms"] > 0
    assert parts["odm"]["rho_mean"] > 0 and parts["pams"]["rho_mean"] is None
    imported = set(result["env"]["third_party_modules"])
    provided = set().union(*(_top_levels(w) for w in wheels.glob("*.whl")))
    incidental = {"cython_runtime", "backports", "jaraco", "more_itertools"}
    assert imported <= GPU_MACHINE_HAS | provided | incidental, sorted(imported - GPU_MACHINE_HAS - provided)
