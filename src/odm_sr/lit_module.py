"""The LightningModule: orchestrates a (quantized) SR backbone and its method with manual optimisation.

The math lives elsewhere: losses and gradient combination in ``odm_sr.quant.<method>``, metrics in
``odm_sr.metrics``. Each training step is ``method.training_losses`` → ``method.backward`` (ODM's cooperative
update writes ``.grad`` itself) → optimizer step → per-iteration lr schedule (METHODS.md §5.7).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator

import hydra
import lightning as L
import torch
from torch import Tensor, nn

from .evaluation import accumulate, eval_upscale, merge_across_ranks
from .metrics import MetricAccumulator
from .quant.base import QuantMethod, to_floats
from .quant.distributed import all_reduce_sum_, world_size


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or infinite: the run stops, keeping the last good checkpoint."""


def non_finite_ranks(loss: Tensor, terms: dict[str, Tensor]) -> dict[int, dict[str, float]]:
    """{rank: its loss terms} for every rank whose loss is NaN/inf; empty when all are finite.

    Under DDP every rank gets the same answer (one small all-reduce per step; the terms are exchanged only on
    failure), so all ranks stop with the same message instead of leaving the others blocked in the next
    collective. (ODM's L_M is a norm over the global batch: one rank's NaN makes every rank's L_M NaN.)
    """
    bad = _per_rank((~torch.isfinite(loss.detach())).float().reshape(1))[:, 0]
    if not bool(bad.any()):
        return {}
    values = torch.stack([v.detach().float().reshape(()) for v in terms.values()]) if terms else loss.new_zeros(0)
    rows = _per_rank(values)
    return {r: dict(zip(terms, rows[r].tolist(), strict=True)) for r in bad.nonzero()[:, 0].tolist()}


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
                 eval_cfg: dict | None = None, calibration_batches: int = 0, hparams: dict | None = None):
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
        self._metrics: dict[str, MetricAccumulator] = {}
        self.set_names: dict[str, list[str]] = {"val": [], "test": []}  # from the data module (``setup``)
        self.last_metrics: dict[str, float] = {}
        self._val_started = 0.0
        # wall time of training (calibration included) and of validating during fit; a resumed run adds the time of
        # the run it continues (from the checkpoint), so results.json reports the whole run
        self.seconds_before = {"train": 0.0, "validation": 0.0}
        self._fit_started: float | None = None
        self._validation_this_fit = 0.0
        self.balance_sum, self.balance_steps = 0.0, 0  # running sum of mr/rho (ODM): its run mean in results
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

    def _calibration_batches(self) -> Iterator[Tensor]:
        loader = self.trainer.datamodule.train_dataloader()
        for i, batch in enumerate(loader):
            if i >= self.calibration_batches:
                break
            yield batch["lr"].to(self.device) * self.pixel_range

    # -- training -------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt = self.optimizers()
        sched = self.lr_schedulers()
        lr, hr = batch["lr"] * self.pixel_range, batch["hr"] * self.pixel_range
        out = self.method.training_losses(self.net, lr, hr, self.global_step_count, teacher=self.teacher)
        if out is None:  # e.g. DDTB's calibration epoch: no optimizer step, the schedule still advances
            sched.step()
            self._step_count += 1
            return None
        loss = out.loss.detach()
        bad = non_finite_ranks(loss, out.terms)
        if bad:
            raise NonFiniteLossError(self._non_finite_message(bad))
        logs = self.method.backward(out, self.net, self.manual_backward)
        clip = float(self.optim_cfg.get("grad_clip", 0.0))
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        self._step_count += 1
        self._log_train(loss, out.terms, {**out.logs, **logs}, opt)
        return None

    def _non_finite_message(self, bad: dict[int, dict[str, float]]) -> str:
        """The stop message: each bad rank's loss terms (rank-prefixed under DDP) and advice that works (resume
        applies the new optim.* values: ``trainer_checkpoint.CurrentOptimSettingsOnResume``)."""
        prefix = "rank {}: " if world_size() > 1 else ""
        terms = "; ".join(prefix.format(r) + ", ".join(f"{k}={v:.4g}" for k, v in t.items()) for r, t in bad.items())
        callback = self._trainer.checkpoint_callback if self._trainer is not None else None  # None: no Trainer
        last = (callback.last_model_path if callback is not None else "") or "<run>/checkpoints/last.ckpt"
        lower = float(self.optim_cfg.get("lr", 1e-4)) / 10
        return (f"non-finite training loss at step {self.global_step_count} ({terms}); stopping. The last good "
                f"checkpoint is kept: continue from it with a lower learning rate, resume={last} "
                f"optim.lr={lower:.3g} (the new optim.* values replace the checkpoint's), or check the data.")

    @property
    def global_step_count(self) -> int:
        """Iterations done, including steps without an optimizer step (Lightning's global_step skips those)."""
        return int(self._step_count)

    _step_count = 0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
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
    def balance_mean(self) -> float | None:
        """The run's mean of ρ = λ_M·w·‖g_M‖/‖g_R‖ over its optimizer steps (None without MR)."""
        return self.balance_sum / self.balance_steps if self.balance_steps else None

    def _log_train(self, loss: Tensor, terms: dict, logs: dict, opt) -> None:
        values = {"train/loss": float(loss)}
        values.update({f"train/loss_{k}": float(v.detach()) for k, v in terms.items()})
        # a method's key with a '/' is a panel of its own (mr/rho), the rest go under train/
        values.update({k if "/" in k else f"train/{k}": float(v) for k, v in logs.items()})
        if "mr/rho" in logs:
            self.balance_sum += float(logs["mr/rho"])
            self.balance_steps += 1
        for group in opt.optimizer.param_groups if hasattr(opt, "optimizer") else opt.param_groups:
            values[f"lr/{group.get('name', 'group')}"] = float(group["lr"])
        every = max(1, int(getattr(self.trainer, "log_every_n_steps", 50)))
        if self._step_count % every == 0:
            values.update({f"quant/{k}": float(v) for k, v in self.method.log_stats(self.net).items()})
            values.update({f"mr/{k}": v for k, v in to_floats(self.method.balance_stats()).items()})
        self.log_dict(values, on_step=True, on_epoch=False, prog_bar=False, batch_size=1)
        self.log("loss", float(loss), prog_bar=True, on_step=True, logger=False, batch_size=1)

    # -- evaluation -----------------------------------------------------------------------------------
    def _eval_step(self, stage: str, batch: dict, dataloader_idx: int) -> None:
        names = self.set_names.get(stage) or []
        set_name = names[dataloader_idx] if dataloader_idx < len(names) else f"set{dataloader_idx}"
        acc = self._metrics.setdefault(f"{stage}/{set_name}", MetricAccumulator())
        accumulate(acc, self.upscale(batch["lr"]), batch["hr"], int(self.net.scale), batch.get("name"))

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def _flush(self, stage: str) -> None:
        values = {}
        keys = [k for k in self._metrics if k.startswith(stage + "/")]
        if world_size() > 1:  # DDP: the same sets in the same order on every rank (merging is a collective)
            keys = list(dict.fromkeys([f"{stage}/{name}" for name in self.set_names.get(stage) or []] + keys))
        for key in keys:
            acc = merge_across_ranks(self._metrics.pop(key, None) or MetricAccumulator())
            if acc.count:
                values[f"{key}/psnr"] = acc.psnr
                values[f"{key}/ssim"] = acc.ssim
        self.last_metrics = {**self.last_metrics, **values}
        if values:
            self.log_dict(values, add_dataloader_idx=False, batch_size=1)

    def on_validation_epoch_start(self) -> None:
        self._val_started = time.perf_counter()

    def on_validation_epoch_end(self) -> None:
        self._flush("val")
        self._validation_this_fit += time.perf_counter() - self._val_started

    def on_test_epoch_start(self) -> None:
        self.last_metrics = {}  # a test run reports its own sets only

    def on_test_epoch_end(self) -> None:
        self._flush("test")
