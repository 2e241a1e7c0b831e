"""PAMS (Li et al., ECCV 2020): learnable symmetric activation clip α, max-abs weights, SKT distillation.

Source: `colorjam/PAMS@737cc09` `model/quant_ops.py` (`quant_weight`, `pams_quant_act`), `model/edsr.py`,
`main.py`; METHODS.md §3 (symmetric with zero) and §4.1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .backbones import apply_placement
from .base import Bits, QuantMethod, StepOutput, check_number, check_range, to_floats
from .blocks import (
    ActSite,
    clip_param_groups,
    group_by_image,
    read_quirks,
    release_scale,
)
from .distributed import all_reduce_mean_, world_size
from .functional import max_abs_weight_quantize, row_grads, wanted
from .quantizer import Quantizer
from .skt import check_skt_config, distillation_losses


class _SymmetricZeroQuant(torch.autograd.Function):
    """q = Int(clip(X, −α, α)·Q/α)·α/Q, Q = 2^(b−1) − 1 (2^b − 1 levels, zero included).

    With v = X·Q/α and R = Int(v): ∂q/∂X = 1[|X| ≤ α]; ∂q/∂α = (R − v)/Q inside, sign(X) outside
    (METHODS.md §3, what autograd gives through the released clip + STE round). The forward saves the inside
    mask and ∂q/∂α per element; the backward is one multiply and one dot product.
    """

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, q_max: float) -> Tensor:
        c = torch.clamp(x, -alpha, alpha)
        inside = c == x
        v = c.mul_(q_max).div_(alpha)
        r = torch.round(v)
        d = torch.where(inside, v.sub_(r).div_(-q_max), torch.sign(x)) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(inside, d, alpha)
        return r.mul_(alpha).div_(q_max)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        inside, d, alpha = ctx.saved_tensors
        grad_alpha = row_grads(d.unsqueeze(0), grad_out, (alpha,))[0] if d is not None and wanted(ctx, 1) else None
        return (grad_out * inside if wanted(ctx, 0) else None), grad_alpha, None


class _UnclippedQuant(torch.autograd.Function):
    """The tracking epoch's q = Int(X·Q/α)·α/Q without a clip: ∂q/∂X = 1 (STE), ∂q/∂α = (R − v)/Q with
    v = X·Q/α, R = Int(v) (what autograd gives through the released ``round_ste(x·Q/α)·α/Q``)."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, q_max: float) -> Tensor:
        v = x * q_max / alpha
        r = torch.round(v)
        ctx.save_for_backward(v.sub_(r).div_(-q_max) if ctx.needs_input_grad[1] else None, alpha)
        return r.mul_(alpha).div_(q_max)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        d, alpha = ctx.saved_tensors
        grad_alpha = row_grads(d.unsqueeze(0), grad_out, (alpha,))[0] if d is not None and wanted(ctx, 1) else None
        return grad_out, grad_alpha, None


