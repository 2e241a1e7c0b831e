"""Loading trained odm-sr checkpoints (Lightning ``.ckpt``) back into a network for eval / upscale."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load`` with ``weights_only=True``; clear errors for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling error means "not a checkpoint we can read"
        raise ValueError(f"checkpoint {path}: cannot be read as a PyTorch checkpoint ({err})") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"checkpoint {path}: not an odm-sr training checkpoint (expected a Lightning .ckpt "
                         f"with 'state_dict' and 'hyper_parameters'; for official .pt/.pth files use "
                         f"model.pretrained=...)")
    return ckpt


def load_trained(path: str | Path) -> tuple[nn.Module, DictConfig]:
    """The trained (quantized) network of an odm-sr checkpoint and the config it was trained with."""
    from .train import build_network

    ckpt = read_checkpoint(path)
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["cfg"])
    cfg.model.pretrained = None  # the checkpoint holds every weight
    net, _, _ = build_network(cfg)
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: does not match the network its config builds "
                         f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
    return net.eval(), cfg
