"""DDTB (Zhong et al., ECCV 2022): learnable asymmetric activation bounds with dynamic per-image gates.

Source: `zysxmu/DDTB@e21403d` `model/quant_ops.py` (`quant_weight_asym99`, `quant_weight_asym`,
`quant_activation`, `DDTB_quant_act_asym_dynamic_quantized`), `model/edsr.py`, `model/rdn.py`,
`main_limitrange_incremental.py`; METHODS.md §3 (zero-anchored grid) and §4.3.

Schedule (epochs of ``iters_per_epoch`` steps, 0-based): epochs [0, calib_epochs) run the student in FP, eval
mode, without optimizer steps, recording each activation quantizer's per-batch input max/min; then the top
``dynamic_ratio`` by var(max) + var(min) become dynamic. The next ``reg_epochs`` run the gates unused with
L_reg = mean over dynamic quantizers of MSE(g, 0); afterwards the gates scale the bounds and L_reg is dropped.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import DDTB_AUTO_EDSR, apply_placement, backbone_of
from .base import Bits, QuantMethod, StepOutput, check_choice, check_number, check_range, to_floats
from .blocks import (
    ActSite,
    clip_param_groups,
    group_by_image,
    read_quirks,
    release_scale,
    ungroup,
)
from .calibration import eval_mode
from .distributed import all_reduce_mean_, gather_cat
from .functional import (
    bounds_backward,
    max_abs_weight_quantize,
    max_abs_weight_quantize_rows,
    percentile,
    percentile_rows,
    straight_through,
)
from .layers import QuantMixin
from .quantizer import Quantizer
from .skt import check_skt_config, distillation_losses

GATE_BITS, GATE_HIDDEN = 2, 32


_HALF: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _half(like: Tensor) -> Tensor:
    """A cached 0-d ½ of ``like``'s dtype and device (``heaviside``'s value at 0), made once."""
    key = (like.dtype, like.device)
    if key not in _HALF:
        _HALF[key] = torch.full((), 0.5, dtype=like.dtype, device=like.device)
    return _HALF[key]


class _ZeroAnchoredQuant(torch.autograd.Function):
    """The fused form of ``round_ste(σ·max(min(X, u), l))/σ``, with the gradients autograd gives through that
    composed expression; see ``zero_anchored_quantize``. The forward saves ∂q/∂X and, when a bound needs a
    gradient, ∂q/∂l and ∂q/∂u per element (two rows of one tensor); the backward is one multiply and one
    matrix-vector product (per-image bounds: one product and one sum per bound)."""

    @staticmethod
    def forward(ctx, x: Tensor, lower: Tensor, upper: Tensor, levels: int) -> Tensor:
        n = float(levels)
        need_bounds = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        sigma = levels / (upper - lower)
        # The released clip max(min(X, u), l) splits the gradient half-half where X equals a bound, and
        # post-ReLU inputs tie with a calibrated l = 0 on every zero: h_l = H(l − X), h_u = H(X − u) with H(0) = ½
        # give ∂c/∂l = h_l, ∂c/∂u = h_u and ∂c/∂X = 1 − h_l − h_u.
        shape = torch.broadcast_shapes(x.shape, lower.shape, upper.shape)
        rows = x.new_empty((2, *shape)) if need_bounds else None
        h_l = torch.heaviside(lower - x, _half(x), out=rows[0]) if need_bounds else torch.heaviside(lower - x, _half(x))
        h_u = torch.heaviside(x - upper, _half(x), out=rows[1]) if need_bounds else torch.heaviside(x - upper, _half(x))
        grad_x = torch.rsub(h_l, 1).sub_(h_u)
        v = torch.clamp(x, lower, upper).mul_(sigma)
        r = torch.round(v)
        if need_bounds:  # + (v − R)/n on l, − (v − R)/n on u (the grid is anchored at 0: also outside)
            frac = v.sub_(r)
            rows[0].add_(frac, alpha=1.0 / n)
            rows[1].sub_(frac, alpha=1.0 / n)
        ctx.save_for_backward(grad_x, rows, lower, upper)
        return r.div_(sigma)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return (*bounds_backward(ctx, grad_out), None)


def zero_anchored_quantize(x: Tensor, lower: Tensor, upper: Tensor, bits: int) -> Tensor:
    """q = Int(σ·clip(X, l, u))/σ, σ = (2^b − 1)/(u − l): the grid k/σ through zero (`DDTB_quant_act_*`).

    Gradients (autograd through the STE round, as released), with v = σ·clip(X), R = Int(v), n = 2^b − 1:
    ∂q/∂X = 1[l ≤ X ≤ u]; ∂q/∂u = 1[X > u] + (R − v)/n; ∂q/∂l = 1[X < l] + (v − R)/n; where X equals a
    bound, X and that bound get half each (autograd's rule for the released ``torch.max`` / ``torch.min``).
    (Inside the range this is METHODS.md §3's table; outside, unlike there, the (R − v)/n term of the clipped
    value remains, because the grid is anchored at zero rather than at l.)
    """
    lower = torch.as_tensor(lower, dtype=x.dtype, device=x.device)
    upper = torch.as_tensor(upper, dtype=x.dtype, device=x.device)
    return _ZeroAnchoredQuant.apply(x, lower, upper, 2**bits - 1)


class DdtbWeightQuantizer(Quantizer):
    """Weights clipped to [p1, p99] (``clip='percentile'``, EDSR) or [min, max] (``'minmax'``, RDN),
    recomputed each forward and detached, then the zero-anchored grid; ∂q/∂W = 1 inside the clip range."""

    def __init__(self, bits: int, clip: str = "percentile") -> None:
        super().__init__()
        self.bits, self.clip = bits, clip
        self.enabled = True
        self.batch: WeightBatch | None = None  # the model's, when quantized by DDTB
        self.batched: tuple[Tensor, Tensor] | None = None  # (W, q(W)) of this forward, set by the batch

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        if self.batch is not None:
            self.batch.fill_once()
        if self.batched is not None and self.batched[0] is w:
            return self.batched[1]
        if self.clip == "percentile":
            lower, upper = percentile(w, (1.0, 99.0))
        else:
            lower, upper = w.detach().min(), w.detach().max()
        return zero_anchored_quantize(w, lower.to(w.dtype), upper.to(w.dtype), self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, clip={self.clip}"


def quantize_weights_rows(weights: list[Tensor], bits: int, clip: str) -> list[Tensor] | None:
    """``DdtbWeightQuantizer(bits, clip)`` of each of the same-shaped ``weights`` in one computation: one stack,
    the bounds of all rows from one ``topk`` per tail (``percentile_rows``) or one ``aminmax``, one fused
    quantizer call; the results are views of its rows. None where ``percentile`` would not take its tail path."""
    rows = torch.stack([w.reshape(-1) for w in weights])
    if clip == "percentile":
        bounds = percentile_rows(rows, (1.0, 99.0))
        if bounds is None:
            return None
        lower, upper = bounds.to(rows.dtype)[:, :, None].unbind()
    else:
        lower, upper = (b[:, None] for b in torch.aminmax(rows.detach(), dim=1))
    out = zero_anchored_quantize(rows, lower, upper, bits)
    return [q.view(w.shape) for q, w in zip(out.unbind(), weights, strict=True)]


def gate_act_quantize(x: Tensor, bits: int, detach: bool) -> Tensor:
    """The gate's internal quantizer (`quant_activation`): zero-anchored grid on the tensor's [min, max].

    Released, it quantizes ``x.detach()`` so nothing before it learns (``detach=True``); otherwise STE.
    """
    lo, hi = torch.aminmax(x.detach())
    sigma = (2 ** bits - 1) / (hi - lo).clamp_min(1e-8)
    q = torch.round(sigma * x.detach()) / sigma
    return q if detach else straight_through(x, q)


class DynamicGate(nn.Module):
    """g = conv2(q(ReLU(BN(conv1(q(GAP(x.detach()))))))), ternary 1×1 convs C→32→2, 2-bit q (no biases)."""

    def __init__(self, channels: int, detach_inner: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, GATE_HIDDEN, 1, bias=False)
        self.bn = nn.BatchNorm2d(GATE_HIDDEN)
        self.conv2 = nn.Conv2d(GATE_HIDDEN, 2, 1, bias=False)
        self.detach_inner = detach_inner
        self.batch: WeightBatch | None = None  # the model's, when quantized by DDTB
        self.batched: dict[str, Tensor] | None = None  # {"conv1"/"conv2": q(W)} of this forward, set by the batch

    def quantized_weight(self, name: str) -> Tensor:
        if self.batch is not None:
            self.batch.fill_once()
        if self.batched is not None and name in self.batched:
            return self.batched[name]
        return max_abs_weight_quantize(getattr(self, name).weight, GATE_BITS)

    def forward(self, pooled: Tensor) -> Tensor:
        """``pooled`` (B, C) → logits g (B, 2): column 0 scales u, column 1 scales l."""
        h = gate_act_quantize(pooled[:, :, None, None], GATE_BITS, detach=True)  # input is detached anyway
        h = F.relu(self.bn(F.conv2d(h, self.quantized_weight("conv1"))))
        h = gate_act_quantize(h, GATE_BITS, detach=self.detach_inner)
        return F.conv2d(h, self.quantized_weight("conv2")).flatten(1)


class DdtbActQuantizer(Quantizer):
    """Learnable bounds ``alpha_lower`` = l, ``alpha_upper`` = u on the zero-anchored grid, optionally gated.

    - ``enabled=False`` (calibration epoch): identity; with ``recording`` it appends max(x), min(x).
    - First quantized training forward: l, u ← the (100 − M)-th / M-th batch percentiles if ``calibrate``,
      else they keep their ±10 init (quirk ``bounds_pm10_above_2bit`` at 3+ bits).
    - Dynamic (``is_dynamic``): the gate runs on GAP(x.detach()) per image and its logits are kept in
      ``gate_logits`` (for L_reg); with ``use_gate`` the bounds become σ_u·u, σ_l·l with
      (σ_u, σ_l) = 2·sigmoid(g).
    """

    level_grid = "zero_anchored"

    def __init__(self, bits: int, site: ActSite, percentile_m: float = 99.0, calibrate: bool = True,
                 gate_frozen_first_conv: bool = False) -> None:
        super().__init__()
        self.bits, self.site, self.percentile_m, self.calibrate = bits, site, percentile_m, calibrate
        self.alpha_lower = nn.Parameter(torch.tensor(-10.0))
        self.alpha_upper = nn.Parameter(torch.tensor(10.0))
        self.gate = DynamicGate(site.channels, detach_inner=gate_frozen_first_conv)
        # Python flags (a tensor flag would force a device sync per forward), saved via the extra state
        self.initialized, self.is_dynamic, self.use_gate = False, False, False
        self.enabled, self.recording = True, False
        self.max_history: list[float] = []
        self.min_history: list[float] = []
        self.gate_logits: Tensor | None = None

    @torch.no_grad()
    def _init_bounds(self, x: Tensor) -> None:
        if self.calibrate:
            bounds = percentile(x, (100.0 - self.percentile_m, self.percentile_m))
            all_reduce_mean_([bounds])  # DDP: the mean of the ranks' first-batch percentiles
            lower, upper = bounds.unbind()
            upper = torch.maximum(upper, lower + 1e-6)  # a constant input would give u == l
            self.alpha_lower.copy_(lower)
            self.alpha_upper.copy_(upper)
        self.initialized = True

    @property
    def gate_runs(self) -> bool:
        """Whether a forward (of an enabled, initialized quantizer) runs the gate."""
        return self.is_dynamic and (self.training or self.use_gate)

    def static_range(self) -> tuple[float, float] | None:
        """(l, u); None while disabled or when the gate rescales them per image (dynamic with ``use_gate``)."""
        if not self.enabled or (self.is_dynamic and self.use_gate):
            return None
        return float(self.alpha_lower.detach()), float(self.alpha_upper.detach())

    def get_extra_state(self) -> dict[str, bool]:
        return {"initialized": self.initialized, "is_dynamic": self.is_dynamic, "use_gate": self.use_gate}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        keys = ("initialized", "is_dynamic", "use_gate")
        self.initialized, self.is_dynamic, self.use_gate = (bool(state[k]) for k in keys)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            if self.recording:
                self.max_history.append(float(x.max()))
                self.min_history.append(float(x.min()))
            return x
        if self.training and not self.initialized:
            self._init_bounds(x)
        lower, upper = self.alpha_lower, self.alpha_upper
        if not self.gate_runs:
            return zero_anchored_quantize(x, lower, upper, self.bits)
        grouped = group_by_image(x, self.site)
        logits = self.gate(grouped.detach().mean(2))
        self.gate_logits = logits
        if not self.use_gate:
            return zero_anchored_quantize(x, lower, upper, self.bits)
        scale = 2.0 * torch.sigmoid(logits)
        # (σ_u·u, σ_l·l) per image in one product (no per-column selects, whose backward costs two ops each)
        upper_i, lower_i = (scale[:, :, None, None] * torch.stack((upper, lower))[:, None, None]).unbind(1)
        return ungroup(zero_anchored_quantize(grouped, lower_i, upper_i, self.bits), x, self.site)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, percentile_m={self.percentile_m}, calibrate={self.calibrate}"


class WeightBatch:
    """The weight quantizers of all layers of one DDTB model in one computation per forward.

    The quantized weights do not depend on the input, so within a forward of the model (``start`` and ``stop``
    are its forward pre-hook and hook) the first quantizer that needs its weight calls ``fill``: the quantized
    weights of each group of same-shaped weights (the clipped convs; the conv1 and the conv2 of the gates that
    run) come from one batched computation (per-row bounds, elementwise arithmetic: the per-layer values and
    gradients) and are handed to their quantizers, which return them instead of computing their own; ``stop``
    drops them. Outside a forward of the model (a quantizer called on its own) nothing is batched. Computing
    inside the forward (not in the pre-hook) keeps a compiled forward one graph. Referenced by its quantizers
    and hooks as a plain attribute (no state-dict keys); copies of the model get their own.
    """

    def __init__(self, layers: list[nn.Module], act_quantizers: list[DdtbActQuantizer]) -> None:
        self.layers, self.act_quantizers = layers, act_quantizers
        self.active = self.filled = False

    def start(self, model: nn.Module, args: Any) -> None:
        self._drop()
        self.active = True

    def stop(self, model: nn.Module, args: Any, output: Any) -> None:
        self._drop()
        self.active = False

    def _drop(self) -> None:
        self.filled = False
        for layer in self.layers:
            layer.weight_quant.batched = None
        for q in self.act_quantizers:
            q.gate.batched = None

    def fill_once(self) -> None:
        """``fill`` on the first call within a forward of the model; nothing outside one or after it."""
        if self.active and not self.filled:
            self.fill()

    def fill(self) -> None:
        """The quantized weights of every group of two or more same-shaped weights, once per forward."""
        self.filled = True
        groups: dict[tuple, list[tuple[nn.Module, Tensor]]] = {}
        for layer in self.layers:
            q, w = layer.weight_quant, layer.weight
            if q.enabled:
                groups.setdefault(("w", q.bits, q.clip, w.shape, w.dtype, w.device), []).append((q, w))
        for m in self.act_quantizers:
            if m.enabled and m.gate_runs:
                for name in ("conv1", "conv2"):
                    w = getattr(m.gate, name).weight
                    groups.setdefault(("g", name, w.shape, w.dtype, w.device), []).append((m.gate, w))
        for key, members in groups.items():
            if len(members) < 2:
                continue
            weights = [w for _, w in members]
            if key[0] == "w":
                quantized = quantize_weights_rows(weights, key[1], key[2])
                if quantized is None:
                    continue
                for (q, w), qw in zip(members, quantized, strict=True):
                    q.batched = (w, qw)
            else:
                rows = max_abs_weight_quantize_rows(torch.stack([w.reshape(-1) for w in weights]), GATE_BITS)
                for (gate, w), qw in zip(members, rows.unbind(), strict=True):
                    if gate.batched is None:
                        gate.batched = {}
                    gate.batched[key[1]] = qw.view(w.shape)

    def attach(self, model: nn.Module) -> None:
        for layer in self.layers:
            layer.weight_quant.batch = self
        for q in self.act_quantizers:
            q.gate.batch = self
        model.register_forward_pre_hook(self.start)
        model.register_forward_hook(self.stop, always_call=True)


def select_dynamic(quantizers: dict[str, DdtbActQuantizer], ratio: float) -> list[str]:
    """Mark the top ⌊ratio·N⌋ quantizers by var(max) + var(min) of their recorded inputs as dynamic
    (population variance, `np.var`; under DDP over the records of all ranks, so that every rank chooses the
    same layers); clears the records and returns the chosen names."""
    scores = {}
    for name, q in quantizers.items():
        if q.max_history:  # DDP: the records of every rank (the same model records on every rank)
            # on the quantizer's device: NCCL rejects CPU tensors
            records = torch.tensor([q.max_history, q.min_history], dtype=torch.float64, device=q.alpha_upper.device)
            history = gather_cat(records, dim=1)
            scores[name] = float(history[0].var(unbiased=False) + history[1].var(unbiased=False))
        q.max_history, q.min_history = [], []
    chosen = sorted(scores, key=scores.get, reverse=True)[: int(len(scores) * ratio)]
    for name, q in quantizers.items():
        q.is_dynamic = name in chosen
    return chosen


class DDTB(QuantMethod):
    """DDTB: PAMS placement with DDTB quantizers; loss L1 + ``skt.weight``·L_SKT + L_reg (METHODS.md §4.3)."""

    name = "ddtb"
    config_name = "ddtb"
    needs_teacher = True
    per_image_statistics = True  # the dynamic gates read GAP(x) of the whole input

    def __init__(self, cfg: Any = None, bits: Bits | None = None, **options: Any):
        super().__init__(cfg, bits, **options)
        c = self.cfg
        self.quirks = read_quirks(c)
        self.skt_weight = check_skt_config(c["skt"])
        self.scale_release = bool(c["scale_release_constants"])
        self.iters_per_epoch = int(check_number(c, "iters_per_epoch", positive=True))
        self.qparam_lr = float(check_number(c, "qparam_lr", positive=True))
        self.calib_epochs = int(check_number(c["stages"], "calib_epochs", "stages."))
        self.reg_epochs = int(check_number(c["stages"], "reg_epochs", "stages."))
        self.dynamic_ratio = check_range(c, "dynamic_ratio", 0.0, 1.0, auto=True)
        self.init_percentile = check_range(c, "init_percentile", 50.0, 100.0, open_low=True, auto=True)
        self.weight_clip = check_choice(c, "weight_clip", ("auto", "percentile", "minmax"))
        self.placement = c["placement"]
        self.auto = dict(DDTB_AUTO_EDSR)  # the backbone's 'auto' values, set by quantize
        self.calib_keeps_weights = False  # quirk rdn_calib_quantized_weights on a backbone it applies to

    @property
    def ddp_unused_parameters(self) -> bool:
        """The gates of non-dynamic quantizers never run (and bounds are idle in the calibration epoch)."""
        return self.bits.a < 32

    # -- set-up ---------------------------------------------------------------------------------------
    def resolved(self) -> dict[str, Any]:
        """The 'auto' settings for the quantized backbone: EDSR (and transformers) 0.3 / p99 / percentile
        weights; RDN 0.5 / p95 / min-max weights."""
        chosen = {"dynamic_ratio": self.dynamic_ratio, "init_percentile": self.init_percentile,
                  "weight_clip": self.weight_clip}
        return {k: self.auto[k] if v == "auto" else v for k, v in chosen.items()}

    def gate_ratio(self) -> float:
        return float(self.resolved()["dynamic_ratio"])

    def quantize(self, model: nn.Module) -> nn.Module:
        self.check_backbone(model)
        spec = backbone_of(model)
        self.auto = dict(spec.ddtb_auto)
        self.calib_keeps_weights = self.quirks["rdn_calib_quantized_weights"] and spec.ddtb_calib_quantized_weights
        auto = self.resolved()
        calibrate = not (self.quirks["bounds_pm10_above_2bit"] and self.bits.a > 2)
        make_act = None if self.bits.a >= 32 else (
            lambda site: DdtbActQuantizer(self.bits.a, site, float(auto["init_percentile"]), calibrate,
                                      self.quirks["gate_frozen_first_conv"]))
        make_weight = None if self.bits.w >= 32 else (
            lambda name, layer: DdtbWeightQuantizer(self.bits.w, auto["weight_clip"]))
        model = apply_placement(model, self.placement, make_act, make_weight, self.quirks)  # as released
        WeightBatch([m for m in model.modules() if isinstance(m, QuantMixin)
                     and isinstance(m.weight_quant, DdtbWeightQuantizer)],
                    [m for m in model.modules() if isinstance(m, DdtbActQuantizer)]).attach(model)
        return model

    def calibrate(self, model: nn.Module, batches, teacher: nn.Module | None = None) -> None:
        """Only with ``stages.calib_epochs=0``: record on ``batches`` and choose the dynamic ones now."""
        if self.calib_epochs == 0:
            for lr in batches:
                self._calibration_forward(model, lr)
            self._finish_calibration(model)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        bounds = [p for m in self.act_quantizers(model).values() for p in (m.alpha_lower, m.alpha_upper)]
        return clip_param_groups(model, bounds, lr, self.qparam_lr * release_scale(model, self.scale_release))

    # -- training -------------------------------------------------------------------------------------
    @staticmethod
    def act_quantizers(model: nn.Module) -> dict[str, DdtbActQuantizer]:
        return {n: m for n, m in model.named_modules() if isinstance(m, DdtbActQuantizer)}

    def _set_quantized(self, model: nn.Module, on: bool, recording: bool = False) -> None:
        keep_weights = self.calib_keeps_weights
        for m in model.modules():
            if isinstance(m, DdtbActQuantizer):
                m.enabled, m.recording = on, recording
            elif isinstance(m, DdtbWeightQuantizer):
                m.enabled = on or keep_weights

    def _calibration_forward(self, model: nn.Module, lr: Tensor) -> None:
        """The student in FP and eval mode, recording each activation quantizer's input max/min."""
        self._set_quantized(model, False, recording=True)
        with eval_mode(model), torch.no_grad():
            model(lr)
        self._set_quantized(model, False, recording=False)

    def _finish_calibration(self, model: nn.Module) -> list[str]:
        chosen = select_dynamic(self.act_quantizers(model), self.gate_ratio())
        self._set_quantized(model, True)
        return chosen

    def training_losses(self, model: nn.Module, lr: Tensor, hr: Tensor, step: int,
                        teacher: nn.Module | None = None) -> StepOutput | None:
        epoch = step // self.iters_per_epoch
        if epoch < self.calib_epochs:
            self._calibration_forward(model, lr)
            return None
        quants = self.act_quantizers(model)
        if any(q.max_history for q in quants.values()):
            self._finish_calibration(model)
        self._set_quantized(model, True)
        use_gate = epoch >= self.calib_epochs + self.reg_epochs
        for q in quants.values():
            q.use_gate = use_gate
            q.gate_logits = None
        sr, terms = distillation_losses(model, teacher, lr, hr,
                                        self.skt_weight * release_scale(model, self.scale_release))
        logits = [q.gate_logits for q in quants.values() if q.gate_logits is not None]
        if logits and not use_gate:
            terms["reg"] = torch.stack([g.pow(2).mean() for g in logits]).mean()
        for q in quants.values():
            q.gate_logits = None
        n_dynamic = sum(q.is_dynamic for q in quants.values())
        return StepOutput(sr=sr, terms=terms, logs={"dynamic_quantizers": float(n_dynamic),
                                                    "gates_used": float(use_gate)})

    def log_stats(self, model: nn.Module) -> dict[str, float]:
        bounds = {}
        for name, q in self.act_quantizers(model).items():
            bounds[f"lower/{name}"], bounds[f"upper/{name}"] = q.alpha_lower, q.alpha_upper
        return to_floats(bounds)