def pams_act_quantize(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """PAMS activation quantization on [−α, α] with a zero level (learnable α)."""
    return _SymmetricZeroQuant.apply(x, alpha, float(2 ** (bits - 1) - 1))


class PamsWeightQuantizer(Quantizer):
    """Max-abs symmetric weight quantizer (nothing learnable)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, w: Tensor) -> Tensor:
        return max_abs_weight_quantize(w, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class PamsActQuantizer(Quantizer):
    """Activation quantizer with one learnable α (`pams_quant_act`).

    While ``tracking`` (epoch 1) and training, nothing is clipped and α is set from the batch statistic
    s = mean over images of max|x|: the first batch sets it, later batches update an EMA with ``decay``
    (``last_batch=True``: every batch overwrites it, as released). Otherwise α clips and is learned.
    While tracking, α gets no gradient unless ``live_alpha`` (quirk ``alpha_grad_while_tracking``): the release
    quantizes with the live α, round_ste(x·Q/α)·α/Q, so α gets ∂q/∂α = (Int(v) − v)/Q (v = x·Q/α, nothing
    clipped) and Adam builds moments for it although each batch overwrites its value (`pams_quant_act.forward`).
    """

    level_grid = "symmetric_zero"

    def __init__(self, bits: int, site: ActSite, alpha_init: float = 10.0, decay: float = 0.9997,
                 last_batch: bool = False, live_alpha: bool = False) -> None:
        super().__init__()
        self.bits, self.site, self.decay, self.last_batch = bits, site, decay, last_batch
        self.live_alpha = live_alpha
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.register_buffer("running_max", torch.tensor(0.0))
        self._tracked: Tensor | None = None  # this rank's running max while tracking (see ``tracked_max``)
        self.seen = False  # a batch statistic has been recorded (saved via the extra state)
        self.tracking = True

    @torch.no_grad()
    def _track(self, x: Tensor) -> None:
        grouped = group_by_image(x.detach(), self.site)
        stat = grouped.abs().flatten(1).amax(1).mean()
        tracked = self.tracked_max()
        if self.last_batch or not self.seen:
            tracked.copy_(stat)
        else:
            tracked.mul_(self.decay).add_((1.0 - self.decay) * stat)
        self.seen = True
        self.running_max.copy_(tracked)
        self.alpha.copy_(tracked)

    def static_range(self) -> tuple[float, float]:
        """(−α, α)."""
        alpha = float(self.alpha.detach())
        return -alpha, alpha

    def tracked_max(self) -> Tensor:
        """This rank's running max of the batch statistic. DDP broadcasts rank 0's buffers before every forward
        (``broadcast_buffers``), which would make every rank continue rank 0's EMA; so the running value lives
        outside the buffers, ``running_max`` mirrors it for the state dict, and it is read back from there after
        a load (``set_extra_state``) or a move to another device or dtype."""
        t = self._tracked
        if t is None or t.device != self.running_max.device or t.dtype != self.running_max.dtype:
            self._tracked = t = self.running_max.detach().clone()
        return t

    def get_extra_state(self) -> dict[str, bool]:
        return {"seen": self.seen}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        self.seen = bool(state["seen"])
        self._tracked = None  # re-read from the loaded running_max

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.tracking:
            self._track(x)
            q_max = float(2 ** (self.bits - 1) - 1)
            alpha = self.alpha if self.live_alpha else self.alpha.detach().clamp_min(1e-8)
            return _UnclippedQuant.apply(x, alpha, q_max)  # no clipping in the tracking epoch
        return pams_act_quantize(x, self.alpha, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, decay={self.decay}, last_batch={self.last_batch}"


class PAMS(QuantMethod):
    """PAMS: W + A quantization with learnable α, L1 + ``skt.weight``·L_SKT (METHODS.md §4.1)."""

    name = "pams"
    config_name = "pams"
    needs_teacher = True

    def __init__(self, cfg: Any = None, bits: Bits | None = None, **options: Any):
        super().__init__(cfg, bits, **options)
        c = self.cfg
        self.quirks = read_quirks(c)
        self.skt_weight = check_skt_config(c["skt"])
        self.scale_release = bool(c["scale_release_constants"])
        self.alpha_init = float(check_number(c, "alpha_init", positive=True))
        self.ema_decay = float(check_range(c, "ema_decay", 0.0, 1.0, open_high=True))
        self.ema_epochs = int(check_number(c, "ema_epochs"))
        self.iters_per_epoch = int(check_number(c, "iters_per_epoch", positive=True))
        self.qparam_lr = float(check_number(c, "qparam_lr", positive=True))
        self.placement = c["placement"]

    @property
    def ddp_unused_parameters(self) -> bool:
        """α is detached in the tracking epoch (unless quirk ``alpha_grad_while_tracking``)."""
        return self.bits.a < 32 and self.ema_epochs > 0 and not self.quirks["alpha_grad_while_tracking"]

    @property
    def init_from_fp(self) -> bool:
        """False under ``quirks.random_student_init``: the loader then leaves the student randomly initialised
        (only the teacher gets the FP weights, `colorjam/PAMS#15`)."""
        return not self.quirks["random_student_init"]

    def quantize(self, model: nn.Module) -> nn.Module:
        self.check_backbone(model)
        make_act = None if self.bits.a >= 32 else (
            lambda site: PamsActQuantizer(self.bits.a, site, self.alpha_init, self.ema_decay,
                                      self.quirks["alpha_last_batch"], self.quirks["alpha_grad_while_tracking"]))
        make_weight = None if self.bits.w >= 32 else (lambda name, layer: PamsWeightQuantizer(self.bits.w))
        return apply_placement(model, self.placement, make_act, make_weight, self.quirks)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        alphas = [m.alpha for m in model.modules() if isinstance(m, PamsActQuantizer)]
        return clip_param_groups(model, alphas, lr, self.qparam_lr * release_scale(model, self.scale_release))

    def training_losses(self, model: nn.Module, lr: Tensor, hr: Tensor, step: int,
                        teacher: nn.Module | None = None) -> StepOutput:
        tracking = step // self.iters_per_epoch < self.ema_epochs
        quants = [m for m in model.modules() if isinstance(m, PamsActQuantizer)]
        if not tracking and any(m.tracking for m in quants) and world_size() > 1:
            # DDP: each rank tracked α on its own shard; from here on α is learned, from the ranks' mean
            all_reduce_mean_([t for m in quants for t in (m.alpha.data, m.tracked_max())])
            for m in quants:
                m.running_max.copy_(m.tracked_max())
        for m in quants:
            m.tracking = tracking
        sr, terms = distillation_losses(model, teacher, lr, hr,
                                        self.skt_weight * release_scale(model, self.scale_release))
        return StepOutput(sr=sr, terms=terms, logs={"alpha_tracking": float(tracking)})

    def log_stats(self, model: nn.Module) -> dict[str, float]:
        quants = {n: m for n, m in model.named_modules() if isinstance(m, PamsActQuantizer)}
        stats = to_floats({f"alpha/{n}": m.alpha for n, m in quants.items()})
        if quants:
            stats["alpha/mean"] = sum(stats.values()) / len(quants)
        return stats
