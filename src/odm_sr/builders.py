"""Turn a composed config into objects, each built once: method (with its bits), backbone and quantized network
(checked against the method), data module, loggers, callbacks."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig
from torch import nn

from .config import instantiate
from .quant import QuantMethod, build_method
from .quant.base import frozen_copy
from .wandb_mode import offline_fallback


def build_backbone(model_cfg: DictConfig) -> nn.Module:
    """The float backbone of ``model`` (random init)."""
    return instantiate(model_cfg, pretrained=None, _convert_="all")


def pretrained_network(model_cfg: DictConfig) -> nn.Module:
    """The float backbone with the weights of ``model.pretrained``."""
    return instantiate(model_cfg, pretrained=str(model_cfg.pretrained), _convert_="all")


def build_network(cfg: DictConfig,
                  method: QuantMethod | None = None) -> tuple[nn.Module, QuantMethod, nn.Module | None]:
    """Backbone (+ FP weights) → frozen teacher copy if the method needs one → quantized network, by ``method``
    (built here from ``cfg.method`` / ``cfg.bits`` when None), which checks the backbone it gets."""
    method = build_method(cfg.method, cfg.bits) if method is None else method
    pretrained = bool(cfg.model.get("pretrained"))
    net = pretrained_network(cfg.model) if pretrained else build_backbone(cfg.model)
    method.check_backbone(net)
    teacher = frozen_copy(net) if method.needs_teacher else None
    if pretrained and not method.init_from_fp:
        net = build_backbone(cfg.model)  # PAMS as released: only the teacher gets the FP weights
    return method.quantize(net), method, teacher


def build_datamodule(cfg: DictConfig):
    """``hydra.utils.instantiate(cfg.data)``: ``conf/data/*.yaml`` name ``odm_sr.data.SRDataModule``."""
    return instantiate(cfg.data, _convert_="all")


def _group_nodes(group: DictConfig | None) -> list[DictConfig]:
    return [node for node in (group or {}).values() if isinstance(node, DictConfig) and "_target_" in node]


def build_loggers(cfg: DictConfig) -> list:
    """The ``logger`` group's loggers. ``$WANDB_MODE`` (online, offline, disabled), when set, decides the wandb
    mode: ``logger.wandb.offline`` (true: offline by default) is then overridden with false, since Lightning's
    ``offline=True`` forces offline mode whatever the environment says; online with an unreachable server logs
    offline, with a warning (``wandb_mode.offline_fallback``)."""
    return [hydra.utils.instantiate(node, **({"offline": offline_fallback(bool(node.get("offline", False)))}
                                             if "WandbLogger" in node._target_ else {}))
            for node in _group_nodes(cfg.get("logger"))]


def build_callbacks(cfg: DictConfig) -> list:
    best = best_checkpoint(cfg)
    return [hydra.utils.instantiate(node) for node in _group_nodes(cfg.get("callbacks"))] + (
        [best] if best is not None else [])


def best_checkpoint(cfg: DictConfig):
    """With ``eval.select_best_on=<val set>``: a ModelCheckpoint keeping ``checkpoints/best.ckpt``, the checkpoint
    of the highest PSNR on that set, beside ``last.ckpt`` (the released PAMS/DDTB trainers pick on Set14, DAQ's on
    Set5; METHODS.md §4). None when the key is null (the default: keep the last)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    name = cfg.get("eval", {}).get("select_best_on")
    if name is None:
        return None
    if name not in list(cfg.data.val):
        raise ValueError(f"eval.select_best_on={name!r}: expected one of the validation sets data.val="
                         f"{list(cfg.data.val)} (or null to keep the last checkpoint)")
    return ModelCheckpoint(dirpath=str(Path(cfg.paths.output_dir) / "checkpoints"), filename="best",
                           monitor=f"val/{name}/psnr", mode="max", save_top_k=1, save_last=False,
                           auto_insert_metric_name=False, save_on_train_epoch_end=False)


def selected_checkpoint(trainer) -> dict:
    """Which weights the test rows come from, for results.json: {"select_best_on": <set> | None, "checkpoint":
    "best" | "last", "path": <best.ckpt> | None, "val_psnr": its PSNR on that set | None}. "last" (the weights at
    the end of training) without ``eval.select_best_on``, or when no validation has written best.ckpt yet."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    best = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.filename == "best"), None)
    name = best.monitor.split("/")[1] if best is not None else None
    if best is None or not best.best_model_path:
        return {"select_best_on": name, "checkpoint": "last", "path": None, "val_psnr": None}
    return {"select_best_on": name, "checkpoint": "best", "path": best.best_model_path,
            "val_psnr": float(best.best_model_score)}
