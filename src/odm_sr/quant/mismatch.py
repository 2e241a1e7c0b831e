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

from .distributed import all_reduce_sum_, world_size
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
    Returns the combined gradients (None where both are None) and stats in the gradients' dtype, 0-d:
    cos, weight (per_tensor: means over reached tensors), grad_norm_rec, grad_norm_mismatch, sign_conflict
    (share of elements with sign(g_R) ≠ sign(g_M) among those where both are non-zero), balance
    ρ = ‖λ_M w g_M‖ / ‖λ_R g_R‖ (= λ_M·w·‖g_M‖ / (λ_R‖g_R‖) for the global scope: what MR contributes to θ's
    gradient relative to L_R); and one entry per parameter (``rec_sq`` = ‖λ_R g_R,k‖², ``coop_sq`` =
    ‖λ_M w_k g_M,k‖²) from which ``balance_by_group`` forms the ratio of any group of parameters.
    """
    if len(g_r) != len(g_m):
        raise ValueError(f"{len(g_r)} reconstruction grads but {len(g_m)} mismatch grads")
    if scope not in COS_SCOPES:
        raise ValueError(f"mr.cos_scope={scope!r}: expected one of {COS_SCOPES}")
    zero = _zero_like_stats(list(g_r) + list(g_m))
    sq_r = [_sq(r) if r is not None else zero for r in g_r]
    sq_m = [_sq(m) if m is not None else zero for m in g_m]
    reached = [r is not None and m is not None for r, m in zip(g_r, g_m, strict=True)]
    norm_r_sq = sum(sq_r, zero)
    norm_m = torch.sqrt(sum(sq_m, zero))
    if scope == "global":
        dot = sum((_dot(r, m) for r, m, ok in zip(g_r, g_m, reached, strict=True) if ok), zero)
        cos_r_sq = norm_r_sq if include_unreached else sum((q for q, ok in zip(sq_r, reached, strict=True) if ok),
                                                          zero)
        cos = dot / (torch.sqrt(cos_r_sq) * norm_m + eps)
        weight = cooperative_weight(cos, weight_fn)
        weights = [weight] * len(g_r)
        cos_stat, weight_stat = cos, weight
    else:
        cosines = [_dot(r, m) / (torch.sqrt(qr) * torch.sqrt(qm) + eps) if ok else None
                   for r, m, qr, qm, ok in zip(g_r, g_m, sq_r, sq_m, reached, strict=True)]
        weights = [cooperative_weight(c, weight_fn) if c is not None else None for c in cosines]
        pairs_cw = [(c, w) for c, w in zip(cosines, weights, strict=True) if c is not None]
        cos_stat = torch.stack([c for c, _ in pairs_cw]).mean() if pairs_cw else zero
        weight_stat = torch.stack([w for _, w in pairs_cw]).mean() if pairs_cw else zero
    combined = [_combine_one(r, m, w, lambda_r, lambda_m) for r, m, w in zip(g_r, g_m, weights, strict=True)]
    counts = [_sign_counts(r, m) for r, m, ok in zip(g_r, g_m, reached, strict=True) if ok]
    both = sum((b for b, _ in counts), zero.double())
    conflict = sum((c for _, c in counts), zero.double())
    rec_sq = torch.stack(sq_r) * lambda_r ** 2 if sq_r else zero.reshape(1)[:0]
    coop_sq = (torch.stack([q * (lambda_m * w) ** 2 if w is not None and m is not None else zero
                            for q, w, m in zip(sq_m, weights, g_m, strict=True)]) if sq_m else zero.reshape(1)[:0])
    stats = {"cos": cos_stat, "weight": weight_stat, "grad_norm_rec": torch.sqrt(norm_r_sq),
             "grad_norm_mismatch": norm_m, "sign_conflict": (conflict / both.clamp(min=1)).to(zero.dtype),
             "balance": _ratio(coop_sq.sum(), rec_sq.sum()), "rec_sq": rec_sq, "coop_sq": coop_sq}
    return combined, stats


def _ratio(coop_sq: Tensor, rec_sq: Tensor) -> Tensor:
    """√coop_sq / √rec_sq, 0 where the reconstruction gradient is 0."""
    return torch.where(rec_sq > 0, torch.sqrt(coop_sq / rec_sq.clamp(min=torch.finfo(rec_sq.dtype).tiny)),
                       torch.zeros_like(rec_sq))


def balance_by_group(stats: dict[str, Tensor], group_of: Sequence[int], num_groups: int) -> Tensor:
    """ρ_g = ‖λ_M w g_M‖ / ‖λ_R g_R‖ over the parameters of each group g (``group_of[k]``: the group of
    parameter k of ``combine_gradients``, −1 for none); one tensor op, no host sync."""
    index = torch.as_tensor([g if g >= 0 else num_groups for g in group_of], dtype=torch.long,
                            device=stats["rec_sq"].device)  # the extra last bin collects the ungrouped
    rec = stats["rec_sq"].new_zeros(num_groups + 1).index_add_(0, index, stats["rec_sq"])[:num_groups]
    coop = stats["coop_sq"].new_zeros(num_groups + 1).index_add_(0, index, stats["coop_sq"])[:num_groups]
    return _ratio(coop, rec)


def _combine_one(r: Tensor | None, m: Tensor | None, w: Tensor | None, lambda_r: float,
                 lambda_m: float) -> Tensor | None:
    if m is None or w is None:
        return None if r is None else lambda_r * r
    coop = (lambda_m * w).to(m.dtype) * m
    return coop if r is None else lambda_r * r + coop
