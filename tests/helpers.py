"""Shared test helpers: the tiny training config, Hydra composition, a gloo process group on CPU."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L

from odm_sr.config import (
    compose_config,  # noqa: F401 - the tests import it from here
    merge_config,
    method_defaults,
)

# A training run small enough for a test: 1-block, 8-feature EDSR, 16-pixel LR patches, 6 steps.
TINY_TRAIN = [
    "model=edsr_small", "model.kwargs.n_resblocks=1", "model.kwargs.n_feats=8", "model.scale=2",
    "data=sample", "data.lr_patch=16", "data.batch_size=2", "data.iters_per_epoch=3",
    "trainer=cpu", "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "callbacks.model_checkpoint.every_n_train_steps=3", "logger=csv",
]


@functools.cache
def composed_experiment(name: str, *overrides: str):
    """``experiment=<name>`` (+ ``overrides``) composed once per test process (a compose takes ~0.3 s; the config
    tests of several files compose every experiment): the shared object, which callers must not modify (copy it)."""
    return compose_config([f"experiment={name}", *overrides], Path("/nonexistent/output_dir"))


class KillAt(L.Callback):
    """Simulates a crash right after optimizer step ``step`` (add it to ``train.build_callbacks``)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt  # what Lightning sees on SIGINT; it shuts down without saving


def last_checkpoint(out_dir) -> dict:
    """The run's ``checkpoints/last.ckpt``, loaded on the CPU (weights only)."""
    import torch

    return torch.load(Path(out_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def last_state(out_dir) -> tuple[dict, int]:
    """(state_dict, global_step) of the run's ``checkpoints/last.ckpt``."""
    ckpt = last_checkpoint(out_dir)
    return ckpt["state_dict"], ckpt["global_step"]


def method_config(name: str, options: dict | None = None) -> dict:
    """``method=<name>`` as a run composes it, ``options`` merged over it (an unknown key raises ValueError)."""
    return merge_config(method_defaults(name), options or {}, extra_keys=("calibration_batches",))


def make_method(name: str, options: dict | None = None, bits=None):
    """The method of ``method_config(name, options)`` (built as a run builds it) at ``bits`` (a ``Bits``, a
    {w, a, sc} mapping, or None: 32 bits)."""
    from dataclasses import asdict, is_dataclass

    from odm_sr.quant import build_method

    return build_method(method_config(name, options), asdict(bits) if is_dataclass(bits) else bits)


def check_config(cfg):
    """What ``train`` does before it builds the network: check the plain values, build the method (which checks
    its own options); returns the method."""
    from odm_sr.quant import build_method
    from odm_sr.train import check_method, check_values

    check_values(cfg)
    return check_method(build_method(cfg.method, cfg.bits))


def _gloo_rank(rank: int, world: int, port: int, fn, out_dir: str) -> None:
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world: int, out_dir: Path) -> list:
    """``fn(rank)`` in ``world`` CPU processes joined in a gloo process group; returns each rank's result
    (saved with ``torch.save``: tensors, dicts and lists of them).

    fork where available: the children inherit the imported modules (a spawned child re-imports torch and odm_sr,
    ~8 s on 2 cores); each child uses one thread, so no OpenMP pool crosses the fork. ``fn`` must be a module-level
    function (spawn pickles it).
    """
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_gloo_rank, args=(world, port, fn, str(out_dir)), nprocs=world, join=True,
                       start_method=method)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world)]


def quantize_and_train_one_step(method, make_net):
    """``make_net()`` quantized by ``method`` (with an FP teacher of the same weights where it needs one),
    calibrated on a random 8×8 → 16×16 batch in [0, 255] and trained one optimizer step (DDTB: after its calibration
    step); asserts the loss is finite and some parameter moved. Returns the quantized network."""
    import torch

    torch.manual_seed(0)
    net = make_net()
    teacher = make_net().eval() if method.needs_teacher else None
    if teacher is not None:
        teacher.load_state_dict(net.state_dict())
    net = method.quantize(net)
    lr, hr = torch.rand(2, 3, 8, 8) * 255, torch.rand(2, 3, 16, 16) * 255
    method.calibrate(net, [lr, lr], teacher=teacher)
    opt = torch.optim.Adam(method.param_groups(net, 1e-3))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net.train()
    for step in range(2):  # DDTB's step 0 is its calibration epoch (no optimizer step)
        out = method.training_losses(net, lr, hr, step, teacher=teacher)
        if out is not None:
            break
    assert out.sr.shape == hr.shape and torch.isfinite(out.loss)
    method.backward(out, net, lambda loss: loss.backward())
    opt.step()
    assert any(not torch.equal(before[n], p.detach()) for n, p in net.named_parameters())
    return net


def bare_step_module(net, method, **kwargs):
    """``SRLitModule`` for calling ``training_step`` without a Trainer: Adam at 1e-4, a constant schedule,
    ``loss.backward()`` as the manual backward and no logging."""
    import torch

    from odm_sr.lit_module import SRLitModule

    lit = SRLitModule(net, method, {"lr": 1e-4}, **kwargs)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[])
    lit.optimizers, lit.lr_schedulers = (lambda: opt), (lambda: sched)  # no Trainer: the bare manual step
    lit.manual_backward = lambda loss: loss.backward()
    lit._log_train = lambda *args: None
    return lit.train()
