"""FQSR as released (Wang et al., ACM MM 2021; ``billhhh/FQSR@24cb67a``): ``method=fqsr``, METHODS.md §4.5.

Facts read from the release (``src/third_party/quantization/models/quant.py``, ``dorefa.py``,
``src/config/edsr-policy.txt``, ``config.lsq.finetune.div2k.bit.edsr``, ``src/trainer.py``, ``src/utility.py``):

- **Quantizer** (keywords ``dorefa,lsq``, ``--fm_half_range`` i.e. signed, quant group 1, no gradient scale):
  one learnable clip c per tensor, q(x) = c·(2·Int(n·(clip(x/|c|, −1, 1) + 1)/2)/n − 1), n = 2^b − 1: 2^b levels
  c·(2k/n − 1) on [−c, c], no zero level (METHODS.md §3, table row FQSR). Int rounds half to even with a
  straight-through gradient, so ∂q/∂x = 1[|x| ≤ |c|] and ∂q/∂|c| = (q − x)/|c| inside, sign(x) outside.
- **Tracking** (``--stable 20``): every quantizer counts its calls; while the count is ≤ ``stable`` it returns
  its input and sets c to the mean over its calls of max|x| (the release's ``AverageMeter``); from then on it
  quantizes. The add quantizer (below) runs twice per forward, so it tracks over 20 calls = 10 iterations.
- **Placement** (EDSR, ``edsr-policy.txt``): every conv head to tail (not MeanShift) quantizes its input, its
  weight and its output; the input is quantized *after* the zero padding, so the padding becomes the level
  nearest 0 (c/n, half to even) as in the release's ``custom_conv``. Each residual add q(res_scale·body(x)) + q(x)
  uses one quantizer for both operands (``custom_eltwise``). The policy's exceptions, counted on the release's
  module indices (head.0 = 0, block i = 3i+1, 3i+2 and its add 3i+3, then body-final, upsampler convs, tail.1,
  global add): ``head.0``'s input quantizer is off (index 0, ``fm``), and the outputs of indices 51–53 are off:
  with 16 blocks that is every conv after the upsampler's first (``tail.0.2`` at ×4, ``tail.1``) and the global
  add. The same rule applies to any depth and scale.
- **Bits**: inputs ``bits.a``, weights ``bits.w``, outputs and adds (the release's one ``ot_bit``) ``bits.sc``:
  Table S4's "S.C. 8-bit" is that ``ot`` width, so no other key.
- **Loss**: L1(SR, HR) + ``quant_loss_weight``·Σ L1(x, q(x)) over every quantizer that quantized in the step
  (inputs, weights, outputs, both operands of each add), with its gradient to x, q(x) and c (``quant_loss_alpha``
  0.3 for ``by_index: all``).
- **Schedule**: Adam 1e-4 for every parameter (c included), cosine to 0 over the whole run stepped per
  iteration (``--lr_policy sgdr``, ``T_max`` = iterations): ``conf/optim/adam_cosine.yaml``, set by
  ``conf/experiment/base/recipe_fqsr.yaml``.
- **Activation**: the release trains with PReLU (keyword ``PReLU``, ``nn.PReLU()`` in each ResBlock) from an FP
  model trained with it. [decision] ``prelu=false``: keep ReLU and the official FP checkpoint (S4's FP row is the
  standard EDSR); ``true`` swaps each block's ReLU for ``nn.PReLU()`` (slope 0.25) before training.

Our choices where the release is silent or unusable: the call count advances in training forwards only (the
release counts evaluation forwards too, but evaluates only after whole epochs); c starts at 1 (the release's
``boundary``), which only matters with ``stable=0``; under DDP the tracked max|x| is the ranks' mean.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from odm_sr.models.edsr import ResBlock

from .backbones import BACKBONES, Backbone
from .base import Bits, QuantMethod, StepOutput, check_bool, check_number, to_floats
from .distributed import all_reduce_mean_, world_size
from .fq import IMAGE_INPUT_LAYER, quantize_fully
from .layers import QuantConv2d
from .quantizer import Quantizer

_LOSSES: contextvars.ContextVar[list[Tensor] | None] = contextvars.ContextVar("fqsr_quant_loss", default=None)


@contextmanager
def collect_quant_losses() -> Iterator[list[Tensor]]:
    """Inside: every ``FqsrQuantizer`` that quantizes appends L1(x, q(x)) to the yielded list."""
    terms: list[Tensor] = []
    token = _LOSSES.set(terms)
    try:
        yield terms
    finally:
        _LOSSES.reset(token)


class _SignedClipQuant(torch.autograd.Function):
    """q = c·(2·Int(n·(clip(x/c, −1, 1) + 1)/2)/n − 1) for c > 0, in the release's operation order.

    ∂q/∂x = 1[|x| ≤ c] (``torch.clamp`` passes the bounds); ∂q/∂c = (2R − 1) − x/c inside, with R =
    Int(n·v)/n, i.e. (q − x)/c, and sign(x) outside (what autograd gives through the release's clamp and STE).
    """

    @staticmethod
    def forward(ctx, x: Tensor, c: Tensor, n: float) -> Tensor:
        u = x / c
        inside = (u >= -1.0) & (u <= 1.0)
        r = torch.round((u.clamp(-1.0, 1.0) + 1.0) / 2.0 * n) / n
        level = r * 2.0 - 1.0
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(inside, torch.where(inside, level - u, torch.sign(x)))
        else:
            ctx.save_for_backward(inside, None)
        return level * c

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        inside, d = ctx.saved_tensors
        grad_x = grad_out * inside if ctx.needs_input_grad[0] else None
        grad_c = (grad_out * d).sum().reshape(()) if d is not None else None
        return grad_x, grad_c, None


def fqsr_quantize(x: Tensor, clip: Tensor, bits: int) -> Tensor:
    """FQSR's signed full-range quantizer on [−|clip|, |clip|], 2^bits levels without zero."""
    c = clip.abs().to(x.dtype)
    return _SignedClipQuant.apply(x, c, float(2 ** bits - 1))


class FqsrQuantizer(Quantizer):
    """One FQSR quantizer (input, weight, output or add): learnable clip c, tracked for ``stable`` calls.

    ``calls`` (a buffer, so a checkpoint restores the tracking phase) counts training calls; ``max_sum`` is the
    sum of their max|x|. While ``calls < stable`` a training call adds to both, sets c = max_sum / calls and
    returns x; an evaluation call in that phase returns x unchanged.
    """

    level_grid = "uniform"

    def __init__(self, bits: int, stable: int = 20):
        super().__init__()
        self.bits, self.stable = int(bits), int(stable)
        self.clip = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("calls", torch.tensor(0, dtype=torch.long))
        self.register_buffer("max_sum", torch.tensor(0.0))
        self._calls = 0  # host copy of ``calls``: no device sync per forward

    @property
    def tracking(self) -> bool:
        return self._calls < self.stable

    def static_range(self) -> tuple[float, float] | None:
        """(−|c|, |c|) once tracking is over; None while it passes its input through."""
        if self.tracking:
            return None
        c = float(self.clip.detach().abs())
        return -c, c

    def weight_clip_bound(self, weight: Tensor) -> Tensor:
        """|c| (as a weight quantizer, its clip bound u_w)."""
        return self.clip.detach().abs()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._calls = int(self.calls)

    @torch.no_grad()
    def _track(self, x: Tensor) -> None:
        peak = x.detach().abs().amax().to(self.max_sum.dtype)
        if world_size() > 1:
            all_reduce_mean_([peak])
        self._calls += 1
        self.calls.add_(1)
        self.max_sum.add_(peak)
        self.clip.copy_(self.max_sum / self._calls)

    def forward(self, x: Tensor) -> Tensor:
        if self.tracking:
            if self.training:
                self._track(x)
            return x
        q = fqsr_quantize(x, self.clip, self.bits)
        losses = _LOSSES.get()
        if losses is not None:
            losses.append(F.l1_loss(x, q))
        return q

    def extra_repr(self) -> str:
        return f"bits={self.bits}, stable={self.stable}"


class FqsrConv2d(QuantConv2d):
    """The release's ``custom_conv``: q_w(W), q_in(zero-pad(x)), conv without padding, q_out(y)."""

    out_quant: nn.Module | None

    @classmethod
    def wrap(cls, conv: nn.Conv2d, act_quant: nn.Module | None, weight_quant: nn.Module | None,
             out_quant: nn.Module | None) -> FqsrConv2d:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"FQSR quantizes zero-padded inputs; got padding {conv.padding!r}, "
                             f"padding_mode {conv.padding_mode!r}")
        layer = cls.from_float(conv, act_quant, weight_quant)
        layer.out_quant = out_quant
        return layer

    def forward(self, x: Tensor) -> Tensor:
        weight = self.quantized_weight()
        pad_h, pad_w = self.padding
        x = self.quantized_input(F.pad(x, (pad_w, pad_w, pad_h, pad_h)))
        y = F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return self.out_quant(y) if self.out_quant is not None else y


