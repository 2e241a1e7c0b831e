"""The analysis notebooks run end to end on a tiny trained checkpoint (nbclient, the current interpreter)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from helpers import TINY_TRAIN, compose_config

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "odm-sr-test"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 6-step 2-bit ODM training of a 1-block EDSR on the embedded sample set."""
    import torch

    from odm_sr.train import train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny_odm")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "disabled")
    try:
        train(compose_config(TINY_TRAIN + ["method=odm", "bits=w2a2", "method.init.num_batches=2"], out))
    finally:
        mp.undo()
    return out


def kernelspec(folder: Path) -> Path:
    """A kernelspec for this interpreter (so the kernel sees the same packages whether or not ``python3`` is
    registered for it); JUPYTER_PATH=<returned folder> makes it visible."""
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "odm-sr test", "language": "python"}))
    return folder


async def _execute_all(paths: list[Path]) -> list:
    clients = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        clients.append(nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=120,
                                               resources={"metadata": {"path": str(NOTEBOOKS)}}))
    return await asyncio.gather(*(c.async_execute() for c in clients))


def test_notebooks_are_stripped():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), path.name
        assert "parameters" in code[0].metadata.get("tags", []), path.name


@pytest.mark.slow
def test_notebooks_run(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernelspec(tmp_path / "jupyter")))
    monkeypatch.setenv("ODM_SR_CKPT", str(tiny_run / "checkpoints" / "last.ckpt"))
    monkeypatch.setenv("ODM_SR_SWEEP_DIR", str(tiny_run))
    monkeypatch.setenv("ODM_SR_DATASET", "sample_test")
    monkeypatch.setenv("ODM_SR_LIMIT", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert [p.name[:3] for p in paths] == ["01_", "02_", "03_", "04_"]
    executed = asyncio.run(_execute_all(paths))
    for path, nb in zip(paths, executed, strict=True):
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: {errors}"
    figures = [o for nb in executed for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if "image/png" in o.get("data", {})]
    assert len(figures) >= 4  # one figure per notebook at least
