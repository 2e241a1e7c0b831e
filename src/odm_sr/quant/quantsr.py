"""QuantSR-C: Qin et al., "QuantSR: Accurate Low-bit Quantization for Efficient Image Super-Resolution",
NeurIPS 2023, as released (`htqin/QuantSR@d470ad6`, `basicsr/archs/ours_operator.py`, `q_edsr_arch.py`,
`arch_util.py`; METHODS.md §4.6).

Redistribution-driven learnable quantizer (RLQ) on every placed conv (the backbone row's W + A layers):

- activations: x' = x + shift (one learnable shift per input channel, init 0), then
  q(x') = α_a·R(clip(x'/α_a, −Q_N, Q_P)). The first training batch decides the grid (release: ``ActOurs``):
  signed (Q_N = 2^(b−1), Q_P = 2^(b−1) − 1) if min x' < −1e-5, else unsigned (Q_N = 0, Q_P = 2^b − 1), and sets
  α_a = 2·mean|x'|/√Q_P on that batch. Both decisions are buffers (``signed``, ``initialized``): they survive a
  checkpoint and a resume. The conv then sees q(x') (the shift is not subtracted again, as released);
- weights: per layer, signed, α_w = 2·mean|W|/√Q_P (computed from the FP weights the layer holds when it is
  quantized; the release computes the same on its first training forward);
- both steps get LSQ's gradient scale g = 1/√(numel·Q_P) (numel of the tensor being quantized, per forward for
  activations) through ``functional.grad_scale``;
- R rounds exactly in the forward; its backward is the release's ``round_pass`` surrogate
  dR/dv = sech²(frac(v) − ½)/(2·tanh ½) (≈ 0.851 at integers, ≈ 1.082 at half-integers) instead of the STE's 1.
  With the clip's own gradient (1 inside [−Q_N, Q_P], bounds included as ``torch.clamp``; 0 outside):
  ∂q/∂x = R'(v) inside, 0 outside; ∂q/∂α = g·(R(v) − R'(v)·v) inside, g·(−Q_N or Q_P) outside (v = x/α);
  ∂q/∂shift = ∂q/∂x summed over the channel.

Learnable shortcut (``learnable_shortcut=true``): each residual block of the backbone row (``residual_blocks``,
blocks computing x + f(x)) becomes s·x + f(x), one learnable s per block (init 1), installed by the wrapper
``LearnableShortcut`` so the backbone stays free of quantization.

Not implemented (documented gaps): the depth-dynamic architecture (DQA: weight-sharing versions that skip blocks;
the release ships only a trained block order for its 4-bit model and no training code to derive one) and the
optional distillation (unclear whether the reported models used it). Biases, BN and PReLU stay FP.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .backbones import BACKBONES, Backbone, select_layers
from .base import Bits, QuantMethod, check_bool, check_number, to_floats
from .distributed import gather_cat
from .functional import grad_scale
from .layers import quantized_layers
from .lsq import lsq_grad_factor, lsq_init_step, lsq_levels
from .placement import replace_module, swap_layers
from .quantizer import Quantizer

SIGN_THRESHOLD = -1e-5  # the release's ``x.min() < -1e-5``: a signed grid
SURROGATE_NORM = 2.0 * math.tanh(0.5)


class _SechRound(torch.autograd.Function):
    """round(v) (half to even) with the backward sech²(frac(v) − ½)/(2·tanh ½) (release ``round_pass``)."""

    @staticmethod
    def forward(ctx, v: Tensor) -> Tensor:
        ctx.save_for_backward(v)
        return torch.round(v)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:
        (v,) = ctx.saved_tensors
        t = torch.tanh(v - torch.floor(v) - 0.5)
        return grad_out * (1.0 - t * t) / SURROGATE_NORM


def sech_round(v: Tensor) -> Tensor:
    """Exact rounding with QuantSR's sech² gradient surrogate."""
    return _SechRound.apply(v)


