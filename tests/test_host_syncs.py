"""Host syncs of ``SRLitModule.training_step`` (issue 10): none on a step that does not log, a fixed few on a
logging step, for every method on tiny EDSR, RDN and SwinIR-light configs (CPU; ``step_profile`` counts what a
CUDA run would wait on: ``.item()``/``float()``/``bool()`` on a tensor, ``nonzero``, boolean-mask indexing,
device-to-host copies, ``tolist``/``numpy``/``cpu``).

A logging step (``trainer.log_every_n_steps``) makes:
- 1 sync: ``check_finite``, the device-side NaN/inf record read before its optimizer step;
- 1 sync: every logged tensor (loss, terms, a method's logs, ODM's ``balance_stats``) in one ``tolist``;
- 1 sync more for a method whose ``log_stats`` has quantizer state to log (PAMS, DDTB, ODM, LSQ: ``to_floats``).

Adam's own step is left out of the count: its per-parameter step counter is a CPU tensor (``.item()`` there is no
device wait on CUDA either: torch keeps it on the host unless ``capturable``/``fused``).

The schedules run through their stages in the steps run here (2-step epochs): PAMS's α-tracking epoch then
clipping; DDTB's FP calibration epoch, its L_reg epoch, then gates used. Where the loss terms change between
stages (DDTB: L_reg ends) the record is checked at the first step of the new stage (1 sync, once a run).
"""

from __future__ import annotations

import pytest
import torch
from helpers import compose_config
from torch.utils._python_dispatch import _disable_current_modes

from odm_sr.analysis.profiling import step_profile
from odm_sr.builders import build_network
from odm_sr.lit_module import SRLitModule
from odm_sr.quant.daq import DaqActQuantizer
from odm_sr.quant.ddtb import DdtbActQuantizer

BACKBONES = {
    "edsr": ["model=edsr_small", "model.kwargs.n_resblocks=1", "model.kwargs.n_feats=8"],
    "rdn": ["model=rdn", "+model.kwargs={D: 2, C: 2, G: 4, G0: 8}"],
    "swinir_light": ["model=swinir_light",
                     "+model.kwargs={embed_dim: 12, depths: [2], num_heads: [2], window_size: 4, img_size: 16}"],
}
METHODS = {
    "fp": ["method=fp", "bits=fp32"],
    "pams": ["method=pams", "bits=w2a2"],
    "daq": ["method=daq", "bits=w2a2"],
    "ddtb": ["method=ddtb", "bits=w2a2", "method.stages.reg_epochs=1"],
    "odm": ["method=odm", "bits=w2a2", "method.init.num_batches=1"],
    "lsq": ["method=lsq", "bits=w2a2", "method.init.num_batches=1"],
}
LOG_EVERY = 4
STEPS = 8  # with 2-step epochs: every stage of every schedule; logging steps are the 4th and the 8th


class _Trainer:
    checkpoint_callback = None

    def __init__(self) -> None:
        self.log_every_n_steps = LOG_EVERY


