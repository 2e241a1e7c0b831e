"""Writing training checkpoints and resuming from them (the trainer's side): atomic checkpoint writes
(``AtomicCheckpointIO``), the check of ``resume=<ckpt>`` before any work, and the current config's optimizer
settings applied on resume."""

from __future__ import annotations

import math
from bisect import bisect_right
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from .console import UserError
from .files import atomic_write
from .models.weights import mismatch_report
from .trained import read_checkpoint


def check_resume_checkpoint(path: str | Path, module: nn.Module) -> dict:
    """Before any work: ``resume=path`` must be a full odm-sr training checkpoint (weights, optimizer and
    schedule) of the network the current config builds; clear errors naming the file otherwise. Returns the
    config stored in it (``{}`` where it has none)."""
    ckpt = read_checkpoint(path, what="resume")
    missing = [k for k in ("optimizer_states", "lr_schedulers", "loops") if k not in ckpt]
    if missing:
        raise ValueError(f"resume={path}: holds weights only (no {missing}); to start a new run from its "
                         f"weights use model.pretrained={path}")
    target = module.state_dict()
    problems = mismatch_report(module.net, target, ckpt["state_dict"])
    if problems:
        raise ValueError(f"resume={path}: does not match the network of the current config "
                         f"(model/method/bits must be those of the run being resumed):\n  " + "\n  ".join(problems))
    stored = (ckpt.get("hyper_parameters") or {}).get("cfg")
    return stored if isinstance(stored, dict) else {}


class CurrentOptimSettingsOnResume(L.Callback):
    """On resume, the optimizer and lr-schedule settings of the current config (``optim.lr``, ``betas``,
    ``eps``, ``weight_decay``, ``milestones``, ``gamma``, ``eta_min``, the cosine's ``T_max``, per-group lr
    factors) replace those stored in the checkpoint; Adam's moments and the step count are kept. So
    ``resume=<ckpt> optim.lr=1e-5`` trains at 1e-5 (decayed by the milestones already passed), as results.json
    records."""

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        fresh = pl_module.configure_optimizers()
        apply_optim_settings(checkpoint, fresh["optimizer"], fresh["lr_scheduler"]["scheduler"])


SCHEDULE_KEYS = ("milestones", "gamma", "T_max", "eta_min")  # MultiStepLR's and CosineAnnealingLR's settings


def scheduled_lrs(sched: dict, step: int) -> list[float]:
    """Each group's lr at ``step`` under the settings of a scheduler's ``state_dict``: MultiStepLR
    base_lr·gamma^(milestones passed); CosineAnnealingLR eta_min + (base_lr − eta_min)(1 + cos(π·step/T_max))/2."""
    if "milestones" in sched:
        passed = bisect_right(sorted(sched["milestones"].elements()), step)
        return [base * sched["gamma"] ** passed for base in sched["base_lrs"]]
    if "T_max" in sched:
        eta, phase = sched["eta_min"], math.cos(math.pi * step / sched["T_max"])
        return [eta + (base - eta) * (1 + phase) / 2 for base in sched["base_lrs"]]
    raise ValueError(f"resume: cannot recompute the lr of a {sorted(sched)} schedule (MultiStepLR or "
                     f"CosineAnnealingLR expected)")


def apply_optim_settings(checkpoint: dict, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Rewrite the first optimizer/scheduler state of ``checkpoint`` (before Lightning loads it) with the
    hyperparameters of ``optimizer``/``scheduler`` (a MultiStepLR or CosineAnnealingLR), the lr at the
    checkpoint's step being the new schedule's (``scheduled_lrs``)."""
    saved_opt, saved_sched = checkpoint["optimizer_states"][0], checkpoint["lr_schedulers"][0]
    new_groups, new_sched = optimizer.state_dict()["param_groups"], scheduler.state_dict()
    if len(saved_opt["param_groups"]) != len(new_groups):
        raise ValueError(f"resume: the checkpoint has {len(saved_opt['param_groups'])} parameter groups, the "
                         f"current config builds {len(new_groups)} (was the method changed?)")
    lrs = scheduled_lrs(new_sched, int(saved_sched["last_epoch"]))
    keys = [k for k in SCHEDULE_KEYS if k in new_sched]
    changed = {k for saved, new in zip(saved_opt["param_groups"], new_groups, strict=True)
               for k, v in new.items() if k not in ("params", "lr") and saved.get(k) != v}
    changed |= {k for k in keys if saved_sched.get(k) != new_sched[k]}
    for saved, new, lr in zip(saved_opt["param_groups"], new_groups, lrs, strict=True):
        saved.update({k: v for k, v in new.items() if k != "params"}, lr=lr)
    saved_sched.update({k: new_sched[k] for k in keys}, base_lrs=new_sched["base_lrs"], _last_lr=lrs)
    if changed:
        print(f"resume: the current config's {sorted(changed)} replace the checkpoint's (lr now {lrs})")


class CheckpointWriteError(OSError, UserError):
    """A checkpoint could not be written (disk full, quota, permissions); the file at its path is unchanged."""


def write_failure_message(path: Path, err: BaseException) -> str:
    """One line: the checkpoint, the cause (the ``OSError`` behind torch's zip-writer error, e.g. "No space
    left on device") and what is still there."""
    cause, seen = err, set()
    while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    why = (cause.strerror or str(cause)) if isinstance(cause, OSError) else str(err).strip().splitlines()[0]
    then = (f"{path} still holds the previous checkpoint. Free space in {path.parent} (or fix its permissions) and "
            f"continue the run with resume={path} (or auto_resume=true)" if path.is_file() else
            f"no earlier checkpoint is at {path}. Free space in {path.parent} (or fix its permissions) and start "
            f"the run again")
    return f"cannot write checkpoint {path}: {why}; {then}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never leaves a half-written checkpoint that looks valid: it writes
    ``.<name>.tmp`` beside the target, fsyncs it and renames it over the target (``os.replace`` is atomic on
    POSIX); a failed write (disk full) is a ``CheckpointWriteError`` naming the file and the cause. Loading uses
    ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        try:
            atomic_write(path, lambda f: torch.save(checkpoint, f))
        except (OSError, RuntimeError) as err:  # torch reports a failed write as "inline_container.cc ... pos"
            raise CheckpointWriteError(write_failure_message(Path(path), err)) from err

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"resume checkpoint {path}: no such file")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
