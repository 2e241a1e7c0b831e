"""The package as a user installs it: ``pip wheel .`` installed (without dependencies) in a fresh venv that sees
the dependencies of the running one trains ``experiment=main_fp`` and then ``main_odm`` for a few steps from
another folder. Fails where anything reads files of the source checkout (conf/, src/) at run time."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FEW_STEPS = ["trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.model_checkpoint.every_n_train_steps=2",
             "data.batch_size=2", "data.lr_patch=16", "trainer.enable_progress_bar=false", "logger=csv"]


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding only the odm-sr wheel; its .pth shows it the running interpreter's site-packages."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: pip builds in the tree it is given (build/, *.egg-info)
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("conf", "src"):  # src/odm_sr/conf stays a link to conf/
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp / "dist")], tmp)
    wheel = next((tmp / "dist").glob("odm_sr-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).strip())
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # the deps, not odm_sr's sources
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], tmp)
    return venv


def test_the_installed_wheel_trains_main_fp_and_main_odm_from_another_folder(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ODM_SR_CONF")}
    env.update(WANDB_MODE="disabled", ODM_SR_DATA=str(REPO.parent / "shared" / "data"))
    probe = "import odm_sr.config as c; print(c.__file__, c.CONFIG_DIR)"
    where = _run([str(installed / "bin" / "python"), "-c", probe], tmp_path, env)
    assert str(installed) in where and str(REPO) not in where, where  # the installed copy, its packaged conf/
    train = str(installed / "bin" / "odm-sr-train")
    _run([train, "experiment=main_fp", *FEW_STEPS, "test_after_fit=false", "hydra.run.dir=fp"], tmp_path, env)
    fp = tmp_path / "fp" / "checkpoints" / "last.ckpt"
    assert fp.is_file() and (tmp_path / "fp" / "results.json").is_file()
    out = _run([train, "experiment=main_odm", *FEW_STEPS, "method.init.num_batches=2", f"model.pretrained={fp}",
                "hydra.run.dir=odm"], tmp_path, env)
    assert (tmp_path / "odm" / "results.json").is_file() and "| edsr-x4-odm-w2a2 |" in out  # its test row
