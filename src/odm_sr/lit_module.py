"""The LightningModule: orchestrates a (quantized) SR backbone and its method with manual optimisation.

The math lives elsewhere: losses and gradient combination in ``odm_sr.quant.<method>``, metrics in
``odm_sr.metrics``. Each training step is ``method.training_losses`` → ``method.backward`` (ODM's cooperative
update writes ``.grad`` itself) → optimizer step → per-iteration lr schedule (METHODS.md §5.7).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor, nn

from .console import UserError
from .evaluation import eval_gray_mode, eval_upscale, update_metrics
from .metrics import SRMetrics
from .quant.base import QuantMethod
from .quant.distributed import all_reduce_sum_, world_size


class NonFiniteLossError(RuntimeError, UserError):
    """Raised when a training loss is NaN or infinite: the run stops, keeping the last good checkpoint."""


def non_finite_ranks(loss: Tensor, terms: dict[str, Tensor], step: Tensor | None = None
                     ) -> dict[int, dict[str, float]]:
    """{rank: its loss terms} for every rank whose loss is NaN/inf; empty when all are finite.

    Under DDP every rank gets the same answer (one small all-reduce and one host sync; the terms are exchanged
    only on failure), so all ranks stop with the same message instead of leaving the others blocked in the next
    collective. (ODM's L_M is a norm over the global batch: one rank's NaN makes every rank's L_M NaN.) With
    ``step`` (a 0-d tensor), each bad rank's entry also holds it under ``STEP_KEY``.
    """
    bad = _per_rank((~torch.isfinite(loss.detach())).float().reshape(1))[:, 0]
    if not bool(bad.any()):
        return {}
    names = list(terms) + ([STEP_KEY] if step is not None else [])
    parts = [v.detach().float().reshape(()) for v in terms.values()]
    parts += [step.detach().float().reshape(())] if step is not None else []
    values = torch.stack(parts) if parts else loss.new_zeros(0)
    rows = _per_rank(values)
    return {r: dict(zip(names, rows[r].tolist(), strict=True)) for r in bad.nonzero()[:, 0].tolist()}


STEP_KEY = "@step"


def _per_rank(x: Tensor) -> Tensor:
    """(world, *x.shape): row r holds rank r's ``x`` (an all-reduced sum of zero-padded rows)."""
    rows = x.new_zeros((world_size(), *x.shape))
    rows[torch.distributed.get_rank() if world_size() > 1 else 0] = x
    all_reduce_sum_([rows])
    return rows


class SRLitModule(L.LightningModule):
    """Trains ``net`` with ``method``; validates/tests per benchmark set with MATLAB-convention PSNR/SSIM.

    Inputs from the data module are in [0, 1]; they are scaled to the backbone's ``pixel_range`` (255 for
    EDSR/RDN, 1 for SwinIR/HAT) and losses are computed in that native range (``data.loss_range=native``).
    """

    def __init__(self, net: nn.Module, method: QuantMethod, optim: dict, teacher: nn.Module | None = None,
                 eval_cfg: dict | None = None, calibration_batches: int = 0, hparams: dict | None = None,
                 compile_backend: str | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.net = net
        self.method = method
        self.optim_cfg = dict(optim)
        self.eval_cfg = dict(eval_cfg or {})
        self.calibration_batches = calibration_batches
        # the teacher is frozen and rebuilt from the FP weights: keep it out of the state dict
        self._teacher = [teacher] if teacher is not None else []
        self.register_buffer("calibrated", torch.tensor(calibration_batches <= 0))
        # {stage/set: SRMetrics} of the running val/test epoch; plain dict: no state-dict keys, moved by hand
        self._metrics: dict[str, SRMetrics] = {}
        self.set_names: dict[str, list[str]] = {"val": [], "test": []}  # from the data module (``setup``)
        self.last_metrics: dict[str, float] = {}
        self._val_started = 0.0
        # wall time of training (calibration included) and of validating during fit; a resumed run adds the time of
        # the run it continues (from the checkpoint), so results.json reports the whole run
        self.seconds_before = {"train": 0.0, "validation": 0.0}
        self._fit_started: float | None = None
        self._validation_this_fit = 0.0
        self._step_count = 0  # iterations done, steps without an optimizer step included (``global_step_count``)
        self._watch: dict | None = None  # the device-side non-finite record since the last check (``_watch_finite``)
        # running sum of mr/rho (ODM): its run mean in results; on the device during training (``balance_sum``)
        self._balance_base, self._balance_total, self.balance_steps = 0.0, None, 0
        # trainer.compile: torch.compile the student in place (keys unchanged) after calibration; None: eager
        self.compile_backend = compile_backend
        self._compile_breaks_before: int | None = None
        self.graph_breaks: int | None = None  # of the first compiled training step (``_report_compile``)
        if hparams:
            self.save_hyperparameters(hparams)

    # -- helpers --------------------------------------------------------------------------------------
    @property
    def pixel_range(self) -> float:
        return float(self.net.pixel_range)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def upscale(self, lr01: Tensor) -> Tensor:
        """Inference path of validation/test: tiled when ``eval.tile`` is set."""
        return eval_upscale(self.net, self.eval_cfg)(lr01)

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is not None:  # the names behind each dataloader_idx
            self.set_names = {"val": list(datamodule.val_set_names), "test": list(datamodule.test_set_names)}

    def configure_optimizers(self):
        cfg = self.optim_cfg  # conf/optim: optimizer and scheduler are partial instantiations
        opt = hydra.utils.instantiate(cfg["optimizer"])(self.method.param_groups(self.net, float(cfg["lr"])))
        sched = hydra.utils.instantiate(cfg["scheduler"])(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()
        if self.teacher is not None:
            self.teacher.to(self.device)
        if not bool(self.calibrated):
            self.method.calibrate(self.net, self._calibration_batches(), teacher=self.teacher)
            self.calibrated.fill_(True)
        if self.compile_backend and self._compile_breaks_before is None:
            from torch._dynamo.utils import counters

            self._compile_breaks_before = sum(counters["graph_break"].values())
            self.net.compile(backend=self.compile_backend)

    def _calibration_batches(self) -> Iterator[Tensor]:
        loader = self.trainer.datamodule.train_dataloader()
        for i, batch in enumerate(loader):
            if i >= self.calibration_batches:
                break
            yield batch["lr"].to(self.device) * self.pixel_range

    # -- training -------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        """One manual-optimisation step. No host sync on a step that does not log (issue 10): the finite check
        of the loss is kept on the device (``_watch_finite``) and read on logging steps, before their optimizer
        step, and before every checkpoint is written; the logged values go to the host once per logging step."""
        opt = self.optimizers()
        sched = self.lr_schedulers()
        lr, hr = batch["lr"] * self.pixel_range, batch["hr"] * self.pixel_range
        out = self.method.training_losses(self.net, lr, hr, self.global_step_count, teacher=self.teacher)
        if out is None:  # e.g. DDTB's calibration epoch: no optimizer step, the schedule still advances
            sched.step()
            self._step_count += 1
            if self._watch is not None:  # keeps the record's step count right
                self._watch["seen"] = self._watch["seen"] + 1
            return None
        loss = out.loss.detach()
        self._watch_finite(loss, out.terms)
        logging = (self._step_count + 1) % self._log_every() == 0
        if logging:
            self.check_finite()
        logs = self.method.backward(out, self.net, self.manual_backward)
        clip = float(self.optim_cfg.get("grad_clip", 0.0))
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        self._step_count += 1
        if self._compile_breaks_before is not None and self.graph_breaks is None:
            self._report_compile()
        logs = {**out.logs, **logs}
        if "mr/rho" in logs:  # the run sum of ρ, on the device (read at checkpoints and for results.json)
            self._add_rho(logs["mr/rho"], loss.device)
        if logging:
            self._log_train(loss, out.terms, logs, opt)
        return None

    def _report_compile(self) -> None:
        """Print and log, once, the graph breaks torch.compile hit in the first compiled training step."""
        from torch._dynamo.utils import counters

        self.graph_breaks = sum(counters["graph_break"].values()) - int(self._compile_breaks_before or 0)
        reasons = ", ".join(f"{r[:80]} ({n})" for r, n in counters["graph_break"].most_common(3))
        print(f"trainer.compile ({self.compile_backend}): {self.graph_breaks} graph breaks in the first training "
              f"step{': ' + reasons if reasons else ''}", flush=True)
        if self._trainer is not None:
            self.log("compile/graph_breaks", float(self.graph_breaks), rank_zero_only=True)

    def _add_rho(self, rho: Tensor | float, device: torch.device) -> None:
        if self._balance_total is None:  # made in on_train_start in a run: no host-to-device copy in a step
            self._balance_total = torch.tensor(self._balance_base, dtype=torch.float64, device=device)
        self._balance_total = self._balance_total + torch.as_tensor(rho).detach().to(torch.float64)
        self.balance_steps += 1

    def on_train_start(self) -> None:
        if self._balance_total is None:
            self._balance_total = torch.tensor(self._balance_base, dtype=torch.float64, device=self.device)

    def on_train_end(self) -> None:
        self.check_finite()  # a non-finite loss after the last logging step stops the run here

    def _log_every(self) -> int:
        """``trainer.log_every_n_steps`` (Lightning writes the logs of the steps it divides); every step without
        a Trainer."""
        return max(1, int(self._trainer.log_every_n_steps or 1)) if self._trainer is not None else 1

    # -- non-finite losses ---------------------------------------------------------------------------------
    def _watch_finite(self, loss: Tensor, terms: dict[str, Tensor]) -> None:
        """Record on the device, without a host sync, the first non-finite loss since the last check: its terms
        and how many steps after the check it came. ``check_finite`` reads it."""
        names = tuple(terms)
        watch = self._watch
        if watch is not None and watch["names"] != names:  # the terms change (a schedule stage): check first
            self.check_finite()
            watch = None
        if watch is None:
            zero = loss.new_zeros(())
            watch = self._watch = {"names": names, "base": self._step_count, "seen": zero.clone(),
                                   "loss": zero.clone(), "step": zero.clone(),
                                   "terms": loss.new_zeros(len(names))}
        values = torch.stack([v.detach().to(loss.dtype).reshape(()) for v in terms.values()]) if names \
            else loss.new_zeros(0)
        first = ~torch.isfinite(loss) & torch.isfinite(watch["loss"])
        watch["loss"] = torch.where(first, loss, watch["loss"])
        watch["terms"] = torch.where(first, values, watch["terms"])
        watch["step"] = torch.where(first, watch["seen"], watch["step"])
        watch["seen"] = watch["seen"] + 1

    def check_finite(self) -> None:
        """Raise ``NonFiniteLossError`` if a loss since the last check was NaN/inf (on any rank: a collective,
        so every rank calls it at the same points: logging steps, checkpoint saves, the end of training). One
        host sync. A non-finite loss thus stops the run at the latest at the next logging step or checkpoint,
        naming the step it came at; no checkpoint is written after it."""
        watch, self._watch = self._watch, None
        if watch is None:
            return
        step = watch["step"] + watch["base"]
        bad = non_finite_ranks(watch["loss"], dict(zip(watch["names"], watch["terms"], strict=True)), step)
        if bad:
            first = int(min(t.pop(STEP_KEY) for t in bad.values()))
            raise NonFiniteLossError(self._non_finite_message(bad, first))

    def _non_finite_message(self, bad: dict[int, dict[str, float]], step: int) -> str:
        """The stop message: each bad rank's loss terms (rank-prefixed under DDP) and advice that works (resume
        applies the new optim.* values: ``resume.CurrentOptimSettingsOnResume``)."""
        prefix = "rank {}: " if world_size() > 1 else ""
        terms = "; ".join(prefix.format(r) + ", ".join(f"{k}={v:.4g}" for k, v in t.items()) for r, t in bad.items())
        callback = self._trainer.checkpoint_callback if self._trainer is not None else None  # None: no Trainer
        last = (callback.last_model_path or str(Path(callback.dirpath or ".") / "last.ckpt")) if callback else ""
        lower = float(self.optim_cfg.get("lr", 1e-4)) / 10
        if not (last and Path(last).is_file()):  # advise no resume from a checkpoint that is not there
            return (f"non-finite training loss at step {step} ({terms}); stopping. No checkpoint was written before "
                    f"it: start the run again with a lower learning rate, optim.lr={lower:.3g}, or check the data.")
        return (f"non-finite training loss at step {step} ({terms}); stopping. The last good "
                f"checkpoint is kept: continue from it with a lower learning rate, resume={last} "
                f"optim.lr={lower:.3g} (the new optim.* values replace the checkpoint's), or check the data.")

    @property
    def global_step_count(self) -> int:
        """Iterations done, including steps without an optimizer step (Lightning's global_step skips those)."""
        return int(self._step_count)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # no checkpoint after a non-finite loss: the last one written stays the last good one
        # the torch RNG (drop-path, DataLoader base seeds) so that a resumed run continues bit for bit
        checkpoint["odm_sr_step_count"] = int(self._step_count)
        checkpoint["odm_sr_torch_rng"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout/drop-path draws on the GPU
            checkpoint["odm_sr_cuda_rng"] = torch.cuda.get_rng_state_all()
        checkpoint["odm_sr_balance"] = [self.balance_sum, self.balance_steps]
        checkpoint["odm_sr_seconds"] = {"train": self.train_seconds, "validation": self.validation_seconds}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._step_count = int(checkpoint.get("odm_sr_step_count", 0))
        self.balance_sum, self.balance_steps = checkpoint.get("odm_sr_balance", [0.0, 0])
        self.seconds_before = dict(checkpoint.get("odm_sr_seconds", {"train": 0.0, "validation": 0.0}))
        if "odm_sr_torch_rng" in checkpoint:
            torch.set_rng_state(checkpoint["odm_sr_torch_rng"])
        cuda_states = checkpoint.get("odm_sr_cuda_rng")
        if cuda_states is not None and torch.cuda.is_available():
            if len(cuda_states) != torch.cuda.device_count():
                warnings.warn(f"the checkpoint holds the CUDA RNG states of {len(cuda_states)} GPUs, this machine "
                              f"has {torch.cuda.device_count()}: the resumed run is not bit-identical", stacklevel=2)
            else:
                torch.cuda.set_rng_state_all(cuda_states)

    @property
    def validation_seconds(self) -> float:
        """Wall time spent validating during fit, over the whole run (excluded from ``train_seconds``)."""
        return self.seconds_before["validation"] + self._validation_this_fit

    @property
    def train_seconds(self) -> float:
        """Wall time of training so far (calibration included, validation excluded), over the whole run: the
        run a resume continues counts too (S12's training time)."""
        if self._fit_started is None:
            return self.seconds_before["train"]
        now = time.perf_counter() - self._fit_started - self._validation_this_fit
        return self.seconds_before["train"] + now

    @property
    def balance_sum(self) -> float:
        """The run's sum of ρ (ODM's ``mr/rho``) over its optimizer steps; kept on the device during training
        (float64, the same additions in the same order as a host sum), read here with one host sync."""
        return float(self._balance_total) if self._balance_total is not None else self._balance_base

    @balance_sum.setter
    def balance_sum(self, value: float) -> None:
        self._balance_base, self._balance_total = float(value), None

    @property
    def balance_mean(self) -> float | None:
        """The run's mean of ρ = λ_M·w·‖g_M‖/‖g_R‖ over its optimizer steps (None without MR)."""
        return self.balance_sum / self.balance_steps if self.balance_steps else None

    def _log_train(self, loss: Tensor, terms: dict, logs: dict, opt) -> None:
        """Log a logging step's values: every tensor among them (loss, terms, a method's logs, ``balance_stats``)
        reaches the host in one transfer; a method's ``log_stats`` makes its own (one ``to_floats``)."""
        entries: list[tuple[str, Tensor | float]] = [("train/loss", loss)]
        entries += [(f"train/loss_{k}", v) for k, v in terms.items()]
        # a method's key with a '/' is a panel of its own (mr/rho), the rest go under train/
        entries += [(k if "/" in k else f"train/{k}", v) for k, v in logs.items()]
        optimizer = opt.optimizer if isinstance(opt, LightningOptimizer) else opt  # self.optimizers()' wrapper
        for group in optimizer.param_groups:
            entries.append((f"lr/{group.get('name', 'group')}", float(group["lr"])))
        entries += [(f"quant/{k}", float(v)) for k, v in self.method.log_stats(self.net).items()]
        entries += [(f"mr/{k}", v) for k, v in self.method.balance_stats().items()]
        tensors = [v.detach().reshape(()).to(torch.float64) for _, v in entries if isinstance(v, Tensor)]
        host = iter(torch.stack(tensors).tolist() if tensors else [])  # float64: each value exactly
        values = {k: next(host) if isinstance(v, Tensor) else float(v) for k, v in entries}
        self.log_dict(values, on_step=True, on_epoch=False, prog_bar=False, batch_size=1)
        self.log("loss", values["train/loss"], prog_bar=True, on_step=True, logger=False, batch_size=1)

    # -- evaluation -----------------------------------------------------------------------------------
    def _eval_metric(self, key: str) -> SRMetrics:
        if key not in self._metrics:
            self._metrics[key] = SRMetrics(int(self.net.scale), eval_gray_mode(
                self.net, self.eval_cfg.get("gray_mode", "official"))).to(self.device)
        return self._metrics[key]

    def _start_eval(self, stage: str) -> None:
        """Fresh metrics for every named set of ``stage``, in order (under DDP every rank computes, i.e. syncs,
        the same sets in the same order)."""
        self._metrics = {k: m for k, m in self._metrics.items() if not k.startswith(stage + "/")}
        for name in self.set_names.get(stage) or []:
            self._eval_metric(f"{stage}/{name}")

    def _eval_step(self, stage: str, batch: dict, dataloader_idx: int) -> None:
        names = self.set_names.get(stage) or []
        set_name = names[dataloader_idx] if dataloader_idx < len(names) else f"set{dataloader_idx}"
        update_metrics(self._eval_metric(f"{stage}/{set_name}"), self.upscale(batch["lr"]), batch["hr"],
                       batch.get("index"))

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def _flush(self, stage: str) -> None:
        """Log each set's PSNR/SSIM: ``SRMetrics.compute`` sums the states over the DDP ranks (torchmetrics), one
        host transfer for all the sets; a set no rank counted an image of is not logged."""
        keys = [k for k in self._metrics if k.startswith(stage + "/")]
        metrics = [self._metrics.pop(k) for k in keys]
        values = {}
        if metrics:
            rows = torch.stack([m.compute() for m in metrics]).tolist()
            for key, (psnr_mean, ssim_mean, count) in zip(keys, rows, strict=True):
                if count:
                    values[f"{key}/psnr"] = psnr_mean
                    values[f"{key}/ssim"] = ssim_mean
        self.last_metrics = {**self.last_metrics, **values}
        if values:
            self.log_dict(values, add_dataloader_idx=False, batch_size=1)

    def on_validation_epoch_start(self) -> None:
        self._val_started = time.perf_counter()
        self._start_eval("val")

    def on_validation_epoch_end(self) -> None:
        self._flush("val")
        self._validation_this_fit += time.perf_counter() - self._val_started

    def on_test_epoch_start(self) -> None:
        self.last_metrics = {}  # a test run reports its own sets only
        self._start_eval("test")

    def on_test_epoch_end(self) -> None:
        self._flush("test")
