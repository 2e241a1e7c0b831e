"""Loading trained odm-sr checkpoints (Lightning ``.ckpt``) back into a network for eval / upscale (without
importing Lightning: ``odm_sr.trainer_checkpoint`` holds the pieces the trainer uses)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from .models.checkpoint import load_torch_file
from .stored_config import stored_config


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """``torch.load`` with ``weights_only=True``; clear errors for a missing or foreign file."""
    ckpt = load_torch_file(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{what} {path}: not an odm-sr training checkpoint (expected a Lightning .ckpt "
                         f"with 'state_dict' and 'hyper_parameters'; for official .pt/.pth files use "
                         f"model.pretrained=...)")
    return ckpt


def load_trained(path: str | Path) -> tuple[nn.Module, DictConfig]:
    """The trained (quantized) network of an odm-sr checkpoint and the config it was trained with."""
    from .builders import build_network

    ckpt = read_checkpoint(path)
    cfg = stored_config((ckpt["hyper_parameters"] or {}).get("cfg"), f"checkpoint {path}")
    build_cfg = cfg.copy()
    build_cfg.model.pretrained = None  # the checkpoint holds every weight; cfg keeps the run's FP source
    net, _, _ = build_network(build_cfg)
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: does not match the network its config builds "
                         f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
    check_finite(state, path)
    return net.eval(), cfg


def check_finite(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """ValueError naming the tensors that hold NaN/inf (a diverged run's weights give black images, no error)."""
    bad = [k for k, v in state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"checkpoint {path}: {len(bad)} tensor(s) hold NaN or inf, e.g. {bad[:5]}; the run "
                         f"diverged before this checkpoint was written. Use an earlier checkpoint of the run.")
