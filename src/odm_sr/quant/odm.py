"""ODM: Hong & Lee, "Overcoming Distribution Mismatch in Quantizing Image Super-Resolution Networks",
ECCV 2024 (arXiv 2307.13337 v2). Specification: METHODS.md §5; the shared quantizer math is §3.

- Activations: static per-layer asymmetric [l_a, u_a], learnable, initialised by percentile calibration
  (§5.2).
- Weights: symmetric [−u_w, u_w] without a zero level, u_w = f(W)·γ_w (weight clipping correction, §5.3), or
  LSQ (``weight_quantizer=lsq``, §4.4).
- Mismatch loss L_M = Σ_i ‖X_i − sg[q(X_i)]‖₂ (§5.4), applied to the conv/linear parameters θ through the
  cooperative update θ.grad = λ_R g_R + λ_M w(cos(g_R, g_M)) g_M (§5.5, §5.7); quantizer parameters and the
  rest get g_R only.

The ablation rows of §5.8 are config choices: (a) ``wcc.learn_gamma=false wcc.stat=max_abs mr.mode=off``,
(b) (a) with ``mr.mode=coop``, (c) ``mr.mode=off``, (d) ``mr.mode=naive``, (e) the defaults.

[fq] Full quantization (``fq.enabled=true``, ``conf/method/odm_fq.yaml``, Table S4, §4.5) is in ``fq.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import BACKBONES, Backbone, select_layers
from .base import (
    Bits,
    QuantMethod,
    StepOutput,
    check_bool,
    check_choice,
    check_number,
    check_range,
    to_floats,
)
from .calibration import SOURCES, batch_range, calibrate_activation_ranges
from .cooperative import COS_SCOPES, WEIGHT_FNS, balance_by_group, combine_gradients
from .distributed import average_across_ranks, gather_cat
from .fq import check_fq_config, quantize_odm_fq  # [fq] full quantization (METHODS.md §4.5)
from .functional import percentile, symmetric_quantize, uniform_quantize
from .layers import quantized_layers
from .lsq import GRIDS, LsqWeightQuantizer
from .mismatch import NORMS, MismatchRegistry, active_registry
from .placement import swap_layers
from .quantizer import Quantizer

WEIGHT_STATS = ("p99_abs", "max_abs")
MR_MODES = ("coop", "naive", "off")



class OdmActQuantizer(Quantizer):
    """q(X; l_a, u_a) on 2^b levels l_a + k·s_a (METHODS.md §3, §5.1), learnable scalar bounds.

    Inside an active ``MismatchRegistry`` it also reports M_i (§5.4). Until calibrated (``set_range``) the
    first forward initialises the bounds from its own input's (P_{100−j}, P_j) as a fallback.
    """

    level_grid = "uniform"
    calibrates_range = True

    def __init__(self, bits: int, init_j: float = 99.0):
        super().__init__()
        self.bits = int(bits)
        self.init_j = float(init_j)
        self.lower = nn.Parameter(torch.tensor(0.0))
        self.upper = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False  # host-side copy of ``initialized``: no device sync per forward

    @torch.no_grad()
    def set_range(self, lower: float, upper: float) -> None:
        """Set (l_a, u_a); an empty range (e.g. a dead layer) is widened so that the step stays positive."""
        lower, upper = float(lower), float(upper)
        self.lower.fill_(lower)
        self.upper.fill_(max(upper, lower + 1e-6 * max(1.0, abs(lower))))
        self.initialized.fill_(True)
        self._ready = True

    def static_range(self) -> tuple[float, float]:
        """(l_a, u_a)."""
        return float(self.lower.detach()), float(self.upper.detach())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)

    def forward(self, x: Tensor) -> Tensor:
        if not self._ready:  # no calibration ran: this batch's range (DDP: of the ranks' inputs gathered)
            first = batch_range(gather_cat(x), self.init_j)
            self.set_range(*first.tolist())
        q = uniform_quantize(x, self.lower, self.upper, self.bits)
        registry = active_registry()
        if registry is not None:
            registry.record(x, q, self.lower, self.upper, self.bits, source=self)
        return q

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class WeightClipQuantizer(Quantizer):
    """Weight clipping correction (METHODS.md §5.3): W_q = q(W; −u_w, u_w), u_w = f(W)·γ_w.

    f = P_99(|W|) over the whole tensor (``stat=p99_abs``) or max|W| (``max_abs``), recomputed from the
    current weights every forward and detached (``detach_stat``); γ_w is learnable, init 1 (frozen if not
    ``learn_gamma``). W gets the STE gradient inside ±u_w and 0 outside; γ_w gets f(W)·∂L/∂u_w.
    """

    def __init__(self, bits: int, stat: str = "p99_abs", learn_gamma: bool = True, detach_stat: bool = True):
        super().__init__()
        if stat not in WEIGHT_STATS:
            raise ValueError(f"wcc.stat={stat!r}: expected one of {WEIGHT_STATS}")
        self.bits = int(bits)
        self.stat = stat
        self.detach_stat = bool(detach_stat)
        self.gamma = nn.Parameter(torch.tensor(1.0), requires_grad=bool(learn_gamma))

    def weight_stat(self, w: Tensor) -> Tensor:
        """f(W): P_99(|W|) (torch.quantile, linear) or max|W|."""
        mag = w.detach().abs() if self.detach_stat else w.abs()
        if self.stat == "max_abs":
            return mag.amax()
        if self.detach_stat:
            return percentile(mag, 99.0).to(w.dtype)
        return torch.quantile(mag.reshape(-1), 0.99)  # differentiable; weights are far below 16M elements

    def clip_bound(self, w: Tensor) -> Tensor:
        """u_w = f(W)·γ_w."""
        return self.weight_stat(w) * self.gamma.to(w.dtype)

    def weight_clip_bound(self, weight: Tensor) -> Tensor:
        """u_w (``clip_bound``)."""
        return self.clip_bound(weight)

    def forward(self, w: Tensor) -> Tensor:
        return symmetric_quantize(w, self.clip_bound(w), self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, stat={self.stat}, learn_gamma={self.gamma.requires_grad}"


# -- configuration ----------------------------------------------------------------------------------------
def check_odm_config(c: dict) -> dict:
    """Validate a merged ODM config; returns it."""
    for key in ("lambda_r", "lambda_m"):
        check_number(c, key)
    check_number(c, "qparam_lr_mult", positive=True)
    check_choice(c, "weight_quantizer", ("wcc", "lsq"))
    check_bool(c, "init_from_fp")
    init, wcc, lsq, mr, placement = c["init"], c["wcc"], c["lsq"], c["mr"], c["placement"]
    check_range(init, "j", 50, 100, "init.", open_low=True, hint="100 = min/max")
    check_number(init, "num_batches", "init.", positive=True, integer=True)
    if "calibration_batches" in c and c["calibration_batches"] != init["num_batches"]:
        raise ValueError(f"calibration_batches={c['calibration_batches']!r} differs from "
                         f"init.num_batches={init['num_batches']!r}: set both to the same value")
    check_choice(init, "source", SOURCES, "init.")
    check_choice(wcc, "stat", WEIGHT_STATS, "wcc.")
    check_bool(wcc, "learn_gamma", "wcc.")
    check_bool(wcc, "detach_stat", "wcc.")
    check_number(wcc, "lr_mult", "wcc.", positive=True)
    check_choice(lsq, "grid", GRIDS, "lsq.")
    check_number(lsq, "lr_mult", "lsq.", positive=True)
    check_bool(lsq, "grad_scale", "lsq.")
    check_choice(mr, "mode", MR_MODES, "mr.")
    check_choice(mr, "weight_fn", WEIGHT_FNS, "mr.")
    check_choice(mr, "cos_scope", COS_SCOPES, "mr.")
    check_choice(mr, "norm", NORMS, "mr.")
    for key in ("detach_target", "grad_to_qparams", "cos_include_unreached"):
        check_bool(mr, key, "mr.")
    check_choice(placement, "edsr", ("block_convs",), "placement.")  # pams_style is PAMS's pattern
    check_bool(placement, "hat_quantize_cab", "placement.")
    check_fq_config(c["fq"])  # [fq]
    return c


# -- the method ----------------------------------------------------------------------------------------------
GROUPS = ("theta", "act_qparams", "wcc_gamma", "lsq_scale", "rest")


class ODM(QuantMethod):
    """ODM (METHODS.md §5). Config keys and defaults: ``conf/method/odm.yaml``; see ``check_odm_config``."""

    name = "odm"

    def __init__(self, cfg: Any = None, bits: Bits | None = None, **options: Any):
        super().__init__(cfg, bits, **options)
        check_odm_config(self.cfg)
        self.init_from_fp = self.cfg["init_from_fp"]
        self.calibration_batches = self.cfg["init"]["num_batches"]
        self._balance: dict[str, Tensor] = {}

    def unsupported(self, backbone: Backbone) -> str:
        if self.cfg["fq"]["enabled"] and not self.bits.is_float and not backbone.fully_quantized:
            done = [f.upper() for f, spec in BACKBONES.items() if spec.fully_quantized]
            return f" (fully-quantized mode is implemented for {', '.join(done)} only)"
        return ""

    # -- set-up -------------------------------------------------------------------------------------------
    def quantize(self, model: nn.Module) -> nn.Module:
        """W + A on each placed layer (§2.3, ``placement.*``); bits 32 on both leaves the model as it is."""
        self.check_backbone(model)
        if self.bits.is_float:
            return model
        if self.cfg["fq"]["enabled"]:  # [fq] every conv head to tail + skip operands at bits.sc: fq.py
            sc, j = self.bits.sc, self.cfg["init"]["j"]
            make_skip = (lambda: OdmActQuantizer(sc, j)) if sc < 32 else None
            return quantize_odm_fq(model, self.cfg["fq"], self._make_quantizers, make_skip)
        return swap_layers(model, select_layers(model, self.cfg["placement"]), self._make_quantizers)

    def _make_quantizers(self, name: str, layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        act = OdmActQuantizer(self.bits.a, self.cfg["init"]["j"]) if self.bits.a < 32 else None
        if self.bits.w >= 32:
            return act, None
        if self.cfg["weight_quantizer"] == "lsq":
            lsq = self.cfg["lsq"]
            return act, LsqWeightQuantizer(self.bits.w, layer.weight, lsq["grid"], lsq["grad_scale"])
        wcc = self.cfg["wcc"]
        return act, WeightClipQuantizer(self.bits.w, wcc["stat"], wcc["learn_gamma"], wcc["detach_stat"])

    def calibrate(self, model: nn.Module, batches: Iterable[Tensor],
                  teacher: nn.Module | None = None) -> dict[str, tuple[float, float]]:
        """Percentile init of every (l_a, u_a) (§5.2, ``init.*``); returns {layer: (l_a, u_a)}."""
        init = self.cfg["init"]
        return calibrate_activation_ranges(model, batches, j=init["j"], num_batches=init["num_batches"],
                                           source=init["source"])

    def partition(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role: θ = conv/linear weights and biases; φ = l_a/u_a, γ_w, LSQ s; rest."""
        groups: dict[str, list[nn.Parameter]] = {key: [] for key in GROUPS}
        seen: set[int] = set()

        def add(key: str, params: Iterable[nn.Parameter]) -> None:
            for p in params:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    groups[key].append(p)

        roles = ((OdmActQuantizer, "act_qparams"), (WeightClipQuantizer, "wcc_gamma"),
                 (LsqWeightQuantizer, "lsq_scale"), ((nn.Conv2d, nn.Linear), "theta"))
        for module in model.modules():
            key = next((k for cls, k in roles if isinstance(module, cls)), None)
            if key is not None:
                add(key, module.parameters(recurse=False))
        add("rest", model.parameters())
        return groups

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """θ and rest at β⁰ (``lr``); l_a/u_a at ``qparam_lr_mult``·β⁰, γ_w at ``wcc.lr_mult``·β⁰,
        LSQ s at ``lsq.lr_mult``·β⁰ (§5.6, §5.7). Empty groups are left out."""
        cfg = self.cfg
        mult = {"theta": 1.0, "act_qparams": cfg["qparam_lr_mult"], "wcc_gamma": cfg["wcc"]["lr_mult"],
                "lsq_scale": cfg["lsq"]["lr_mult"], "rest": 1.0}
        return [{"name": key, "params": params, "lr": lr * float(mult[key])}
                for key, params in self.partition(model).items() if params]

    # -- training -------------------------------------------------------------------------------------------
    def training_losses(self, model: nn.Module, lr: Tensor, hr: Tensor, step: int,
                        teacher: nn.Module | None = None) -> StepOutput:
        """terms: 'rec' = λ_R·L1(SR, HR) in the native range and, unless ``mr.mode=off``,
        'mismatch' = L_M (unweighted; λ_M enters in ``backward``)."""
        mr = self.cfg["mr"]
        if mr["mode"] == "off":
            sr = model(lr)
            return StepOutput(sr=sr, terms={"rec": self.cfg["lambda_r"] * F.l1_loss(sr, hr)})
        with MismatchRegistry(mr["norm"], mr["detach_target"], mr["grad_to_qparams"],
                              quantizer_names(model)) as registry:
            sr = model(lr)
        rec = self.cfg["lambda_r"] * F.l1_loss(sr, hr)
        mismatch = registry.total().to(rec.device)
        self._balance = {f"{name}/mismatch": term.detach() for name, term in registry.named_terms().items()}
        return StepOutput(sr=sr, terms={"rec": rec, "mismatch": mismatch},
                          objective=(rec + self.cfg["lambda_m"] * mismatch).detach())

    def backward(self, out: StepOutput, model: nn.Module,
                 backward_fn: Callable[[Tensor], None]) -> dict[str, Tensor]:
        """Write ``.grad`` per §5.7 (accumulating into existing grads, like ``backward``). Returns the logged
        scalars as detached 0-d tensors on the device (the caller moves them to the host on logging steps only).

        coop/naive: g_R = ∇(λ_R L_R) for θ, φ and rest; g_M = ∇L_M for θ (+ φ if
        ``mr.grad_to_qparams``), None where L_M does not reach. Autograd only walks L_M's own graph (the
        layers upstream of the last quantized input), so listing every θ costs nothing and θ_reach is exact.
        θ.grad = g_R + λ_M·w(c)·g_M, w ≡ 1 for naive; φ.grad = g_R (+ λ_M·g_M, unweighted, if
        ``grad_to_qparams``); rest.grad = g_R. Under DDP g_R and g_M are first averaged over the ranks
        (``average_across_ranks``); each M_i is the norm over the global batch and its per-rank term is built
        so that this average is the exact g_M (``mismatch.global_mismatch_terms``).
        off: backward_fn(λ_R L_R) (DDP's own hooks all-reduce it).
        """
        mr, rec = self.cfg["mr"], out.terms["rec"]
        if mr["mode"] == "off" or "mismatch" not in out.terms:
            backward_fn(rec)
            return {"loss_rec": rec.detach()}
        mismatch = out.terms["mismatch"]
        groups = self.partition(model)
        theta, rest = groups["theta"], groups["rest"]
        phi = groups["act_qparams"] + groups["wcc_gamma"] + groups["lsq_scale"]
        g_r = torch.autograd.grad(rec, theta + phi + rest, retain_graph=mismatch.requires_grad,
                                  allow_unused=True)
        m_params = theta + (phi if mr["grad_to_qparams"] else [])
        g_m: Sequence[Tensor | None] = [None] * len(m_params)
        if mismatch.requires_grad and m_params:
            g_m = torch.autograd.grad(mismatch, m_params, allow_unused=True)
        g_r = average_across_ranks(g_r, theta + phi + rest)  # DDP: the cosine sees the global batch (§5.7)
        g_m = average_across_ranks(g_m, m_params)
        n_t, n_p = len(theta), len(phi)
        weight_fn = mr["weight_fn"] if mr["mode"] == "coop" else "one"
        # g_R already carries λ_R (the 'rec' term is λ_R·L_R), hence lambda_r=1
        theta_grads, stats = combine_gradients(g_r[:n_t], g_m[:n_t], 1.0, self.cfg["lambda_m"], weight_fn,
                                               mr["cos_scope"], mr["cos_include_unreached"])
        self._balance.update(_layer_balance(model, theta, stats))
        phi_grads = list(g_r[n_t:n_t + n_p])
        if mr["grad_to_qparams"]:
            phi_grads = [_add_scaled(r, m, self.cfg["lambda_m"])
                         for r, m in zip(phi_grads, g_m[n_t:], strict=True)]
        _accumulate(theta + phi + rest, list(theta_grads) + phi_grads + list(g_r[n_t + n_p:]))
        logs = {"loss_rec": rec, "loss_mismatch": mismatch, "cos": stats["cos"], "weight": stats["weight"],
                "grad_norm_rec": stats["grad_norm_rec"], "grad_norm_mismatch": stats["grad_norm_mismatch"],
                "sign_conflict": stats["sign_conflict"], "mr/rho": stats["balance"]}
        return {k: torch.as_tensor(v).detach().reshape(()) for k, v in logs.items()}  # 0-d tensors: no host sync

    def balance_stats(self) -> dict[str, Tensor]:
        """MR's share of θ's gradient in the last step, per quantized layer (logged as ``mr/<layer>/rho``):
        ρ_i = ‖λ_M w g_M‖ / ‖g_R‖ over the layer's weight and bias, and its M_i (``mr/<layer>/mismatch``).
        Empty under ``mr.mode=off`` and before the first step."""
        return dict(self._balance)

    @torch.no_grad()
    def log_stats(self, model: nn.Module) -> dict[str, float]:
        """Per quantized layer: lower, upper (l_a, u_a); gamma and u_w (WCC) or scale and u_w (LSQ)."""
        values: dict[str, Tensor] = {}
        for name, layer in quantized_layers(model).items():
            act, weight_q = layer.act_quant, layer.weight_quant
            if isinstance(act, OdmActQuantizer):
                values[f"{name}/lower"], values[f"{name}/upper"] = act.lower, act.upper
            if isinstance(weight_q, WeightClipQuantizer):
                values[f"{name}/gamma"] = weight_q.gamma
                values[f"{name}/u_w"] = weight_q.clip_bound(layer.weight)
            elif isinstance(weight_q, LsqWeightQuantizer):
                values[f"{name}/scale"] = weight_q.scale
                values[f"{name}/u_w"] = weight_q.clip_bound()
        return to_floats(values)


