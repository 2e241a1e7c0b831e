"""LSQ weight quantizer, the alternative to ODM's weight clipping correction (METHODS.md §4.4, Table S7).

Used by ``ODM`` with ``weight_quantizer=lsq``; everything else (activation ranges, mismatch loss, cooperative
update) is unchanged. Source: Esser et al., "Learned Step Size Quantization", ICLR 2020, §2.1–2.2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .functional import clipped_backward, grad_scale, percentile, symmetric_quantize
from .quantizer import Quantizer

GRIDS = ("lsq_integer", "odm_symmetric")


def lsq_levels(bits: int, signed: bool = True) -> tuple[int, int]:
    """(Q_N, Q_P) of LSQ's integer grid clip(v, −Q_N, Q_P): signed 2^(b−1), 2^(b−1) − 1; unsigned 0, 2^b − 1."""
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def lsq_init_step(x: Tensor, q_p: int) -> Tensor:
    """LSQ's step initialisation 2·mean|x|/√Q_P (Esser et al. 2020, §2.1), detached, as a 0-d tensor."""
    return (2.0 * x.detach().abs().mean() / math.sqrt(q_p)).reshape(())


def lsq_grad_factor(numel: int, q_p: int) -> float:
    """LSQ's step-gradient scale g = 1/√(N·Q_P) (Esser et al. 2020, §2.2)."""
    return 1.0 / math.sqrt(numel * q_p)


class _LsqQuant(torch.autograd.Function):
    """W_q = s·Int(clip(W/s, −Q_N, Q_P)) with ∂W_q/∂W = 1[−Q_N < W/s < Q_P] and ∂W_q/∂s = factor·(Int(W/s) − W/s)
    inside, factor·(−Q_N) below and factor·Q_P above (Esser et al. 2020, eqs. 3–5; ``factor`` is the gradient
    scale g). The forward uses s's value as ``grad_scale`` gives it, (s − g·s) + g·s, which the export
    reproduces (``export.spec``)."""

    @staticmethod
    def forward(ctx, w: Tensor, scale: Tensor, q_n: int, q_p: int, factor: float) -> Tensor:
        s = scale if factor == 1.0 else (scale - scale * factor) + scale * factor
        v = w / s
        c = torch.clamp(v, -q_n, q_p)
        inside = torch.gt(v, -q_n).logical_and_(torch.lt(v, q_p))  # strict, as torch.clamp's gradient: W/s on a
        # bound counts as clipped (∂/∂W = 0, ∂/∂s = the bound)
        r = torch.round(c)
        d = torch.where(inside, r - v, c) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(inside, d, scale)
        ctx.factor = factor
        return r.mul_(s)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return (*clipped_backward(ctx, grad_out), None, None, None)


class LsqWeightQuantizer(Quantizer):
    """One learnable step per layer.

    ``grid=lsq_integer`` (published LSQ): W_q = s·Int(clip(W/s, −Q_N, Q_P)), Q_N = 2^(b−1), Q_P = 2^(b−1) − 1,
    so 2-bit levels are {−2s, −s, 0, s}; ∂W_q/∂s = Int(W/s) − W/s inside, −Q_N below, Q_P above;
    init s = 2·mean|W|/√Q_P.
    ``grid=odm_symmetric``: ``scale`` is u_w itself, learned directly on ODM's symmetric no-zero grid
    (``functional.symmetric_quantize``), init P_99(|W|) over the whole tensor.
    In both grids the gradient of ``scale`` is multiplied by 1/√(N_W·Q_P) (``grad_scale=True``).
    """

    def __init__(self, bits: int, weight: Tensor, grid: str = "lsq_integer", use_grad_scale: bool = True):
        super().__init__()
        if grid not in GRIDS:
            raise ValueError(f"lsq.grid={grid!r}: expected one of {GRIDS}")
        self.bits = int(bits)
        self.grid = grid
        self.q_n, self.q_p = lsq_levels(self.bits)
        self.grad_factor = lsq_grad_factor(weight.numel(), self.q_p) if use_grad_scale else 1.0
        w = weight.detach()
        if grid == "lsq_integer":
            init = lsq_init_step(w, self.q_p)
        else:
            init = percentile(w.abs(), 99.0)
        self.scale = nn.Parameter(init.to(w.dtype).clone().reshape(()))

    def forward(self, w: Tensor) -> Tensor:
        s = self.scale.to(w.dtype)
        if self.grid == "lsq_integer":
            return _LsqQuant.apply(w, s, self.q_n, self.q_p, self.grad_factor)
        return symmetric_quantize(w, grad_scale(s, self.grad_factor), self.bits)

    @torch.no_grad()
    def clip_bound(self) -> Tensor:
        """The largest representable magnitude: Q_N·s (lsq_integer) or u_w (odm_symmetric)."""
        return self.scale * self.q_n if self.grid == "lsq_integer" else self.scale.clone()

    def weight_clip_bound(self, weight: Tensor) -> Tensor:
        """``clip_bound()`` (learned, independent of ``weight``)."""
        return self.clip_bound()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, grid={self.grid}"
