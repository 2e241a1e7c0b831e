"""Integer view of a trained static-quantized network: activation grids and integer weight codes.

Every static quantizer of METHODS.md §3 maps a tensor onto a uniform grid, so a quantized layer's input is
``offset + k·step`` with an unsigned code k and its weight is ``code·scale`` with a signed integer code:

- ODM activations (``OdmActQuantizer``): k = Int((clip(X, l_a, u_a) − l_a)/s_a) ∈ [0, 2^b − 1], value
  l_a + k·s_a, s_a = (u_a − l_a)/n. The offset l_a is in general not a multiple of s_a (folded in ``graph``).
- PAMS activations (``PamsActQuantizer``): R = Int(clip(X, −α, α)·Q/α) ∈ [−Q, Q], Q = 2^(b−1) − 1; the code
  k = R + Q ∈ [0, 2Q] with zero point Q (zero is a level, so zero padding is the code Q).
- ODM weights (``WeightClipQuantizer``, LSQ ``odm_symmetric``): R = Int((clip(W, −u, u) + u)/s), s = 2u/n; the
  levels −u + R·s = (2R − n)·u/n are odd integers times u/n ("no zero level", §3).
- PAMS weights (``PamsWeightQuantizer``): Int(W·Q/m), m = max|W| + 1e-8, scale m/Q (2 bits: ternary).
- LSQ weights (``lsq_integer``): Int(clip(W/s, −Q_N, Q_P)), scale s.

Codes are computed with the quantizers' own float32 operations and checked against the fake-quant
weight bit for bit (``weight_codes``), so the integer model sees exactly the codes training saw.
DAQ and DDTB are refused: their ranges are computed per image at test time (``check_static``). FQSR is refused
too: its ranges are static, but it re-quantizes each conv's output and its zero padding, which this graph has no
form for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from odm_sr.quant.daq import DaqActQuantizer, DaqWeightQuantizer
from odm_sr.quant.ddtb import DdtbActQuantizer, DdtbWeightQuantizer
from odm_sr.quant.fqsr import FqsrQuantizer
from odm_sr.quant.functional import grad_scale
from odm_sr.quant.lsq import LsqWeightQuantizer
from odm_sr.quant.odm import OdmActQuantizer, WeightClipQuantizer
from odm_sr.quant.pams import PamsActQuantizer, PamsWeightQuantizer
from odm_sr.quant.quantizer import Quantizer

ACT_QUANTIZERS = (OdmActQuantizer, PamsActQuantizer)


class ExportError(ValueError):
    """The model cannot be exported as an integer graph (the message says which module and why)."""


@dataclass(frozen=True)
class ActGrid:
    """A static activation grid. ``params``: (l_a, u_a) for ``odm``, (α,) for ``pams`` (float32 values)."""

    kind: str
    bits: int
    params: tuple[float, ...]

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(torch.tensor(p, dtype=torch.float32) for p in self.params)

    @property
    def levels(self) -> int:
        """n = 2^b − 1 (ODM) or Q = 2^(b−1) − 1 (PAMS): the divisor of the quantizer's step."""
        return 2 ** self.bits - 1 if self.kind == "odm" else 2 ** (self.bits - 1) - 1

    def step(self) -> Tensor:
        """s_a as the quantizer computes it in float32: (u − l)/n (ODM, ``_UniformQuant``) or α/Q (PAMS)."""
        if self.kind == "odm":
            lower, upper = self.tensors()
            return (upper - lower) / float(self.levels)
        return self.tensors()[0] / float(self.levels)

    @property
    def zero_point(self) -> int | None:
        """The code of the value 0 where it is an integer (PAMS: Q), else None (ODM: folded offset)."""
        return self.levels if self.kind == "pams" else None

    def codes(self, x: Tensor) -> Tensor:
        """The unsigned codes k of ``x`` (float), with the quantizer's own float32 operations and order."""
        if self.kind == "odm":
            lower, upper = self.tensors()
            v = torch.minimum(torch.maximum(x, lower), upper)
            return torch.round((v - lower) / self.step())
        (alpha,) = self.tensors()
        v = torch.minimum(torch.maximum(x, -alpha), alpha)
        return torch.round(v * float(self.levels) / alpha) + float(self.levels)

    def fake(self, x: Tensor) -> Tensor:
        """The fake-quant value, as the quantizer's forward computes it (eval mode)."""
        if self.kind == "odm":
            lower, _ = self.tensors()
            return self.codes(x) * self.step() + lower
        (alpha,) = self.tensors()
        return (self.codes(x) - float(self.levels)) * alpha / float(self.levels)

    def dequantize(self, k: Tensor) -> Tensor:
        """offset + k·step in float64 (the exact value the integer graph represents)."""
        step = float(self.step())
        if self.kind == "odm":
            return self.params[0] + k.double() * step
        return (k.double() - self.levels) * step


@dataclass
class WeightCodes:
    """Signed integer weight codes and their scale: W_q = codes·scale.

    ``param``: u_w (``odm``), m = max|W| + 1e-8 (``pams``) or s (``lsq``), float32.
    """

    kind: str
    bits: int
    codes: Tensor  # int8, the weight's shape
    param: float

    @property
    def scale(self) -> float:
        """Value of one code unit, in float64: u_w/n, m/Q or s."""
        if self.kind == "odm":
            return self.param / (2 ** self.bits - 1)
        if self.kind == "pams":
            return self.param / (2 ** (self.bits - 1) - 1)
        return self.param

    @property
    def code_map(self) -> tuple[int, int]:
        """(a, c) with code = a·u + c for the stored unsigned b-bit value u (``packing``)."""
        if self.kind == "odm":
            return 2, -(2 ** self.bits - 1)
        if self.kind == "pams":
            return 1, -(2 ** (self.bits - 1) - 1)
        return 1, -(2 ** (self.bits - 1))

    def stored(self) -> Tensor:
        """The unsigned b-bit values u ∈ [0, 2^b − 1] that the packed file holds."""
        a, c = self.code_map
        return (self.codes.to(torch.int16) - c) // a

    @classmethod
    def from_stored(cls, kind: str, bits: int, stored: Tensor, param: float) -> WeightCodes:
        """Inverse of ``stored``: code = a·u + c."""
        a, c = cls(kind, bits, stored, param).code_map
        return cls(kind, bits, (stored.to(torch.int16) * a + c).to(torch.int8), param)


