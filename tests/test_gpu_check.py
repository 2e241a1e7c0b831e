"""The GPU check runs as prepared: on a simulated GPU machine (the packages it lacks are blocked, the wheel folder
provides hydra-core, omegaconf and antlr4), ``bench/gpu_check.sh --dry-run`` runs every part for one step."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WHEELS = [REPO / "bench" / "gpu-wheels", REPO.parent / "shared" / "gpu-wheels"]
# What the H200 machine has (DEVELOPERS.md: Python 3.12, torch, lightning, torchmetrics, timm, einops, onnxruntime,
# PyYAML) and what those depend on; anything else installed here is blocked in the simulation.
GPU_MACHINE_HAS = {
    "torch", "torchgen", "functorch", "triton", "torchvision", "lightning", "lightning_utilities", "torchmetrics",
    "timm", "einops", "onnxruntime", "yaml", "numpy", "PIL", "typing_extensions", "packaging", "fsspec", "filelock",
    "jinja2", "markupsafe", "networkx", "sympy", "mpmath", "tqdm", "huggingface_hub", "safetensors", "aiohttp",
    "multidict", "yarl", "frozenlist", "aiosignal", "attr", "idna", "propcache", "aiohappyeyeballs", "requests",
    "urllib3", "certifi", "charset_normalizer", "setuptools", "pkg_resources", "_distutils_hack", "pip", "nvidia",
    "cuda", "_yaml",
}


def _top(entry: str) -> str:
    return entry.split(".")[0] if not entry.endswith(".dist-info") else ""


def gpu_machine_python(root: Path) -> Path:
    """An interpreter that sees only what the GPU machine has: this venv's python with ``-S`` (no site-packages)
    and a folder of links to the allowed packages (and their dist-info) on PYTHONPATH."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    pkgs = root / "gpu_site"
    pkgs.mkdir()
    for entry in site.iterdir():
        name = entry.name
        if name.endswith(".dist-info"):
            record = entry / "RECORD"
            tops = {line.split("/")[0].split(",")[0].split(".")[0] for line in record.read_text().splitlines()
                    if line and ".dist-info/" not in line and not line.startswith("..")} if record.is_file() else set()
            keep = bool(tops) and tops <= GPU_MACHINE_HAS | {"__pycache__", "bin"}
        else:
            keep = _top(name) in GPU_MACHINE_HAS
        if keep:
            (pkgs / name).symlink_to(entry)
    wrapper = root / "python3"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{pkgs}" exec {sys.executable} -S "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def _wheel_dir() -> Path:
    found = next((d for d in WHEELS if list(d.glob("*.whl"))), None)
    if found is None:
        pytest.skip("no GPU wheels: run `make gpu-wheels` (bench/gpu-wheels) or provide ../shared/gpu-wheels")
    return found


def _top_levels(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {n.split("/")[0].removesuffix(".py") for n in z.namelist() if ".dist-info/" not in n}


def test_the_wheels_are_the_missing_packages():
    provided = set().union(*(_top_levels(w) for w in _wheel_dir().glob("*.whl")))
    assert {"hydra", "omegaconf", "antlr4"} <= provided
    assert sum(w.stat().st_size for w in _wheel_dir().glob("*.whl")) < 64 * 2**20


@pytest.mark.slow
def test_dry_run_on_a_simulated_gpu_machine(tmp_path):
    wheels = _wheel_dir()
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "GPU_WHEELS": str(wheels), "PYTHON": str(gpu_machine_python(tmp_path)),
           "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["parts"]) == ["env", "counts", "eager", "rho", "compiled"]
    assert not [n for n, r in result["parts"].items() if "error" in r]
    eager = result["parts"]["eager"]
    assert set(eager) == {"fp", "pams", "daq", "ddtb", "odm", "seconds"} and eager["odm"]["steps"] == 1
    assert result["parts"]["counts"]["odm"]["ops"] > result["parts"]["counts"]["fp"]["ops"] > 0
    assert result["parts"]["rho"]["odm"]["rho_mean"] > 0 and result["parts"]["rho"]["odm_mr_off"]["rho_mean"] is None
    compiled = result["parts"]["compiled"]  # the dry run traces with aot_eager (no CPU kernels built)
    assert {compiled[n]["backend"] for n in ("fp", "odm")} == {"aot_eager"} and compiled["odm"]["step_ms"] > 0
    provided = set().union(*(_top_levels(w) for w in wheels.glob("*.whl")))
    imported = set(result["env"]["third_party_modules"])
    assert {"hydra", "omegaconf"} <= imported  # the bench path needs them: they came from the wheels
    incidental = {"cython_runtime", "backports", "jaraco", "more_itertools"}  # Cython's, setuptools' vendored
    assert imported <= GPU_MACHINE_HAS | provided | incidental, sorted(imported - GPU_MACHINE_HAS - provided)


def test_dry_run_blocks_what_the_machine_lacks(tmp_path):
    """The simulation is real: without the wheels, the bench path fails on the first missing import, while torch
    and lightning import."""
    python = str(gpu_machine_python(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    ok = subprocess.run([python, "-c", "import torch, lightning, timm, torchmetrics, einops"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    proc = subprocess.run([python, "-c", "import sys; sys.path.insert(0, 'bench'); import _common"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    missing = re.search(r"No module named '(\w+)'", proc.stderr)  # the first of them the bench path imports
    assert proc.returncode != 0 and missing and missing.group(1) in {"hydra", "omegaconf"}, proc.stderr[-2000:]