def quantizer_names(model: nn.Module) -> dict[int, str]:
    """id(ODM activation quantizer) → the name of the layer (or skip operand) it quantizes the input of."""
    return {id(m): name.removesuffix(".act_quant") for name, m in model.named_modules()
            if isinstance(m, OdmActQuantizer)}


def _layer_balance(model: nn.Module, theta: Sequence[nn.Parameter], stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """{"<layer>/rho": ρ_i} for every quantized layer, from the per-parameter stats of ``combine_gradients``."""
    layers = list(quantized_layers(model).items())
    group = {id(p): i for i, (_, layer) in enumerate(layers) for p in layer.parameters(recurse=False)}
    ratios = balance_by_group(stats, [group.get(id(p), -1) for p in theta], len(layers))
    return {f"{name}/rho": ratios[i] for i, (name, _) in enumerate(layers)}


def _add_scaled(r: Tensor | None, m: Tensor | None, scale: float) -> Tensor | None:
    if m is None:
        return r
    return scale * m if r is None else r + scale * m


def _accumulate(params: Sequence[nn.Parameter], grads: Sequence[Tensor | None]) -> None:
    """p.grad += g (p.grad = g when empty); None leaves p.grad untouched."""
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.detach()
        else:
            p.grad.add_(g.detach())


__all__ = ["ODM", "OdmActQuantizer", "WeightClipQuantizer", "quantizer_names"]
