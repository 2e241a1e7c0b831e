"""Structured knowledge transfer (SKT), the attention-transfer loss shared by PAMS and DDTB (METHODS.md §4.1).

AT(F) = L2-normalise(flatten(mean_c F²)) per sample; L_SKT = mean((AT_s − AT_t)²), as `at` / `at_loss` in
`colorjam/PAMS@737cc09` and `zysxmu/DDTB@e21403d` `utils/common.py`. F is the input of the reconstruction
part (fixed, so not a key): the EDSR tail input (body output + global skip), the RDN UPNet input
(GFF output + SFENet1), and on SwinIR/HAT `conv_after_body(...) + x`, the input of `conv_before_upsample`
(pixelshuffle upsamplers) or of `upsample` (SwinIR-light's pixelshuffledirect).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import backbone_of
from .base import Bits, QuantMethod, check_number
from .blocks import read_quirks
from .calibration import StopForward


def attention_map(feature: Tensor) -> Tensor:
    """AT(F): mean over channels of F², flattened per sample, L2-normalised (``F.normalize``, eps 1e-12)."""
    return F.normalize(feature.pow(2).mean(1).reshape(feature.shape[0], -1), dim=1)


def skt_loss(f_student: Tensor, f_teacher: Tensor) -> Tensor:
    """mean((AT(F_s) − AT(F_t))²); the teacher side is detached, so it never receives a gradient."""
    return (attention_map(f_student) - attention_map(f_teacher.detach())).pow(2).mean()


def reconstruction_input_module(model: nn.Module) -> nn.Module:
    """The module whose input is the SKT feature F (the reconstruction input) of ``model``."""
    return backbone_of(model).skt_feature(model)


class _Captured:
    """Holds the tensor a forward pre-hook saw (``value``)."""

    value: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]


@contextmanager
def capture_reconstruction_input(model: nn.Module) -> Iterator[_Captured]:
    """``with capture_reconstruction_input(model) as feat: model(x)`` leaves F in ``feat.value``."""
    captured = _Captured()
    handle = reconstruction_input_module(model).register_forward_pre_hook(captured)
    try:
        yield captured
    finally:
        handle.remove()


def check_skt_config(skt: dict) -> float:
    """Validate ``skt.weight`` (≥ 0); returns it."""
    return float(check_number(skt, "weight", "skt."))


class SktMethod(QuantMethod):
    """What PAMS and DDTB share (METHODS.md §4.1, §4.3): the frozen FP teacher of the SKT loss and the options
    ``quirks`` / ``official``, ``skt.weight``, ``scale_release_constants``, ``iters_per_epoch``, ``qparam_lr`` (the
    clipping parameters' lr) and ``placement``, read and checked here once for both."""

    needs_teacher = True

    def __init__(self, cfg: Any = None, bits: Bits | None = None, **options: Any):
        super().__init__(cfg, bits, **options)
        self.quirks = read_quirks(self.cfg)
        self.skt_weight = check_skt_config(self.cfg["skt"])
        self.scale_release = bool(self.cfg["scale_release_constants"])
        self.iters_per_epoch = int(check_number(self.cfg, "iters_per_epoch", positive=True))
        self.qparam_lr = float(check_number(self.cfg, "qparam_lr", positive=True))
        self.placement = self.cfg["placement"]


def teacher_feature(teacher: nn.Module, lr: Tensor) -> Tensor:
    """F of the frozen teacher on ``lr``, without gradients, stopping the forward at the reconstruction input.

    The SKT loss needs only F, so the upsampler and last conv (most of EDSR's ×4 FLOPs) are skipped.
    """
    captured = _Captured()

    def stop(module: nn.Module, args: tuple) -> None:
        captured(module, args)
        raise StopForward  # the reconstruction part never runs

    handle = reconstruction_input_module(teacher).register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            teacher(lr)
    except StopForward:
        pass
    finally:
        handle.remove()
    if captured.value is None:
        raise RuntimeError(f"the teacher's reconstruction input was not reached ({type(teacher).__name__})")
    return captured.value


def distillation_losses(model: nn.Module, teacher: nn.Module | None, lr: Tensor, hr: Tensor,
                        weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Student forward with the PAMS/DDTB losses: ``rec`` = L1(SR, HR) and ``skt`` = weight · L_SKT.

    The teacher (frozen FP copy, eval mode) runs without gradients and only up to F (``teacher_feature``).
    Returns (sr, terms).
    """
    if teacher is None:
        raise ValueError("this method needs the FP teacher (needs_teacher=True) for its SKT loss; got None")
    feat_t = teacher_feature(teacher, lr)
    with capture_reconstruction_input(model) as feat_s:
        sr = model(lr)
    terms = {"rec": F.l1_loss(sr, hr), "skt": weight * skt_loss(feat_s.value, feat_t)}
    return sr, terms