def output_quantized(name: str) -> bool:
    """The policy's output exceptions: no output quantizer after the upsampler's first conv (module docstring)."""
    return not (name == "tail.1" or (name.startswith("tail.0.") and name != "tail.0.0"))


class FQSR(QuantMethod):
    """FQSR (module docstring). Keys and defaults: ``conf/method/fqsr.yaml``."""

    name = "fqsr"

    def __init__(self, cfg: Any = None, bits: Bits | None = None, **options: Any):
        super().__init__(cfg, bits, **options)
        self.stable = int(check_number(self.cfg, "stable", integer=True))
        self.quant_loss_weight = float(check_number(self.cfg, "quant_loss_weight"))
        self.prelu = bool(check_bool(self.cfg, "prelu"))

    @property
    def ddp_unused_parameters(self) -> bool:
        """While a quantizer tracks, its clip is set, not learned: it is out of the loss's graph."""
        return self.stable > 0

    def unsupported(self, backbone: Backbone) -> str:
        if not backbone.fully_quantized:
            done = [f.upper() for f, spec in BACKBONES.items() if spec.fully_quantized]
            return f" (FQSR's release quantizes {', '.join(done)} only: its policy file is EDSR's)"
        return ""

    def _quantizer(self, bits: int) -> FqsrQuantizer | None:
        return FqsrQuantizer(bits, self.stable) if bits < 32 else None

    def quantize(self, model: nn.Module) -> nn.Module:
        """PReLU (``prelu``), then every conv and add per the policy (module docstring)."""
        self.check_backbone(model)
        if self.prelu:
            for block in model.modules():
                if isinstance(block, ResBlock):
                    block.body[1] = nn.PReLU()
        if self.bits.is_float and self.bits.sc >= 32:
            return model

        def conv_quantizers(name: str, layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
            act = None if name == IMAGE_INPUT_LAYER else self._quantizer(self.bits.a)
            return act, self._quantizer(self.bits.w)

        def conv(name: str, layer: nn.Module, act: nn.Module | None, weight: nn.Module | None) -> nn.Module:
            out = self._quantizer(self.bits.sc) if output_quantized(name) else None
            return FqsrConv2d.wrap(layer, act, weight, out)

        def adds(site: str) -> tuple[nn.Module | None, nn.Module | None]:
            shared = self._quantizer(self.bits.sc) if site else None  # the global add: off (policy)
            return shared, shared

        return quantize_fully(model, conv_quantizers, adds, conv)

    def training_losses(self, model: nn.Module, lr: Tensor, hr: Tensor, step: int,
                        teacher: nn.Module | None = None) -> StepOutput:
        """terms: 'rec' = L1(SR, HR) and, once a quantizer quantizes, 'quant' = weight·Σ L1(x, q(x))."""
        with collect_quant_losses() as losses:
            sr = model(lr)
        terms = {"rec": F.l1_loss(sr, hr)}
        if losses:
            terms["quant"] = self.quant_loss_weight * torch.stack([t.to(sr.dtype) for t in losses]).sum()
        return StepOutput(sr=sr, terms=terms)

    def log_stats(self, model: nn.Module) -> dict[str, float]:
        """|c| of every quantizer (``clip/<name>``)."""
        return to_floats({f"clip/{n}": m.clip.abs() for n, m in model.named_modules()
                          if isinstance(m, FqsrQuantizer)})


def fqsr_quantizers(model: nn.Module) -> dict[str, FqsrQuantizer]:
    """Every FQSR quantizer of ``model`` by qualified name (a shared add quantizer once), in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FqsrQuantizer)}


__all__ = ["FQSR", "FqsrConv2d", "FqsrQuantizer", "collect_quant_losses", "fqsr_quantize", "fqsr_quantizers",
           "output_quantized"]