def check_static(model: nn.Module) -> None:
    """Refuse models with a module that computes its quantization range per image at test time, or a quantizer
    that declares an ``export_refusal`` (QuantSR)."""
    modules = list(model.named_modules())
    for name, module in modules:
        if isinstance(module, DaqActQuantizer):
            raise ExportError(f"{name} (DaqActQuantizer): DAQ quantizes with per-image, per-channel μ_c and σ_c "
                              f"computed at test time (METHODS.md §4.2); only static ranges export to integers")
        if isinstance(module, DdtbActQuantizer):
            raise ExportError(f"{name} (DdtbActQuantizer): DDTB's dynamic gate ({name}.gate) rescales [l, u] per "
                              f"image at test time (METHODS.md §4.3); only static ranges export to integers")
    fqsr = [name for name, module in modules if isinstance(module, FqsrQuantizer)]
    if fqsr:
        name = next((n for n in fqsr if n.endswith("out_quant")), fqsr[0])
        raise ExportError(f"{name} (FqsrQuantizer): FQSR quantizes each conv's output and its zero-padded input "
                          f"(METHODS.md §4.5); the integer graph maps one layer's int32 sum to the next layer's "
                          f"input codes with zero padding, so only ODM, ODM-FQ, LSQ and PAMS export")
    for name, module in modules:
        if isinstance(module, Quantizer) and module.export_refusal:
            raise ExportError(f"{name} ({type(module).__name__}): {module.export_refusal}")
        if isinstance(module, (DaqWeightQuantizer, DdtbWeightQuantizer)):
            raise ExportError(f"{name} ({type(module).__name__}): DAQ/DDTB are not static-range methods")


def grid_kind(quantizer: nn.Module) -> str:
    """'odm' or 'pams' for a static activation quantizer."""
    if isinstance(quantizer, OdmActQuantizer):
        return "odm"
    if isinstance(quantizer, PamsActQuantizer):
        return "pams"
    raise ExportError(f"activation quantizer {type(quantizer).__name__}: expected OdmActQuantizer or PamsActQuantizer")


def weight_kind(quantizer: nn.Module) -> str:
    """'odm' (WCC, LSQ ``odm_symmetric``), 'lsq' (``lsq_integer``) or 'pams' for a weight quantizer."""
    if isinstance(quantizer, WeightClipQuantizer):
        return "odm"
    if isinstance(quantizer, LsqWeightQuantizer):
        return "odm" if quantizer.grid == "odm_symmetric" else "lsq"
    if isinstance(quantizer, PamsWeightQuantizer):
        return "pams"
    raise ExportError(f"weight quantizer {type(quantizer).__name__}: expected WeightClipQuantizer, "
                      f"LsqWeightQuantizer or PamsWeightQuantizer")


@torch.no_grad()
def act_grid(quantizer: nn.Module) -> ActGrid:
    """The grid of a static activation quantizer (after calibration / training)."""
    kind = grid_kind(quantizer)
    if kind == "odm":
        if not bool(quantizer.initialized):
            raise ExportError("an OdmActQuantizer was never calibrated (no range): train or calibrate first")
        return ActGrid(kind, quantizer.bits, (float(quantizer.lower), float(quantizer.upper)))
    return ActGrid(kind, quantizer.bits, (float(quantizer.alpha),))


@torch.no_grad()
def weight_codes(layer: nn.Module) -> WeightCodes:
    """Integer codes of ``layer.weight`` under ``layer.weight_quant``, verified against the fake-quant weight."""
    wq, w = layer.weight_quant, layer.weight.detach().float()
    kind = weight_kind(wq)
    if kind == "odm":
        u = (wq.clip_bound(w) if isinstance(wq, WeightClipQuantizer)
             else grad_scale(wq.scale, wq.grad_factor).detach().float())
        n = 2 ** wq.bits - 1
        step = (u - (-u)) / float(n)
        r = torch.round((torch.minimum(torch.maximum(w, -u), u) - (-u)) / step)
        codes, param, fake = 2 * r - n, u, r * step + (-u)
    elif kind == "pams":
        q = float(2 ** (wq.bits - 1) - 1)
        m = w.abs().max() + 1e-8
        codes = torch.round(w * (q / m))
        param, fake = m, codes * (m / q)
    else:
        s = grad_scale(wq.scale, wq.grad_factor).detach().float()  # the forward's value of s (may differ by an ulp)
        codes = torch.round(torch.clamp(w / s, -wq.q_n, wq.q_p))
        param, fake = s, codes * s
    if codes.abs().max() > 127:
        raise ExportError(f"{kind} weights at {wq.bits} bits need codes up to {int(codes.abs().max())}: int8 "
                          f"holds ±127 (ODM weights export up to 7 bits, PAMS/LSQ up to 8)")
    if not torch.equal(fake, wq(layer.weight).detach().float()):
        raise ExportError(f"{type(wq).__name__}: integer codes do not reproduce the fake-quant weight")
    return WeightCodes(kind, wq.bits, codes.to(torch.int8), float(param))
