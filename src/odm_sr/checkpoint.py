"""Loading trained odm-sr checkpoints (Lightning ``.ckpt``) back into a network for eval / upscale."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .models.checkpoint import load_torch_file


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load`` with ``weights_only=True``; clear errors for a missing or foreign file."""
    ckpt = load_torch_file(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"checkpoint {path}: not an odm-sr training checkpoint (expected a Lightning .ckpt "
                         f"with 'state_dict' and 'hyper_parameters'; for official .pt/.pth files use "
                         f"model.pretrained=...)")
    return ckpt


def load_trained(path: str | Path) -> tuple[nn.Module, DictConfig]:
    """The trained (quantized) network of an odm-sr checkpoint and the config it was trained with."""
    from .builders import build_network

    ckpt = read_checkpoint(path)
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["cfg"])
    build_cfg = cfg.copy()
    build_cfg.model.pretrained = None  # the checkpoint holds every weight; cfg keeps the run's FP source
    net, _, _ = build_network(build_cfg)
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: does not match the network its config builds "
                         f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
    return net.eval(), cfg


def atomic_write(path: str | Path, write) -> None:
    """``write(f)`` into ``.<name>.tmp`` beside ``path`` (binary), fsync, then rename it over ``path``
    (``os.replace`` is atomic on POSIX): readers see the old file or the complete new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never leaves a half-written checkpoint that looks valid: it writes
    ``.<name>.tmp`` beside the target, fsyncs it and renames it over the target (``os.replace`` is atomic on
    POSIX). Loading uses ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"resume checkpoint {path}: no such file")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
