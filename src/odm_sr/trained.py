"""Loading a trained odm-sr run back: its Lightning ``.ckpt`` read (``read_checkpoint``), the network and method
its stored config builds (``build_stored``), its weights loaded and checked (``load_trained``); without importing
Lightning (``odm_sr.resume`` holds the trainer's side)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from .builders import build_network
from .config import complete_method
from .models.weights import load_torch_file
from .quant import QuantMethod
from .stored_config import stored_config


class Trained(NamedTuple):
    """A trained run: its network (eval mode, weights loaded), the method that quantized it, its config."""

    net: nn.Module
    method: QuantMethod
    cfg: DictConfig


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """``torch.load`` with ``weights_only=True``; clear errors for a missing or foreign file."""
    ckpt = load_torch_file(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{what} {path}: not an odm-sr training checkpoint (expected a Lightning .ckpt "
                         f"with 'state_dict' and 'hyper_parameters'; for official .pt/.pth files use "
                         f"model.pretrained=...)")
    return ckpt


def build_stored(cfg: DictConfig) -> tuple[nn.Module, QuantMethod]:
    """The quantized network (random weights: ``model.pretrained`` is not read) and the method that a stored run
    config builds (checkpoint, packed file); ``cfg`` comes through ``stored_config.stored_config`` (checked, retired
    keys dropped) and is left as it is, the method keys added since the run are filled with their defaults."""
    build_cfg = copy.deepcopy(cfg)
    with open_dict(build_cfg):
        build_cfg.model.pretrained = None  # the stored weights replace them; cfg keeps the run's FP source
        build_cfg.method = complete_method(build_cfg.method)
    net, method, _ = build_network(build_cfg)
    return net, method


def load_trained(path: str | Path) -> Trained:
    """The trained (quantized) network of an odm-sr checkpoint, its method and the config it was trained with."""
    ckpt = read_checkpoint(path)
    cfg = stored_config((ckpt["hyper_parameters"] or {}).get("cfg"), f"checkpoint {path}")  # checked data
    net, method = build_stored(cfg)
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: does not match the network its config builds "
                         f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
    check_finite(state, path)
    return Trained(net.eval(), method, cfg)


def check_finite(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """ValueError naming the tensors that hold NaN/inf (a diverged run's weights give black images, no error)."""
    bad = [k for k, v in state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"checkpoint {path}: {len(bad)} tensor(s) hold NaN or inf, e.g. {bad[:5]}; the run "
                         f"diverged before this checkpoint was written. Use an earlier checkpoint of the run.")
