"""The interface every quantization method implements, and the full-precision method.

The LightningModule (``odm_sr.lit_module``) only orchestrates: it calls, in order,
``quantize`` (once, model surgery), ``calibrate`` (once, before the first step), ``param_groups`` (optimizer),
then per step ``training_losses`` and ``backward``. A method is one file in ``quant/`` plus one YAML in
``conf/method/`` whose ``_target_`` names its class; adding a method touches nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from odm_sr.checks import check_bool, check_choice, check_number, check_range  # noqa: F401 (re-exported)

from .backbones import BACKBONES, Backbone, backbone_of


@dataclass
class StepOutput:
    """What a method's training step produced: the SR output, the loss terms (summed for the backward unless
    the method overrides ``backward``), extra scalars to log, and the objective's value (``objective``; the sum
    of the terms when None) that is logged as ``train/loss`` and checked for NaN/inf."""

    sr: Tensor
    terms: dict[str, Tensor]
    logs: dict[str, float] = field(default_factory=dict)
    objective: Tensor | None = None

    @property
    def loss(self) -> Tensor:
        return self.objective if self.objective is not None else sum(self.terms.values())


@dataclass(frozen=True)
class Bits:
    """Bit-widths: weights, activations and (full quantization) skip-connection operands. 32 = float."""

    w: int = 32
    a: int = 32
    sc: int = 32

    @property
    def is_float(self) -> bool:
        return self.w >= 32 and self.a >= 32


def to_dict(cfg: Any) -> dict:
    """A plain dict from a DictConfig / dict / None (methods read plain values only)."""
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def method_options(cfg: Any, options: dict) -> dict:
    """The method's options: the plain dict of ``cfg`` (every key of its composed ``conf/method/*.yaml``)
    updated by the keyword ``options``."""
    return {**to_dict(cfg), **options}


class QuantMethod:
    """Base class: full-precision training with an L1 reconstruction loss.

    Options are the keys of ``conf/method/<name>.yaml`` as the run composed them (all present: the defaults reach
    the method through the composed config; ``odm_sr.config.method_defaults`` + ``merge_config`` complete a
    partial one), given as a mapping ``cfg`` and/or keyword arguments (``hydra.utils.instantiate``)."""

    name = "fp"
    needs_teacher = False  # True: the LightningModule keeps a frozen FP copy and passes it as ``teacher``
    per_image_statistics = False  # True: activations are quantized with statistics of the whole input image,
    # so a tiled forward (eval.tile, odm-sr-upscale --tile) differs from the whole-image one
    # True: some steps leave parameters out of the loss's graph on purpose, so DDP must look for unused parameters
    # (odm_sr.train.ddp_strategy); their gradients stay None there as in a single process (Adam skips them)
    ddp_unused_parameters = False
    init_from_fp = True  # False: only the teacher gets model.pretrained's weights (PAMS's random_student_init)
    calibration_batches = 0  # training batches ``calibrate`` receives before the first step (ODM: init.num_batches)

    def __init__(self, cfg: Any = None, bits: Bits | None = None, **options: Any):
        self.cfg = method_options(cfg, options)
        self.bits = bits or Bits()
        self.name = str(self.cfg.get("name", self.name))  # the config's name (e.g. odm_fq, lsq)

    # -- set-up ---------------------------------------------------------------------------------------
    def quantize(self, model: nn.Module) -> nn.Module:
        """Swap the placement's layers for quantized ones (in place) and return the model."""
        return model

    def calibrate(self, model: nn.Module, batches: Iterable[Tensor],
                  teacher: nn.Module | None = None) -> None:
        """Initialise data-driven quantizer state from LR batches (in the model's pixel range)."""

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """Optimizer parameter groups; each has a ``name`` (logged with its lr)."""
        return [{"name": "net", "params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    # -- training -------------------------------------------------------------------------------------
    def training_losses(self, model: nn.Module, lr: Tensor, hr: Tensor, step: int,
                        teacher: nn.Module | None = None) -> StepOutput | None:
        """Forward and losses for one step. ``None`` means: no optimizer step at this step (calibration)."""
        sr = model(lr)
        return StepOutput(sr=sr, terms={"rec": F.l1_loss(sr, hr)})

    def backward(self, out: StepOutput, model: nn.Module,
                 backward_fn: Callable[[Tensor], None]) -> dict[str, Tensor | float]:
        """Fill ``.grad``; the default backpropagates the sum of the loss terms. Returns values to log (floats, or
        0-d tensors left on the device: ``SRLitModule`` moves them to the host on logging steps only)."""
        backward_fn(sum(out.terms.values()))
        return {}

    def log_stats(self, model: nn.Module) -> dict[str, float]:
        """Per-layer quantizer state to log (bounds, γ_w, ...)."""
        return {}

    def balance_stats(self) -> dict[str, Tensor]:
        """0-d tensors about the last training step, logged under ``mr/`` every ``log_every_n_steps`` (ODM: the
        per-layer share of mismatch regularisation in θ's gradient and each layer's M_i)."""
        return {}

    def gate_ratio(self) -> float | None:
        """Share of dynamic gates that complexity counts before calibration has chosen them (DDTB); None: the
        backbone's default."""
        return None

    def unsupported(self, backbone: Backbone) -> str:
        """Why this method cannot quantize ``backbone`` (appended to the error); empty when it can."""
        return ""

    def check_backbone(self, model: Any) -> Backbone:
        """The backbone table's row of ``model`` (anything with a ``name``); ValueError if unsupported."""
        spec = backbone_of(model)
        note = self.unsupported(spec)
        if note:
            supported = [f for f, s in BACKBONES.items() if not self.unsupported(s)]
            raise ValueError(f"method {self.name!r} does not support backbone {spec.family!r}; "
                             f"supported: {', '.join(supported)}{note}")
        return spec


class FullPrecision(QuantMethod):
    """Plain FP training (``method=fp``)."""


def to_floats(values: dict[str, Tensor]) -> dict[str, float]:
    """Detached 0-d tensors to floats with a single device sync."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().reshape(()).float() for v in values.values()])
    return dict(zip(values, stacked.tolist(), strict=True))


@torch.no_grad()
def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy (the FP teacher for SKT)."""
    import copy

    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
