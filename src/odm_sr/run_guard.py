"""What guards a training run's folder while it runs: one writer at a time (a lock file holding the writer's pid),
and SIGTERM turned into a non-zero exit that says where the last checkpoint is.

Imports nothing from odm_sr above it (train.py uses it).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from .console import UserError

LOCK_NAME = ".odm-sr.lock"
SIGTERM_EXIT = 128 + signal.SIGTERM  # 143: what a shell reports for a process that SIGTERM ended


# Config keys (and key prefixes) that do not change a run's numbers: where files go, what is logged or shown, how the
# run was started. conf/sweep/common.yaml leaves the same keys out of a sweep job's folder name, and model.pretrained
# too (a long path), which does change the numbers: hence ``check_same_result_config``.
NOT_RESULT_KEYS = ("paths", "logger", "callbacks", "hydra", "sweep", "sweep_name", "task_name", "tags",
                   "skip_done", "auto_resume", "resume", "test_after_fit", "analyze", "trainer.default_root_dir",
                   "trainer.enable_progress_bar", "trainer.log_every_n_steps", "data.num_workers", "data.data_root",
                   "eval.bicubic_row", "eval.pretrained_row", "eval.tile", "eval.tile_overlap")


def _leaves(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _changes_result(key: str) -> bool:
    return not any(key == k or key.startswith(f"{k}.") for k in NOT_RESULT_KEYS)


def _first_difference(stored: dict, new: dict, within: tuple[str, ...] | None = None) -> str | None:
    """``key=<stored value>, ... key=<new value>`` for the first result-changing key (under one of ``within``
    where given) on which two resolved configs differ, None where none does. Keys that only one of them has
    (added or retired since) are not compared."""
    old, now = _leaves(stored), _leaves(new)
    differ = [k for k in old if k in now and _changes_result(k) and old[k] != now[k]
              and (within is None or any(k == p or k.startswith(f"{p}.") for p in within))]
    if not differ:
        return None
    key = differ[0]
    more = f" (and {differ[1:4]})" if len(differ) > 1 else ""
    return f"{key}={old[key]!r}, the new config has {key}={now[key]!r}{more}"


def check_same_result_config(stored: dict, new: dict, out_dir: str | Path) -> None:
    """Before ``skip_done`` reuses the finished run in ``out_dir``: ValueError naming the first key that changes
    the result and differs between the config of its results.json (``stored``) and the new one (both resolved
    containers)."""
    differ = _first_difference(stored, new)
    if differ:
        raise ValueError(
            f"skip_done: {out_dir}/results.json was made with {differ}; its numbers would be kept for a run that "
            f"differs. Use another sweep folder (paths.log_dir=<new> or hydra.sweep.dir=<new>), or delete "
            f"{out_dir} to run the job again")


# What a resumed checkpoint must share with the current config: the network, the method, the bits, the data and
# the seed. optim.* and trainer.* may change on resume (a longer run, another lr: ``CurrentOptimSettingsOnResume``).
SAME_RUN_KEYS = ("model", "method", "bits", "data", "seed")


def check_same_run(stored: dict, new: dict, checkpoint: str | Path) -> None:
    """Before resuming ``checkpoint``: ValueError naming the first key of ``SAME_RUN_KEYS`` (less the
    ``NOT_RESULT_KEYS``) on which its stored config and the new one differ, e.g. a single run with
    ``+ablation=c`` that would otherwise continue the plain experiment's checkpoint in the same folder."""
    differ = _first_difference(stored, new, SAME_RUN_KEYS)
    if differ:
        raise ValueError(
            f"resume: {checkpoint} was trained with {differ}; continuing it would mix two runs. Start the new run "
            f"in another folder (hydra.run.dir=<new folder>), or resume with the checkpoint's own settings")


class RunFolderBusyError(RuntimeError, UserError):
    """Another live process is writing the run folder."""


class RunTerminated(SystemExit):
    """SIGTERM stopped the run; exits with status ``SIGTERM_EXIT`` (``str()`` is the message printed)."""

    def __init__(self, message: str) -> None:
        super().__init__(SIGTERM_EXIT)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user holds that pid
        return True
    return True


def _holder(lock: Path) -> tuple[int, str] | None:
    """(pid, host) written in ``lock``; None when it is unreadable (being written, or damaged)."""
    try:
        pid, host = lock.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def _take(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    return True


def _is_rank_zero_process() -> bool:
    """False in the extra processes a DDP launcher starts (they run the same script with ``LOCAL_RANK`` > 0)."""
    return int(os.environ.get("LOCAL_RANK", 0) or 0) == 0 and int(os.environ.get("NODE_RANK", 0) or 0) == 0


@contextmanager
def run_folder_lock(out_dir: str | Path):
    """Hold ``<out_dir>/.odm-sr.lock`` (this process's pid and host) while the block runs; a second writer of
    the same folder is refused with ``RunFolderBusyError`` naming the holder. A lock left by a process that is
    gone (killed with -9, power loss) on this host is stale: it is replaced, with a note."""
    out_dir = Path(out_dir)
    lock = out_dir / LOCK_NAME
    if not _is_rank_zero_process():  # rank 0 holds the lock for the whole DDP run
        yield
        return
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    while not _take(lock):
        holder = _holder(lock)
        if holder is not None and (holder[1] != socket.gethostname() or _alive(holder[0])):
            raise RunFolderBusyError(
                f"run folder {out_dir} is in use by another odm-sr-train (pid {holder[0]} on {holder[1]}, lock "
                f"{lock}): two runs would overwrite each other's checkpoints; wait for it to end or choose another "
                f"hydra.run.dir (delete the lock only if that process is surely gone)")
        print(f"removing the stale lock {lock} of pid {holder[0] if holder else '?'} (no longer running)",
              file=sys.stderr)
        lock.unlink(missing_ok=True)
    try:
        yield
    finally:
        if _holder(lock) == (os.getpid(), socket.gethostname()):
            lock.unlink(missing_ok=True)
        if created and not any(out_dir.iterdir()):  # a run refused before writing anything leaves no folder
            out_dir.rmdir()


class SigtermStop:
    """SIGTERM as a stop with exit status 143 and a message, for the duration of a ``with`` block.

    Inside ``trainer.fit``/``trainer.test`` Lightning installs its own SIGTERM handler, which calls this one too
    and stops its loop at the next step (raising ``SIGTERMException``, a ``SystemExit`` with status 0); outside
    them this handler stops at once. Either way ``stop`` turns it into ``RunTerminated``."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.checkpoint = Path(checkpoint)
        self.received = False
        self._bound = self._handler  # the one bound-method object installed, so that getsignal can be compared
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.received = True
        if signal.getsignal(signal.SIGTERM) is self._bound:  # not inside a Lightning loop: stop now
            raise self.terminated()

    def terminated(self) -> RunTerminated:
        where = (f"the last checkpoint is {self.checkpoint}; continue with resume={self.checkpoint} (or "
                 f"auto_resume=true)" if self.checkpoint.is_file() else
                 f"no checkpoint was written yet ({self.checkpoint} does not exist): the run starts again from "
                 f"the beginning")
        return RunTerminated(f"odm-sr-train: stopped by SIGTERM before the run finished (no results.json); {where}")

    def check(self) -> None:
        """Raise ``RunTerminated`` if a SIGTERM came (e.g. during the last step, which Lightning finishes)."""
        if self.received:
            raise self.terminated()

    def __enter__(self) -> SigtermStop:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGTERM, self._bound)
        return self

    def __exit__(self, kind, err, tb) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(err, SIGTERMException):
            raise self.terminated() from None
