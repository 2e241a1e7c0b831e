"""Op and host-sync counting (analysis.profiling) on hand-counted snippets."""

from __future__ import annotations

import torch

from odm_sr.analysis.profiling import step_profile


def test_ops_are_counted_and_views_are_not():
    x = torch.randn(4, 3)
    with step_profile() as p:
        y = x + 1.0          # aten.add
        z = y.view(3, 4)     # a view: no kernel
        w = z.t().sum()      # t is a view; aten.sum
        torch.mul(w, 2.0)    # aten.mul
    assert p.ops == {"aten.add": 1, "aten.sum": 1, "aten.mul": 1} and p.total_ops == 3
    assert p.total_syncs == 0


def test_each_kind_of_host_sync_counts_once():
    x = torch.randn(6)
    with step_profile() as p:
        x.sum().item()
        float(x.max())
        bool((x > 0).any())
        if x.min() < 10:
            pass
        x[x > 0]             # boolean mask: data-dependent size
        torch.nonzero(x)
        x.tolist()
        x.cpu()
        x.detach().numpy()
    assert p.syncs == {"aten._local_scalar_dense": 4, "aten.index": 1, "aten.nonzero": 1, "Tensor.tolist": 1,
                       "Tensor.cpu": 1, "Tensor.numpy": 1}
    assert p.total_syncs == 9


def test_integer_index_is_not_a_sync_and_patches_are_undone():
    x = torch.randn(6)
    with step_profile() as p:
        x[torch.tensor([0, 2])]
    assert p.total_syncs == 0 and p.ops["aten.index"] == 1
    with step_profile() as p:
        pass
    x.tolist()  # outside: not counted, and Tensor.tolist is the original again
    assert p.total_syncs == 0 and torch.Tensor.tolist.__name__ == "tolist"
