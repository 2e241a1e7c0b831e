"""ODM's mismatch regularisation and cooperative gradient update as plain functions (METHODS.md §5.4, §5.5).

Nothing here knows about Lightning or a model: ``mismatch_loss`` turns features and their quantized targets
into L_M; ``MismatchRegistry`` is the context in which ODM's activation quantizers report their M_i during one
training forward. The cooperative update (``cooperative_weight``, ``combine_gradients``) lives in
``cooperative.py`` and is re-exported here.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence

import torch
from torch import Tensor

from .cooperative import (  # noqa: F401 - the cooperative update, re-exported beside L_M
    COS_SCOPES,
    WEIGHT_FNS,
    balance_by_group,
    combine_gradients,
    cooperative_weight,
)
from .distributed import all_reduce_sum_, world_size
from .functional import uniform_quantize

NORMS = ("l2", "l2sq", "mse", "rms")

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


def _norm_and_slope(sq: Tensor, count: Tensor, norm: str) -> tuple[Tensor, Tensor]:
    """(M, dM/dS) of M = norm(d) written through S = ‖d‖₂² and n = numel (float64); the slope is 0 where S = 0,
    as ``vector_norm``'s gradient is at d = 0."""
    if norm == "l2sq":
        return sq, torch.ones_like(sq)
    if norm == "mse":
        return sq / count, 1.0 / count
    root = torch.sqrt(sq if norm == "l2" else sq / count)  # l2 or rms
    scale = 2.0 * root * (1.0 if norm == "l2" else count)  # dM/dS = 1/(2√S) (l2), 1/(2√(S·n)) (rms)
    return root, torch.where(sq > 0, 1.0 / scale.clamp(min=torch.finfo(sq.dtype).tiny), torch.zeros_like(sq))


def global_mismatch_terms(sq_sums: Sequence[Tensor], counts: Sequence[int], norm: str = "l2") -> list[Tensor]:
    """Under DDP: M_i of the *global* batch, as per-rank terms whose gradients, averaged over the ranks (as
    ``ODM.backward`` averages g_M), give ∇ of the global M_i exactly (§5.4, §5.7).

    M_i = f(S_i, n_i) with S_i = Σ_ranks ‖d_i,r‖₂², n_i = Σ_ranks numel (one all-reduce), so
    ∇M_i = f'(S_i, n_i)·Σ_r ∇S_i,r. Rank r's term has the value M_i (for logging) and the gradient
    world·f'(S_i, n_i)·∇S_i,r. Averaging the per-rank gradients of per-rank norms instead would scale g_M by
    about 1/√world for ``l2``. ``sq_sums[i]`` = S_i,r (with graph), ``counts[i]`` = its numel.
    """
    if not sq_sums:
        return []
    local = torch.stack([s.detach() for s in sq_sums]).double()
    stats = torch.cat([local, torch.tensor(list(counts), dtype=torch.float64, device=local.device)])
    all_reduce_sum_([stats])
    value, slope = _norm_and_slope(stats[:len(sq_sums)], stats[len(sq_sums):], norm)
    world = world_size()
    terms = []
    for s, v, k in zip(sq_sums, value, slope, strict=True):
        surrogate = (world * k).to(s.dtype) * s
        terms.append(v.to(s.dtype) + (surrogate - surrogate.detach()))
    return terms


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
    pulls each element of X_i to its nearest grid point. Under DDP each M_i is the norm over the global batch
    (``global_mismatch_terms``, applied when the block ends), so a DDP step equals a single-process one.
    """

    def __init__(self, norm: str = "l2", detach_target: bool = True, grad_to_qparams: bool = False,
                 names: dict[int, str] | None = None):
        if norm not in NORMS:
            raise ValueError(f"mr.norm={norm!r}: expected one of {NORMS}")
        self.norm = norm
        self.detach_target = detach_target
        self.grad_to_qparams = grad_to_qparams
        self.names = dict(names or {})  # id(quantizer) -> layer name, for the per-layer M_i (``named_terms``)
        self.terms: list[Tensor] = []
        self.sources: list[str] = []
        self._sq_sums: list[Tensor] = []  # DDP only: S_i of this rank and its numel (``global_mismatch_terms``)
        self._counts: list[int] = []
        self._token: contextvars.Token | None = None

    def __enter__(self) -> MismatchRegistry:
        self.terms, self.sources, self._sq_sums, self._counts = [], [], [], []
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        _ACTIVE.reset(self._token)
        self._token = None
        if exc_type is None and self._sq_sums:  # DDP: every M_i over the global batch (one all-reduce)
            self.terms = global_mismatch_terms(self._sq_sums, self._counts, self.norm)

    def record(self, x: Tensor, quantized: Tensor, lower: Tensor, upper: Tensor, bits: int,
               source: object = None) -> None:
        """Append M_i for a quantizer input ``x`` whose forward output was ``quantized``; ``source`` (the
        quantizer) names the term through ``names`` (else ``m<i>``, its position in the forward)."""
        if self.detach_target and not self.grad_to_qparams:
            target = quantized.detach()  # reuse the forward's q: no second quantization
        elif not self.detach_target and self.grad_to_qparams:
            target = quantized
        elif self.detach_target:
            target = uniform_quantize(x.detach(), lower, upper, bits)
        else:
            target = uniform_quantize(x, lower.detach(), upper.detach(), bits)
        if world_size() > 1:
            diff = x - target
            self._sq_sums.append(diff.pow(2).sum())
            self._counts.append(diff.numel())
            self.terms.append(self._sq_sums[-1])  # replaced by the global M_i when the block ends
        else:
            self.terms.append(mismatch_term(x, target, self.norm))
        self.sources.append(self.names.get(id(source), f"m{len(self.terms) - 1}"))

    def named_terms(self) -> dict[str, Tensor]:
        """{layer name: M_i} of this forward (a quantizer that ran twice: the sum of its terms)."""
        out: dict[str, Tensor] = {}
        for name, term in zip(self.sources, self.terms, strict=True):
            out[name] = out[name] + term if name in out else term
        return out

    def total(self) -> Tensor:
        """L_M = Σ_i M_i (a zero tensor when no quantizer reported)."""
        return torch.stack(self.terms).sum() if self.terms else torch.zeros(())


def active_registry() -> MismatchRegistry | None:
    """The registry of the innermost ``with MismatchRegistry(...)`` block, or None."""
    return _ACTIVE.get()
