"""ODM's mismatch regularisation and cooperative gradient update as plain functions (METHODS.md §5.4, §5.5).

Nothing here knows about Lightning or a model: ``mismatch_loss`` turns features and their quantized targets
into L_M, ``cooperative_weight`` maps a cosine to a weight, and ``combine_gradients`` merges g_R and g_M into
the gradient the optimizer sees. ``MismatchRegistry`` is the context in which ODM's activation quantizers
report their M_i during one training forward.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence

import torch
from torch import Tensor

from .functional import uniform_quantize

NORMS = ("l2", "l2sq", "mse", "rms")
WEIGHT_FNS = ("half_cos", "cos", "cos_signed", "step")
COS_SCOPES = ("global", "per_tensor")

_ACTIVE: contextvars.ContextVar[MismatchRegistry | None] = contextvars.ContextVar("odm_mismatch",
                                                                                   default=None)


def mismatch_term(x: Tensor, target: Tensor, norm: str = "l2") -> Tensor:
    """M_i = norm(X_i − target) over the whole batch tensor (§5.4; ``mr.norm``).

    l2: ‖d‖₂ (default); l2sq: ‖d‖₂²; mse: ‖d‖₂²/numel; rms: ‖d‖₂/√numel. ``vector_norm``'s gradient is 0 (not
    NaN) at d = 0, which a sqrt of a sum would not give.
    """
    diff = x - target
    if norm == "l2":
        return torch.linalg.vector_norm(diff)
    if norm == "l2sq":
        return diff.pow(2).sum()
    if norm == "mse":
        return diff.pow(2).mean()
    if norm == "rms":
        return torch.linalg.vector_norm(diff) / diff.numel() ** 0.5
    raise ValueError(f"mr.norm={norm!r}: expected one of {NORMS}")


def mismatch_loss(features: Sequence[Tensor], quantized: Sequence[Tensor], norm: str = "l2") -> Tensor:
    """L_M = Σ_i norm(X_i − q_i) (§5.4); the caller decides what ``quantized`` carries gradient for (sg)."""
    if len(features) != len(quantized):
        raise ValueError(f"{len(features)} features but {len(quantized)} quantized targets")
    if not features:
        return torch.zeros(())
    return torch.stack([mismatch_term(x, q, norm) for x, q in zip(features, quantized, strict=True)]).sum()


class MismatchRegistry:
    """Collects M_i from every ODM activation quantizer that runs inside ``with registry:`` (§5.4, §5.7).

    The target of M_i is q(X'; l', u') with X' = sg(X) if ``detach_target`` and (l', u') = sg(l, u) unless
    ``grad_to_qparams``; the defaults (true, false) give the paper's M_i = ‖X_i − sg[q(X_i)]‖₂, whose gradient
    pulls each element of X_i to its nearest grid point.
    """

    def __init__(self, norm: str = "l2", detach_target: bool = True, grad_to_qparams: bool = False):
        if norm not in NORMS:
            raise ValueError(f"mr.norm={norm!r}: expected one of {NORMS}")
        self.norm = norm
        self.detach_target = detach_target
        self.grad_to_qparams = grad_to_qparams
        self.terms: list[Tensor] = []
        self._token: contextvars.Token | None = None

    def __enter__(self) -> MismatchRegistry:
        self.terms = []
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)
        self._token = None

    def record(self, x: Tensor, quantized: Tensor, lower: Tensor, upper: Tensor, bits: int) -> None:
        """Append M_i for a quantizer input ``x`` whose forward output was ``quantized``."""
        if self.detach_target and not self.grad_to_qparams:
            target = quantized.detach()  # reuse the forward's q: no second quantization
        elif not self.detach_target and self.grad_to_qparams:
            target = quantized
        elif self.detach_target:
            target = uniform_quantize(x.detach(), lower, upper, bits)
        else:
            target = uniform_quantize(x, lower.detach(), upper.detach(), bits)
        self.terms.append(mismatch_term(x, target, self.norm))

    def total(self) -> Tensor:
        """L_M = Σ_i M_i (a zero tensor when no quantizer reported)."""
        return torch.stack(self.terms).sum() if self.terms else torch.zeros(())


def active_registry() -> MismatchRegistry | None:
    """The registry of the innermost ``with MismatchRegistry(...)`` block, or None."""
    return _ACTIVE.get()


def cooperative_weight(cos: Tensor, weight_fn: str = "half_cos") -> Tensor:
    """w(c) of the cooperative update (§5.5 table; compared in the paper's Table S11).

    half_cos: ½(c + 1) (default); cos: max(0, c); cos_signed: c; step: 1[c > 0]; one: 1 (``mr.mode=naive``).
    """
    if weight_fn == "half_cos":
        return 0.5 * (cos + 1.0)
    if weight_fn == "cos":
        return cos.clamp(min=0.0)
    if weight_fn == "cos_signed":
        return cos
    if weight_fn == "step":
        return (cos > 0).to(cos.dtype)
    if weight_fn == "one":
        return torch.ones_like(cos)
    raise ValueError(f"mr.weight_fn={weight_fn!r}: expected one of {WEIGHT_FNS} (or 'one' for naive MR)")


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ a·b in one pass without a temporary (``torch.dot`` of the flattened tensors)."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _sq(t: Tensor) -> Tensor:
    return _dot(t, t)


def _sign_counts(r: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """(#elements where both are non-zero, #elements with opposite signs), as float64 0-d tensors.

    With s = sign(r)·sign(m) ∈ {−1, 0, 1}: both = Σ s², conflict = (Σ s² − Σ s)/2; float passes only (boolean
    masks are several times slower on CPU), exact because per-tensor sums of ±1 stay far below 2^24.
    """
    s = r.sign().mul_(m.sign())
    both = _dot(s, s).double()
    return both, (both - s.sum().double()) / 2


def _zero_like_stats(grads: Sequence[Tensor | None]) -> Tensor:
    first = next((g for g in grads if g is not None), None)
    return torch.zeros(()) if first is None else first.new_zeros(())


def combine_gradients(g_r: Sequence[Tensor | None], g_m: Sequence[Tensor | None], lambda_r: float = 1.0,
                      lambda_m: float = 1e-5, weight_fn: str = "half_cos", scope: str = "global",
                      include_unreached: bool = True, eps: float = 1e-12
                      ) -> tuple[list[Tensor | None], dict[str, Tensor]]:
    """θ.grad = λ_R g_R + λ_M w(cos(g_R, g_M)) g_M (METHODS.md §5.5, pseudo-code §5.7).

    ``g_r[k]``/``g_m[k]`` are the gradients of parameter k; None means "not reached" (0).
    ``scope=global``: one cosine over the concatenation of all parameters, c = ⟨g_R, g_M⟩/(‖g_R‖‖g_M‖ + eps),
    where ‖g_R‖ also covers parameters L_M does not reach unless ``include_unreached=False``
    (``mr.cos_include_unreached``). ``per_tensor``: one cosine and weight per parameter.
    Returns the combined gradients (None where both are None) and 0-d stats in the gradients' dtype:
    cos, weight (per_tensor: means over reached tensors), grad_norm_rec, grad_norm_mismatch, sign_conflict
    (share of elements with sign(g_R) ≠ sign(g_M) among those where both are non-zero).
    """
    if len(g_r) != len(g_m):
        raise ValueError(f"{len(g_r)} reconstruction grads but {len(g_m)} mismatch grads")
    if scope not in COS_SCOPES:
        raise ValueError(f"mr.cos_scope={scope!r}: expected one of {COS_SCOPES}")
    zero = _zero_like_stats(list(g_r) + list(g_m))
    pairs = [(r, m) for r, m in zip(g_r, g_m, strict=True) if r is not None and m is not None]
    norm_r_sq = sum((_sq(r) for r in g_r if r is not None), zero)
    norm_m = torch.sqrt(sum((_sq(m) for m in g_m if m is not None), zero))
    if scope == "global":
        dot = sum((_dot(r, m) for r, m in pairs), zero)
        cos_r_sq = norm_r_sq if include_unreached else sum((_sq(r) for r, _ in pairs), zero)
        cos = dot / (torch.sqrt(cos_r_sq) * norm_m + eps)
        weight = cooperative_weight(cos, weight_fn)
        weights = [weight] * len(g_r)
        cos_stat, weight_stat = cos, weight
    else:
        cosines = [_dot(r, m) / (torch.sqrt(_sq(r)) * torch.sqrt(_sq(m)) + eps)
                   if r is not None and m is not None else None for r, m in zip(g_r, g_m, strict=True)]
        weights = [cooperative_weight(c, weight_fn) if c is not None else None for c in cosines]
        reached = [(c, w) for c, w in zip(cosines, weights, strict=True) if c is not None]
        cos_stat = torch.stack([c for c, _ in reached]).mean() if reached else zero
        weight_stat = torch.stack([w for _, w in reached]).mean() if reached else zero
    combined = [_combine_one(r, m, w, lambda_r, lambda_m) for r, m, w in zip(g_r, g_m, weights, strict=True)]
    counts = [_sign_counts(r, m) for r, m in pairs]
    both = sum((b for b, _ in counts), zero.double())
    conflict = sum((c for _, c in counts), zero.double())
    stats = {"cos": cos_stat, "weight": weight_stat, "grad_norm_rec": torch.sqrt(norm_r_sq),
             "grad_norm_mismatch": norm_m, "sign_conflict": (conflict / both.clamp(min=1)).to(zero.dtype)}
    return combined, stats


def _combine_one(r: Tensor | None, m: Tensor | None, w: Tensor | None, lambda_r: float,
                 lambda_m: float) -> Tensor | None:
    if m is None or w is None:
        return None if r is None else lambda_r * r
    coop = (lambda_m * w).to(m.dtype) * m
    return coop if r is None else lambda_r * r + coop
