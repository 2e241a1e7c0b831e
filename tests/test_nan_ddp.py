"""A non-finite loss on one DDP rank stops every rank with the same message (issue 9).

Two gloo processes run ``SRLitModule.training_step`` on a tiny quantized EDSR; only rank 1's batch holds a NaN.
Rank 0 must not step on (or wait in a collective of) a run that rank 1 has left: both raise
``NonFiniteLossError`` with the same message, naming rank 1 and its terms.
"""

from __future__ import annotations

import torch
from helpers import bare_step_module, make_method, run_on_ranks

from odm_sr.lit_module import NonFiniteLossError, SRLitModule, non_finite_ranks
from odm_sr.models import build_model
from odm_sr.quant import Bits
from odm_sr.quant.base import FullPrecision

WORLD = 2


def _module(method_name: str) -> SRLitModule:
    torch.manual_seed(0)
    net = build_model("edsr", 2, n_resblocks=1, n_feats=8, res_scale=1.0)
    if method_name == "odm":
        method = make_method("odm", {"init": {"num_batches": 1}, "lambda_m": 1.0}, Bits(w=2, a=2))
        net = method.quantize(net)
        method.calibrate(net, [torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(3)) * 255])
    else:
        method = FullPrecision()
    return bare_step_module(net, method)


def _step(rank: int) -> dict[str, str]:
    results = {}
    for name in ("fp", "odm"):
        gen = torch.Generator().manual_seed(10 + rank)
        batch = {"lr": torch.rand(2, 3, 12, 12, generator=gen), "hr": torch.rand(2, 3, 24, 24, generator=gen)}
        if rank == 1:
            batch["lr"][0, 0, 0, 0] = float("nan")
        try:
            _module(name).training_step(batch, 0)
            results[name] = "no error"
        except NonFiniteLossError as err:
            results[name] = str(err)
    return results


def test_a_nan_on_rank_1_stops_both_ranks_with_the_same_message(tmp_path):
    ranks = run_on_ranks(_step, WORLD, tmp_path)
    for name in ("fp", "odm"):
        assert ranks[0][name] == ranks[1][name], name
        assert ranks[0][name].startswith("non-finite training loss at step 0 ("), ranks[0][name]
        assert "rank 1: rec=nan" in ranks[0][name]
    assert "rank 0" not in ranks[0]["fp"]  # rank 0's own loss was finite
    # ODM's L_M is the norm over the global batch: rank 1's NaN reaches rank 0's L_M, not its L_R
    assert "rank 0: rec=" in ranks[0]["odm"] and "mismatch=nan" in ranks[0]["odm"]


def test_non_finite_ranks_in_one_process():
    assert non_finite_ranks(torch.tensor(1.0), {"rec": torch.tensor(1.0)}) == {}
    terms = {"rec": torch.tensor(2.0), "kd": torch.tensor(3.0)}
    assert non_finite_ranks(torch.tensor(float("inf")), terms) == {0: {"rec": 2.0, "kd": 3.0}}
