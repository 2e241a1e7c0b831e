"""ODM's cooperative update under DDP (METHODS.md §5.7): g_R and g_M are averaged over the ranks before the cosine.

Two CPU processes (gloo, ``torch.multiprocessing``) hold the same tiny quantized EDSR and each backpropagates its
own batch through ``ODM.backward``; afterwards both must hold the same ``.grad``, equal to the single-process
combination of the averaged gradients computed here from the two batches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from helpers import run_on_ranks

from odm_sr.models import build_model
from odm_sr.quant import Bits
from odm_sr.quant.distributed import average_across_ranks
from odm_sr.quant.mismatch import combine_gradients
from odm_sr.quant.odm import ODM

WORLD = 2
LAMBDA_M = 1.0  # large, so that a wrong g_M (or cosine) shows far above float noise


def _tiny_odm() -> tuple[torch.nn.Module, ODM]:
    """The same calibrated 2-bit EDSR (1 block, 8 features, x2) in every process."""
    torch.manual_seed(0)
    method = ODM({"lambda_m": LAMBDA_M, "init": {"num_batches": 1}}, Bits(w=2, a=2))
    model = method.quantize(build_model("edsr", 2, n_resblocks=1, n_feats=8, res_scale=1.0))
    calib = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(99)) * 255
    method.calibrate(model, [calib])
    return model.train(), method


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.rand(2, 3, 12, 12, generator=gen) * 255, torch.rand(2, 3, 24, 24, generator=gen) * 255


def _rank_grads(rank: int) -> dict[str, torch.Tensor]:
    model, method = _tiny_odm()
    out = method.training_losses(model, *_batch(rank), step=0)
    method.backward(out, model, lambda loss: loss.backward())
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _mean(grads: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [g for g in grads if g is not None]
    return sum(present) / len(grads) if present else None


def _expected_grads() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(combination of the rank-averaged g_R, g_M; rank 0's own combination without averaging), by name."""
    model, method = _tiny_odm()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = method.partition(model)
    theta = groups["theta"]
    phi = groups["act_qparams"] + groups["wcc_gamma"] + groups["lsq_scale"]
    params = theta + phi + groups["rest"]
    per_rank = []
    for rank in range(WORLD):
        out = method.training_losses(model, *_batch(rank), step=0)
        g_r = torch.autograd.grad(out.terms["rec"], params, retain_graph=True, allow_unused=True)
        g_m = torch.autograd.grad(out.terms["mismatch"], theta, allow_unused=True)
        per_rank.append((g_r, g_m))

    def combine(g_r, g_m) -> dict[str, torch.Tensor]:
        theta_grads, _ = combine_gradients(g_r[:len(theta)], g_m, 1.0, LAMBDA_M, "half_cos", "global", True)
        grads = list(theta_grads) + list(g_r[len(theta):])
        return {names[id(p)]: g for p, g in zip(params, grads, strict=True) if g is not None}

    avg_r = [_mean([r[k] for r, _ in per_rank]) for k in range(len(params))]
    avg_m = [_mean([m[k] for _, m in per_rank]) for k in range(len(theta))]
    return combine(avg_r, avg_m), combine(*per_rank[0])


def test_ranks_hold_the_combination_of_the_averaged_gradients(tmp_path):
    ranks = run_on_ranks(_rank_grads, WORLD, tmp_path)
    expected, rank0_alone = _expected_grads()
    assert set(ranks[0]) == set(ranks[1]) == set(expected)
    for name, want in expected.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0, msg=name)
        # float32 sums in another order: tolerance relative to the tensor's scale (pixels are 0-255)
        torch.testing.assert_close(ranks[0][name], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=name)
    # the check has teeth: without the all-reduce, rank 0 would have kept its own combination
    assert any(not torch.allclose(rank0_alone[n], expected[n], rtol=1e-2) for n in expected)


def test_average_across_ranks_is_the_identity_without_a_process_group():
    grads = [torch.ones(2), None]
    assert not dist.is_initialized()
    assert average_across_ranks(grads, [torch.nn.Parameter(torch.zeros(2))] * 2) == grads

