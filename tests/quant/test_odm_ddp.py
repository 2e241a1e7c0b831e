"""ODM's cooperative update under DDP equals the single-process step on the global batch (METHODS.md §5.4, §5.7).

Two CPU processes (gloo) hold the same calibrated tiny quantized EDSR; each backpropagates one half of a batch
through ``ODM.backward``. Both must end with the θ.grad, cosine, weight, ‖g_R‖, ‖g_M‖, L_M and MR balance of
one process stepping on the whole batch, for every ``mr.norm``: M_i is a norm over the global batch, so
averaging the ranks' gradients of their own half-batch norms would be wrong (×1/√2 for l2, ×½ for l2sq).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from helpers import make_method, run_on_ranks

from odm_sr.models import build_model
from odm_sr.quant import Bits
from odm_sr.quant.distributed import average_across_ranks
from odm_sr.quant.mismatch import NORMS
from odm_sr.quant.odm import ODM

WORLD = 2
LAMBDA_M = 1.0  # large, so that a wrong g_M (or cosine) shows far above float noise
LOGS = ("cos", "weight", "grad_norm_rec", "grad_norm_mismatch", "loss_mismatch", "mr/rho")


def _odm(norm: str, state: dict | None = None) -> tuple[torch.nn.Module, ODM]:
    torch.manual_seed(0)
    options = {"lambda_m": LAMBDA_M, "init": {"num_batches": 1}, "mr": {"norm": norm}}
    method = make_method("odm", options, Bits(w=2, a=2))
    model = method.quantize(build_model("edsr", 2, n_resblocks=1, n_feats=8, res_scale=1.0))
    if state is not None:
        model.load_state_dict(state)
    return model.train(), method


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000)
    return torch.rand(4, 3, 12, 12, generator=gen) * 255, torch.rand(4, 3, 24, 24, generator=gen) * 255


def _step(norm: str, state: dict, part: slice) -> dict[str, torch.Tensor]:
    """One ODM backward on ``part`` of the batch: θ/φ grads by name, the logged scalars, the per-layer balance."""
    model, method = _odm(norm, state)
    lr, hr = _batch()
    out = method.training_losses(model, lr[part], hr[part], step=0)
    logs = method.backward(out, model, lambda loss: loss.backward())
    result = {f"grad/{n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    result.update({f"log/{k}": torch.tensor(logs[k], dtype=torch.float64) for k in LOGS})
    result.update({f"balance/{k}": v for k, v in method.balance_stats().items()})
    return result


def _rank_steps(state_path: str, rank: int) -> dict[str, dict[str, torch.Tensor]]:
    state = torch.load(state_path, weights_only=True)
    half = slice(2 * rank, 2 * rank + 2)
    return {norm: _step(norm, state, half) for norm in NORMS}


def _calibrated_state() -> dict:
    model, method = _odm("l2")
    method.calibrate(model, [_batch()[0]])
    return model.state_dict()


def test_a_ddp_step_on_two_halves_equals_one_step_on_the_whole_batch(tmp_path):
    state = _calibrated_state()
    torch.save(state, tmp_path / "state.pt")
    ranks = run_on_ranks(functools.partial(_rank_steps, str(tmp_path / "state.pt")), WORLD, tmp_path)
    for norm in NORMS:
        want = _step(norm, state, slice(0, 4))
        got0, got1 = ranks[0][norm], ranks[1][norm]
        assert set(got0) == set(got1) == set(want) and any(k.startswith("balance/") for k in want)
        assert "grad/body.0.body.0.weight" in want
        for key, value in want.items():
            torch.testing.assert_close(got0[key], got1[key], rtol=0, atol=0, msg=f"{norm} {key}")
            # float32 sums in another order: 1e-5 relative to the tensor's scale
            scale = float(value.abs().max())
            torch.testing.assert_close(got0[key].to(value.dtype), value, rtol=1e-5, atol=1e-5 * scale,
                                       msg=f"{norm} {key}")


def test_average_across_ranks_is_the_identity_without_a_process_group():
    grads = [torch.ones(2), None]
    assert not dist.is_initialized()
    assert average_across_ranks(grads, [torch.nn.Parameter(torch.zeros(2))] * 2) == grads
