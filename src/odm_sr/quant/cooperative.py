"""ODM's cooperative gradient update as flat tensor passes (METHODS.md §5.5, pseudo-code §5.7).

θ.grad = λ_R g_R + λ_M w(cos(g_R, g_M)) g_M. The gradients of all parameters are concatenated once into two flat
vectors; every per-parameter quantity (‖g_R,k‖², ‖g_M,k‖², ⟨g_R,k, g_M,k⟩) is one segment sum over them, and the
combined gradient is one vector split back into per-parameter views. The number of kernels is then a few dozen
whatever the number of parameters (a loop over parameters launched several per parameter: ~1,400 on
EDSR-baseline), and nothing waits for the host (GPU readiness; ``bench/op_count.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

WEIGHT_FNS = ("half_cos", "cos", "cos_signed", "step")
COS_SCOPES = ("global", "per_tensor")

_SEGMENTS: dict[tuple, tuple[Tensor, Tensor]] = {}  # (sizes, order, device) -> (segment of each element, order)


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


def _segments(sizes: tuple[int, ...], order: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """(segment index of every element of the concatenation, ``order`` as a tensor), cached: the parameter
    layout is the same every step."""
    key = (sizes, order, str(device))
    if key not in _SEGMENTS:
        if len(_SEGMENTS) > 64:
            _SEGMENTS.clear()
        counts = torch.tensor(sizes, dtype=torch.long, device=device)
        seg = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts, output_size=sum(sizes))
        _SEGMENTS[key] = (seg, torch.tensor(order, dtype=torch.long, device=device))
    return _SEGMENTS[key]


def _flat(parts: Sequence[Tensor], zeros: int, like: Tensor, zeros_first: bool = False) -> Tensor:
    """The concatenation of ``parts`` (flattened) with ``zeros`` zeros after (or before) them."""
    pieces = [p.reshape(-1) for p in parts]
    if zeros:
        pad = like.new_zeros(zeros)
        pieces = [pad, *pieces] if zeros_first else [*pieces, pad]
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _empty_stats(zero: Tensor, count: int) -> dict[str, Tensor]:
    return {"cos": zero, "weight": zero, "grad_norm_rec": zero, "grad_norm_mismatch": zero, "sign_conflict": zero,
            "balance": zero, "rec_sq": zero.new_zeros(count), "coop_sq": zero.new_zeros(count)}


def combine_gradients(g_r: Sequence[Tensor | None], g_m: Sequence[Tensor | None], lambda_r: float = 1.0,
                      lambda_m: float = 1e-5, weight_fn: str = "half_cos", scope: str = "global",
                      include_unreached: bool = True, eps: float = 1e-12
                      ) -> tuple[list[Tensor | None], dict[str, Tensor]]:
    """θ.grad = λ_R g_R + λ_M w(cos(g_R, g_M)) g_M (METHODS.md §5.5, pseudo-code §5.7).

    ``g_r[k]``/``g_m[k]`` are the gradients of parameter k; None means "not reached" (0).
    ``scope=global``: one cosine over the concatenation of all parameters, c = ⟨g_R, g_M⟩/(‖g_R‖‖g_M‖ + eps),
    where ‖g_R‖ also covers parameters L_M does not reach unless ``include_unreached=False``
    (``mr.cos_include_unreached``). ``per_tensor``: one cosine and weight per parameter reached by both.
    Returns the combined gradients (None where both are None; views of one buffer) and stats in the gradients'
    dtype, 0-d: cos, weight (per_tensor: means over reached tensors), grad_norm_rec, grad_norm_mismatch,
    sign_conflict (share of elements with sign(g_R) ≠ sign(g_M) among those where both are non-zero), balance
    ρ = ‖λ_M w g_M‖ / ‖λ_R g_R‖ (= λ_M·w·‖g_M‖ / (λ_R‖g_R‖) for the global scope: what MR contributes to θ's
    gradient relative to L_R); and one entry per parameter (``rec_sq`` = ‖λ_R g_R,k‖², ``coop_sq`` =
    ‖λ_M w_k g_M,k‖²) from which ``balance_by_group`` forms the ratio of any group of parameters.
    """
    if len(g_r) != len(g_m):
        raise ValueError(f"{len(g_r)} reconstruction grads but {len(g_m)} mismatch grads")
    if scope not in COS_SCOPES:
        raise ValueError(f"mr.cos_scope={scope!r}: expected one of {COS_SCOPES}")
    first = next((g for g in (*g_r, *g_m) if g is not None), None)
    zero = torch.zeros(()) if first is None else first.new_zeros(())
    pairs = [k for k, (r, m) in enumerate(zip(g_r, g_m, strict=True)) if r is not None and m is not None]
    r_only = [k for k, (r, m) in enumerate(zip(g_r, g_m, strict=True)) if r is not None and m is None]
    m_only = [k for k, (r, m) in enumerate(zip(g_r, g_m, strict=True)) if r is None and m is not None]
    order = pairs + r_only + m_only
    if not order:
        return [None] * len(g_r), _empty_stats(zero, len(g_r))
    grads = [g_r[k] if g_r[k] is not None else g_m[k] for k in order]
    sizes = [g.numel() for g in grads]
    n_pair, n_r = sum(sizes[:len(pairs)]), sum(sizes[len(pairs):len(pairs) + len(r_only)])
    r_cat = _flat([g_r[k] for k in pairs + r_only], sum(sizes) - n_pair - n_r, zero)
    m_cat = torch.cat([_flat([g_m[k] for k in pairs], n_r, zero), *[g_m[k].reshape(-1) for k in m_only]]) \
        if m_only else _flat([g_m[k] for k in pairs], n_r, zero)
    seg, order_t = _segments(tuple(sizes), tuple(order), zero.device)
    sums = zero.new_zeros(3, len(order)).index_add_(1, seg, torch.stack([r_cat * r_cat, m_cat * m_cat,
                                                                         r_cat * m_cat]))
    rr, mm, rm = sums.unbind(0)
    q = len(pairs)
    norm_r_sq, norm_m = rr.sum(), torch.sqrt(mm.sum())
    if scope == "global":
        cos_r_sq = norm_r_sq if include_unreached else rr[:q].sum()
        cos = rm.sum() / (torch.sqrt(cos_r_sq) * norm_m + eps)
        w_seg = cooperative_weight(cos, weight_fn).expand(len(order))
        coop_scale = (lambda_m * w_seg[0]).to(m_cat.dtype)
        coop = coop_scale * m_cat
        cos_stat, weight_stat = cos, w_seg[0]
    else:
        cos_k = rm[:q] / (torch.sqrt(rr[:q]) * torch.sqrt(mm[:q]) + eps)
        w_k = cooperative_weight(cos_k, weight_fn)
        w_seg = torch.cat([w_k, w_k.new_zeros(len(order) - q)])  # no cosine, no weight outside the pairs
        coop = (lambda_m * w_seg).to(m_cat.dtype)[seg] * m_cat
        cos_stat = cos_k.mean() if q else zero
        weight_stat = w_k.mean() if q else zero
    combined_cat = coop + (r_cat if lambda_r == 1.0 else lambda_r * r_cat)
    combined: list[Tensor | None] = [None] * len(g_r)
    for k, piece, g in zip(order, combined_cat.split(sizes), grads, strict=True):
        combined[k] = piece.view_as(g)
    if scope == "per_tensor":
        for k in m_only:  # g_R absent and no cosine: nothing to combine (as per-tensor weights are undefined)
            combined[k] = None
    s = r_cat[:n_pair].sign() * m_cat[:n_pair].sign()
    both = torch.dot(s, s).double()
    conflict = (both - s.sum().double()) / 2
    rec_sq = zero.new_zeros(len(g_r)).index_copy_(0, order_t, rr * lambda_r ** 2)
    coop_sq = zero.new_zeros(len(g_r)).index_copy_(0, order_t, mm * (lambda_m * w_seg) ** 2)
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


__all__ = ["COS_SCOPES", "WEIGHT_FNS", "balance_by_group", "combine_gradients", "cooperative_weight"]
