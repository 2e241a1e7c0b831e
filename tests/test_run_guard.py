"""A run's folder and process (issue 22, items 4, 18 and 20): SIGTERM exits 143 naming the last checkpoint (a real
subprocess sent a real SIGTERM) and `make train` stops there; a checkpoint write on a full disk names the file and
the cause and keeps the previous one; one writer per run folder, stale locks replaced."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAIN, compose_config

from odm_sr.run_guard import LOCK_NAME, SIGTERM_EXIT, RunFolderBusyError, run_folder_lock
from odm_sr.train import train

REPO = Path(__file__).resolve().parents[1]
QUIET = TINY_TRAIN + ["eval.bicubic_row=false"]

# Runs odm-sr-train (its Hydra entry) with a hook on SRLitModule.<phase>: from iteration <from_step> on (a training
# step; for test_step any batch) it prints READY and sleeps, so that the signal lands in the middle of that phase.
# With "self" as the 4th argument the process sends SIGTERM to itself instead (the Makefile test).
DRIVER = textwrap.dedent("""
    import os, signal, sys, time
    from odm_sr.lit_module import SRLitModule
    from odm_sr.cli.train import main

    phase, from_step, who = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    real = getattr(SRLitModule, phase)

    def hooked(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.global_step_count >= from_step:
            if who == "self":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                print("READY", flush=True)
                time.sleep(0.5)
        return out

    setattr(SRLitModule, phase, hooked)
    sys.argv = ["odm-sr-train", *sys.argv[4:]]
    main()
""")


def _env() -> dict:
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO / "src")}


def _overrides(run: Path) -> list[str]:
    return [*QUIET, f"hydra.run.dir={run}", "trainer.max_steps=200", "data.iters_per_epoch=200"]


@pytest.mark.slow
@pytest.mark.parametrize("phase, from_step", [("training_step", 4), ("test_step", 0)])
def test_sigterm_exits_143_naming_the_last_checkpoint(phase, from_step, tmp_path):
    run = tmp_path / "run"
    overrides = _overrides(run) + (["trainer.max_steps=3"] if phase == "test_step" else [])
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, phase, str(from_step), "other", *overrides],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("READY"):
                proc.send_signal(signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    last = run / "checkpoints" / "last.ckpt"
    assert proc.returncode == SIGTERM_EXIT, err[-3000:]
    assert f"stopped by SIGTERM before the run finished (no results.json); the last checkpoint is {last}" in err
    assert "Traceback" not in err
    assert not (run / "results.json").exists()
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3  # the step-3 checkpoint
    assert not (run / LOCK_NAME).exists()  # the lock is released on the way out


@pytest.mark.slow
def test_make_train_stops_after_a_sigterm_in_stage_one(tmp_path):
    """The Makefile's two stages with an odm-sr-train that gets SIGTERM in its second step: make fails, and
    stage 2 (QAT from a half-trained FP model) never starts."""
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    calls = tmp_path / "calls.log"
    stub = venv / "odm-sr-train"
    tiny = " ".join(QUIET + ["trainer.max_steps=200"])
    stub.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {sys.executable} -c \'{DRIVER}\' training_step 2 '
                    f'self "$@" {tiny}\n')
    stub.chmod(0o755)
    done = subprocess.run(["make", "train", f"VENV={tmp_path / 'venv'}", f"MAIN_DIR={tmp_path / 'main'}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "stopped by SIGTERM" in done.stderr
    stages = calls.read_text().splitlines()
    assert len(stages) == 1 and "experiment=main_fp" in stages[0]  # stage 2 (main_odm) did not run


# -- 20. one writer per run folder --------------------------------------------------------------------------------
def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(f"{holder.pid} {socket.gethostname()}\n")
        with pytest.raises(RunFolderBusyError, match=rf"run folder {tmp_path} is in use by another odm-sr-train "
                                                     rf"\(pid {holder.pid} on"):
            train(compose_config(QUIET, tmp_path))
        assert not (tmp_path / "checkpoints").exists()  # refused before any work
        assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(holder.pid)  # the holder's lock is untouched
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_replaced_and_the_lock_released_after_the_run(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no process holds now (killed -9 in real life)
    (tmp_path / LOCK_NAME).write_text(f"{gone.pid} {socket.gethostname()}\n")
    results = train(compose_config(QUIET + ["trainer.max_steps=3"], tmp_path))
    assert results["steps"] == 3
    assert f"removing the stale lock {tmp_path / LOCK_NAME} of pid {gone.pid}" in capsys.readouterr().err
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_released_when_the_run_fails_and_held_while_it_runs(tmp_path):
    with pytest.raises(ZeroDivisionError), run_folder_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(os.getpid())
        with pytest.raises(RunFolderBusyError), run_folder_lock(tmp_path):  # the same folder again: refused
            pass
        raise ZeroDivisionError
    assert not (tmp_path / LOCK_NAME).exists()


# -- 18. a checkpoint write on a full disk ------------------------------------------------------------------------
class _FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes, as a full disk does."""

    def __init__(self, f, room: int) -> None:
        self._f, self._room = f, room

    def write(self, data) -> int:
        self._room -= len(data)
        if self._room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def test_a_checkpoint_write_on_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import odm_sr.files
    from odm_sr.resume import CheckpointWriteError

    steps = QUIET + ["test_after_fit=false", "callbacks.model_checkpoint.every_n_train_steps=3"]
    train(compose_config(steps + ["trainer.max_steps=3"], tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    monkeypatch.setattr(odm_sr.files, "open", lambda path, mode: _FullDisk(open(path, mode), room=4096),
                        raising=False)
    with pytest.raises(CheckpointWriteError) as err:
        train(compose_config(steps + ["trainer.max_steps=6", "auto_resume=true"], tmp_path))
    message = str(err.value)
    assert message.startswith(f"cannot write checkpoint {last}: No space left on device; {last} still holds the "
                              f"previous checkpoint")
    assert "inline_container" not in message and "\n" not in message
    assert last.read_bytes() == before  # the step-3 checkpoint, intact
    assert not list(last.parent.glob(".*.tmp"))  # no partial file left beside it
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3


def test_auto_resume_refuses_a_checkpoint_of_another_run_config_and_keeps_optim_changes(tmp_path):
    # the single-run folder of an experiment is the same with and without +ablation=...: a run whose model,
    # method, bits, data or seed differ must not continue the other run's checkpoint (it would end with its numbers)
    steps = QUIET + ["test_after_fit=false", "callbacks.model_checkpoint.every_n_train_steps=2"]
    train(compose_config(steps + ["trainer.max_steps=2"], tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError) as err:
        train(compose_config(steps + ["trainer.max_steps=4", "auto_resume=true", "data.lr_patch=12"], tmp_path))
    message = str(err.value)
    assert message.startswith(f"resume: {last} was trained with data.lr_patch=16, the new config has "
                              f"data.lr_patch=12;")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2  # untouched
    # what may change on resume: the length of the run and the optimizer's settings
    resumed = train(compose_config(steps + ["trainer.max_steps=4", "auto_resume=true", "optim.lr=1e-5"], tmp_path))
    assert resumed["steps"] == 4