class _Uncounted:
    """The optimizer, stepped outside the count (see the module docstring)."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt, self.param_groups = opt, opt.param_groups

    def step(self) -> None:
        with _disable_current_modes():
            self.opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)


def _module(method: str, backbone: str, tmp_path) -> tuple[SRLitModule, dict]:
    torch.manual_seed(0)
    cfg = compose_config(BACKBONES[backbone] + METHODS[method] + ["model.scale=2",
                                                                   "data.iters_per_epoch=2"], tmp_path)
    net, qmethod, teacher = build_network(cfg)
    lit = SRLitModule(net, qmethod, dict(cfg.optim), teacher=teacher).train()
    qmethod.calibrate(net, [torch.rand(2, 3, 16, 16) * lit.pixel_range])
    opts = lit.configure_optimizers()
    opt, sched = _Uncounted(opts["optimizer"]), opts["lr_scheduler"]["scheduler"]
    logged: dict = {}
    lit.optimizers, lit.lr_schedulers = (lambda: opt), (lambda: sched)
    lit.manual_backward = lambda loss: loss.backward()
    lit.log_dict = lambda values, **kwargs: logged.update(values)
    lit.log = lambda name, value, **kwargs: logged.update({name: value})
    lit._trainer = _Trainer()
    return lit, logged


def _syncs_per_step(method: str, backbone: str, tmp_path) -> tuple[list[tuple[bool, int, dict]], int]:
    """[(logged, host syncs, by cause)] of each step, and the number of activation quantizers (DDTB)."""
    lit, logged = _module(method, backbone, tmp_path)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for i in range(STEPS):
        batch = {"lr": torch.rand(2, 3, 16, 16, generator=gen), "hr": torch.rand(2, 3, 32, 32, generator=gen)}
        logged.clear()
        with step_profile() as p:
            lit.training_step(batch, i)
        rows.append((bool(logged), p.total_syncs, dict(p.syncs)))
    quantizers = sum(isinstance(m, (DdtbActQuantizer, DaqActQuantizer)) for m in lit.net.modules())
    return rows, quantizers


# host syncs of a logging step: check_finite + the logged values (+ log_stats' to_floats)
LOGGING_SYNCS = {"fp": 2, "pams": 3, "daq": 2, "ddtb": 3, "odm": 3, "lsq": 3}
# DDTB's FP calibration epoch (steps 0-1) records max/min of each activation quantizer's input per step on the
# host (DdtbActQuantizer, a quantizer class: 2 syncs each), and its end (step 2) scores each for the dynamic choice
# once a run (1 each); from then on its steps are sync-free like the others'
# DAQ decides once, on each activation quantizer's first forward (step 0), whether its input is post-ReLU
# (1 sync each); from then on none
WARMUP = {"ddtb": 3, "daq": 1}


def _cases():
    for backbone in BACKBONES:
        for method in METHODS:
            yield pytest.param(method, backbone, id=f"{method}-{backbone}")


@pytest.mark.parametrize(("method", "backbone"), list(_cases()))
def test_no_host_sync_on_steps_that_do_not_log(method, backbone, tmp_path):
    rows, quantizers = _syncs_per_step(method, backbone, tmp_path)
    assert [logged for logged, _, _ in rows] == [i % LOG_EVERY == LOG_EVERY - 1 for i in range(STEPS)]
    steady = range(WARMUP.get(method, 0), STEPS)
    assert [rows[i][1] for i in steady if not rows[i][0]] == [0] * sum(not rows[i][0] for i in steady), rows
    assert [n for logged, n, _ in rows if logged] == [LOGGING_SYNCS[method]] * (STEPS // LOG_EVERY), rows
    warmup_limits = {"ddtb": (2 * quantizers, 2 * quantizers, quantizers), "daq": (quantizers,)}
    for i, limit in enumerate(warmup_limits.get(method, ())):
        assert quantizers > 0 and rows[i][1] <= limit, rows[i]
        assert set(rows[i][2]) <= {"aten._local_scalar_dense"}, rows[i]


def test_a_logging_step_logs_its_values_as_floats_and_rho_sums_on_the_device(tmp_path):
    """Every step logging (log_every_n_steps=1): the logged values are plain floats, and the run sum of ρ kept on
    the device equals the host sum of the logged ρ's, added in the same order (bit for bit)."""
    lit, logged = _module("odm", "edsr", tmp_path)
    lit._trainer.log_every_n_steps = 1
    gen = torch.Generator().manual_seed(1)
    rhos = []
    for i in range(3):
        batch = {"lr": torch.rand(2, 3, 16, 16, generator=gen), "hr": torch.rand(2, 3, 32, 32, generator=gen)}
        logged.clear()
        lit.training_step(batch, i)
        assert all(type(v) is float for v in logged.values()), logged
        rhos.append(logged["mr/rho"])
    for key in ("train/loss", "train/loss_rec", "train/loss_mismatch", "train/cos", "lr/theta"):
        assert key in logged, sorted(logged)
    assert logged["loss"] == logged["train/loss"]
    assert any(k.startswith("quant/") for k in logged) and any(k.startswith("mr/") and k != "mr/rho" for k in logged)
    total = 0.0
    for rho in rhos:
        total += rho
    assert lit.balance_steps == 3 and lit.balance_sum == total and lit.balance_mean == total / 3 and total > 0


def test_a_non_finite_loss_between_logging_steps_stops_at_the_next_one(tmp_path):
    """A NaN loss at step 1 (no logging there) stops the run at step 3, the next logging step, before its
    optimizer step, with the message naming step 1 and its terms; or at a checkpoint asked for before that."""
    from odm_sr.lit_module import NonFiniteLossError

    gen = torch.Generator().manual_seed(1)
    batches = [{"lr": torch.rand(2, 3, 16, 16, generator=gen), "hr": torch.rand(2, 3, 32, 32, generator=gen)}
               for _ in range(LOG_EVERY)]
    batches[1]["lr"][0, 0, 0, 0] = float("nan")
    message = r"non-finite training loss at step 1 \(rec=nan\); stopping"
    for stop_at in ("logging step", "checkpoint"):
        lit, _ = _module("fp", "edsr", tmp_path)
        for i in range(LOG_EVERY - 1):
            lit.training_step(batches[i], i)  # steps 0-2 pass: the NaN of step 1 waits on the device
        if stop_at == "checkpoint":
            with pytest.raises(NonFiniteLossError, match=message):
                lit.on_save_checkpoint({})
            continue
        before = {k: v.clone() for k, v in lit.net.state_dict().items()}
        with pytest.raises(NonFiniteLossError, match=message):
            lit.training_step(batches[3], 3)
        for k, v in lit.net.state_dict().items():  # no optimizer step at step 3
            torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)
        assert lit.global_step_count == 3
