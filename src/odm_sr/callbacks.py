"""Lightning callbacks for the wandb dashboards: weight/activation histograms and SR crops.

Both do nothing unless a ``WandbLogger`` is attached, so the callback config can stay on for csv/none runs.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from .evaluation import bicubic_upscale
from .quant.layers import quantized_layers


def _wandb_loggers(trainer: L.Trainer) -> list:
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _subsample(x: Tensor, limit: int = 20000) -> Tensor:
    flat = x.detach().reshape(-1).float().cpu()
    if flat.numel() > limit:  # a fixed stride keeps the histogram's shape at a fraction of the cost
        flat = flat[:: flat.numel() // limit + 1]
    return flat


class WandbHistograms(L.Callback):
    """Every ``every_n_steps``: histograms of each quantized layer's latent weights and of the activations it
    received in that step's training forward (captured by pre-hooks that are armed only on those steps)."""

    def __init__(self, every_n_steps: int = 500):
        self.every_n_steps = int(every_n_steps)
        self._armed = False
        self._acts: dict[str, Tensor] = {}
        self._handles: list = []

    def _layers(self, pl_module) -> dict[str, nn.Module]:
        layers = quantized_layers(pl_module.net)
        return layers or {n: m for n, m in pl_module.net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}

    def on_fit_start(self, trainer, pl_module) -> None:
        if not _wandb_loggers(trainer) or self.every_n_steps <= 0:
            return
        for name, layer in self._layers(pl_module).items():
            self._handles.append(layer.register_forward_pre_hook(self._capture(name)))

    def _capture(self, name: str):
        def hook(_module, args):
            if self._armed:
                self._acts[name] = _subsample(args[0])
        return hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._armed = bool(self._handles) and pl_module.global_step_count % self.every_n_steps == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._armed:
            return
        import wandb

        self._armed = False
        step = pl_module.global_step_count
        data = {f"hist/act/{n}": wandb.Histogram(v.numpy()) for n, v in self._acts.items()}
        data.update({f"hist/weight/{n}": wandb.Histogram(_subsample(layer.weight).numpy())
                     for n, layer in self._layers(pl_module).items()})
        for logger in _wandb_loggers(trainer):
            logger.experiment.log(data, step=step)
        self._acts.clear()

    def on_fit_end(self, trainer, pl_module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class WandbSRCrops(L.Callback):
    """After each validation: for the first image of each validation set, a crop of bicubic | SR | HR side by
    side (``crop`` HR pixels, centred)."""

    def __init__(self, crop: int = 96):
        self.crop = int(crop)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx != 0 or not _wandb_loggers(trainer):
            return
        import wandb

        scale = int(pl_module.net.scale)
        lr = _centre_crop(batch["lr"][:1], max(self.crop // scale, 8))
        with torch.no_grad():
            sr = pl_module.upscale(lr).clamp(0, 1)
        bic = bicubic_upscale(scale)(lr).clamp(0, 1)
        top, left = _centre_offsets(batch["lr"][:1], lr.shape[-1])
        hr = batch["hr"][:1, :, top * scale: top * scale + sr.shape[-2], left * scale: left * scale + sr.shape[-1]]
        hr = hr.expand(-1, 3, -1, -1) if hr.shape[1] == 1 else hr
        panel = torch.cat([bic, sr, hr], dim=-1)[0].permute(1, 2, 0).mul(255).round().byte().cpu().numpy()
        names = pl_module.set_names.get("val") or []
        set_name = names[dataloader_idx] if dataloader_idx < len(names) else str(dataloader_idx)
        for logger in _wandb_loggers(trainer):
            logger.experiment.log({f"crops/{set_name}": wandb.Image(panel, caption="bicubic | SR | HR")},
                                  step=pl_module.global_step_count)


def _centre_offsets(x: Tensor, size: int) -> tuple[int, int]:
    return max((x.shape[-2] - size) // 2, 0), max((x.shape[-1] - size) // 2, 0)


def _centre_crop(x: Tensor, size: int) -> Tensor:
    top, left = _centre_offsets(x, size)
    return x[..., top: top + size, left: left + size]