def rlq_quantize(x: Tensor, step: Tensor, q_n: int, q_p: int, factor: float) -> Tensor:
    """α·R(clip(x/α, −Q_N, Q_P)) with α = ``grad_scale(step, factor)`` (gradients: module docstring)."""
    alpha = grad_scale(step, factor)
    return sech_round(torch.clamp(x / alpha, -q_n, q_p)) * alpha


class RlqActQuantizer(Quantizer):
    """RLQ activation quantizer: per-input-channel ``shift``, LSQ step ``step`` whose sign and init the first
    training batch decides (module docstring). ``channel_last``: the channel is the last dim (linear inputs)."""

    export_refusal = ("QuantSR's per-input-channel shift before an LSQ grid has no integer exporter (it would fold "
                      "into a per-channel zero point, which the integer graph does not carry)")

    def __init__(self, bits: int, channels: int, channel_last: bool = False):
        super().__init__()
        self.bits = int(bits)
        self.shift = nn.Parameter(torch.zeros((channels,) if channel_last else (1, channels, 1, 1)))
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("initialized", torch.tensor(False))
        self._state: tuple[bool, bool] = (False, False)  # host copy of (initialized, signed): no sync per forward

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Sign and α_a from ``x`` (already shifted); under DDP from the ranks' batches gathered."""
        x = gather_cat(x.detach())
        signed = bool(x.min() < SIGN_THRESHOLD)
        _, q_p = lsq_levels(self.bits, signed)
        self.step.copy_(lsq_init_step(x, q_p))
        self.signed.fill_(signed)
        self.initialized.fill_(True)
        self._state = (True, signed)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._state = (bool(self.initialized), bool(self.signed))

    def levels(self) -> tuple[int, int]:
        """(Q_N, Q_P) of the decided grid (signed before the first batch decides)."""
        return lsq_levels(self.bits, self._state[1] or not self._state[0])

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.shift.to(x.dtype)
        if not self._state[0]:  # the first forward of a run (the first training batch under odm-sr-train)
            self.initialize(x)
        q_n, q_p = self.levels()
        return rlq_quantize(x, self.step.to(x.dtype), q_n, q_p, lsq_grad_factor(x.numel(), q_p))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.shift.numel()}"


