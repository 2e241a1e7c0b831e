"""Collectives for quantizer state under DDP: statistics each rank gathers from its own data shard.

DDP keeps the parameters of the ranks equal by averaging gradients, but a calibration statistic that a rank
writes into a parameter or buffer directly (ODM's percentile ranges, PAMS's tracked α, DDTB's first-batch
bounds and its dynamic-layer choice) would differ from rank to rank. These helpers turn the per-rank statistic
into the one of the global batch. Without an initialised process group (or with one rank) each is a no-op, so
single-process code paths stay bit for bit what they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def world_size() -> int:
    """Number of ranks of the default process group; 1 without one."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """In place: each tensor ← its sum over the ranks. One flat all-reduce per dtype."""
    if world_size() < 2:
        return
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        members = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in members])
        torch.distributed.all_reduce(flat)
        with torch.no_grad():
            for t, chunk in zip(members, flat.split([t.numel() for t in members]), strict=True):
                t.copy_(chunk.view_as(t))


def all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """In place: each tensor ← its mean over the ranks."""
    world = world_size()
    if world < 2:
        return
    all_reduce_sum_(tensors)
    with torch.no_grad():
        for t in tensors:
            t.div_(world)


def average_across_ranks(grads: Sequence[Tensor | None], params: Sequence[nn.Parameter]) -> list[Tensor | None]:
    """Under DDP (world size > 1): each gradient's mean over the ranks, g ← Σ_ranks g / world (METHODS.md §5.7).

    ``torch.autograd.grad`` bypasses DDP's gradient hooks, so g_R and g_M are averaged here, before the cosine.
    A gradient that is None on this rank but not on another counts as zeros (all ranks must agree); one that is
    None on every rank stays None. One flat all-reduce per dtype. Without a process group: unchanged.
    """
    grads = list(grads)
    if not grads or world_size() < 2:
        return grads
    present = torch.tensor([g is not None for g in grads], dtype=torch.int32, device=params[0].device)
    all_reduce_sum_([present])
    filled = [None if not n else (g.clone() if g is not None else torch.zeros_like(p))
              for g, p, n in zip(grads, params, present.tolist(), strict=True)]
    all_reduce_mean_([g for g in filled if g is not None])
    return filled


def gather_cat(x: Tensor, dim: int = 0) -> Tensor:
    """The ranks' tensors concatenated along ``dim`` in rank order (all must have the same shape)."""
    world = world_size()
    if world < 2:
        return x
    shape = torch.tensor(list(x.shape), dtype=torch.int64, device=x.device)
    lowest, highest = shape.clone(), shape.clone()
    torch.distributed.all_reduce(lowest, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(highest, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(lowest, highest):
        raise RuntimeError(f"gather_cat: the ranks hold tensors of different shapes (this rank {tuple(x.shape)}, "
                           f"between {tuple(lowest.tolist())} and {tuple(highest.tolist())}); every rank must "
                           "record the same number of statistics")
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


__all__ = ["all_reduce_mean_", "all_reduce_sum_", "average_across_ranks", "gather_cat", "world_size"]