class RlqWeightQuantizer(Quantizer):
    """RLQ weight quantizer: LSQ per layer, signed, α_w = 2·mean|W|/√Q_P, sech² rounding surrogate."""

    def __init__(self, bits: int, weight: Tensor):
        super().__init__()
        self.bits = int(bits)
        self.q_n, self.q_p = lsq_levels(self.bits)
        self.grad_factor = lsq_grad_factor(weight.numel(), self.q_p)
        self.step = nn.Parameter(lsq_init_step(weight, self.q_p).to(weight.dtype).clone())

    def forward(self, w: Tensor) -> Tensor:
        return rlq_quantize(w, self.step.to(w.dtype), self.q_n, self.q_p, self.grad_factor)

    @torch.no_grad()
    def weight_clip_bound(self, weight: Tensor) -> Tensor:
        """The largest representable magnitude Q_N·α_w (learned, independent of ``weight``), as LSQ's."""
        return self.step.abs() * self.q_n

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class LearnableShortcut(nn.Module):
    """QuantSR-C's learnable shortcut around a block computing x + f(x): s·x + f(x) = block(x) + (s − 1)·x.

    The block's children are registered here under their own names (state-dict keys unchanged, e.g.
    ``body.3.conv1``, plus ``body.3.learnable_shortcut``); the block itself is kept unregistered to run its own
    forward, so it must hold no parameters or buffers of its own (EDSR's and SRResNet's ResBlocks hold none)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        if block._parameters or block._buffers:
            raise ValueError(f"{type(block).__name__} holds its own parameters/buffers "
                             f"({sorted({*block._parameters, *block._buffers})}): it cannot be wrapped")
        for name, child in block.named_children():
            self.add_module(name, child)
        self._block = (block,)  # a tuple: not a registered submodule (its children are registered above)
        self.learnable_shortcut = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return self._block[0](x) + (self.learnable_shortcut - 1.0).to(x.dtype) * x


def check_quantsr_config(c: dict) -> dict:
    """Validate a merged QuantSR config (defaults: ``conf/method/quantsr.yaml``); returns it."""
    check_bool(c, "learnable_shortcut")
    check_number(c, "qparam_lr_mult", positive=True)
    return c


class QuantSR(QuantMethod):
    """QuantSR-C's RLQ + learnable shortcut (module docstring). Loss: L1 (the base class's)."""

    name = "quantsr"

    def __init__(self, cfg: Any = None, bits: Bits | None = None, **options: Any):
        super().__init__(cfg, bits, **options)
        check_quantsr_config(self.cfg)

    def unsupported(self, backbone: Backbone) -> str:
        if self.cfg["learnable_shortcut"] and backbone.residual_blocks is None:
            done = [f for f, spec in BACKBONES.items() if spec.residual_blocks is not None]
            return (f" (the learnable shortcut needs the family's residual blocks, declared for {', '.join(done)}; "
                    f"method.learnable_shortcut=false quantizes without it)")
        return ""

    def quantize(self, model: nn.Module) -> nn.Module:
        """RLQ on each placed layer; then (``learnable_shortcut``) wrap every residual block. FP bits: unchanged."""
        spec = self.check_backbone(model)
        if self.bits.is_float:
            return model
        swap_layers(model, select_layers(model), self._make_quantizers)
        if self.cfg["learnable_shortcut"]:
            for name in spec.residual_blocks(model):
                replace_module(model, name, LearnableShortcut(model.get_submodule(name)))
        return model

    def _make_quantizers(self, name: str, layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        linear = isinstance(layer, nn.Linear)
        channels = layer.in_features if linear else layer.in_channels
        act = RlqActQuantizer(self.bits.a, channels, linear) if self.bits.a < 32 else None
        return act, (RlqWeightQuantizer(self.bits.w, layer.weight) if self.bits.w < 32 else None)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """``net`` (weights, biases, norms, shortcut scalars) at ``lr``; ``qparams`` (steps α_a, α_w and the
        shifts) at ``qparam_lr_mult``·lr. Empty groups are left out."""
        q_ids = {id(p) for m in model.modules() if isinstance(m, (RlqActQuantizer, RlqWeightQuantizer))
                 for p in m.parameters(recurse=False)}
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"name": "net", "params": [p for p in trainable if id(p) not in q_ids], "lr": lr},
                  {"name": "qparams", "params": [p for p in trainable if id(p) in q_ids],
                   "lr": lr * float(self.cfg["qparam_lr_mult"])}]
        return [g for g in groups if g["params"]]

    @torch.no_grad()
    def log_stats(self, model: nn.Module) -> dict[str, float]:
        """Per quantized layer: step_a, signed, shift_absmean, step_w; per wrapped block: shortcut."""
        values: dict[str, Tensor] = {}
        for name, layer in quantized_layers(model).items():
            act, weight_q = layer.act_quant, layer.weight_quant
            if isinstance(act, RlqActQuantizer):
                values[f"{name}/step_a"], values[f"{name}/signed"] = act.step, act.signed
                values[f"{name}/shift_absmean"] = act.shift.abs().mean()
            if isinstance(weight_q, RlqWeightQuantizer):
                values[f"{name}/step_w"] = weight_q.step
        for name, module in model.named_modules():
            if isinstance(module, LearnableShortcut):
                values[f"{name}/shortcut"] = module.learnable_shortcut
        return to_floats(values)


__all__ = ["LearnableShortcut", "QuantSR", "RlqActQuantizer", "RlqWeightQuantizer", "rlq_quantize", "sech_round"]
