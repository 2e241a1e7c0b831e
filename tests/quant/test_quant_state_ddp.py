"""Quantizer statistics under DDP (gloo, 2 CPU processes): every rank ends with the same state, that of the
global batch.

Each rank calibrates on its own batches. Without the all-reduce the ranks would keep different ranges (ODM),
α (PAMS), bounds and dynamic layers (DDTB) for the rest of training, since DDP only averages gradients.
The single-process references are computed here on the union of the ranks' batches.
"""

from __future__ import annotations

import torch
from helpers import make_method, run_on_ranks

from odm_sr.models import build_model
from odm_sr.quant import Bits
from odm_sr.quant.base import frozen_copy
from odm_sr.quant.calibration import batch_range, forward_order, range_quantized_layers
from odm_sr.quant.distributed import all_reduce_mean_, gather_cat, world_size
from odm_sr.quant.odm import ODM
from odm_sr.quant.pams import PAMS, PamsActQuantizer

WORLD = 2


def _edsr(blocks: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("edsr", 2, n_resblocks=blocks, n_feats=8, res_scale=1.0)


def _batches(rank: int, n: int = 2) -> list[torch.Tensor]:
    """Rank-specific LR batches; rank 1's are brighter, so per-rank statistics clearly differ."""
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.rand(2, 3, 10, 10, generator=gen) * (120.0 + 135.0 * rank) for _ in range(n)]


def _hr(lr: torch.Tensor) -> torch.Tensor:
    return torch.rand(lr.shape[0], 3, 2 * lr.shape[2], 2 * lr.shape[3], generator=torch.Generator().manual_seed(7))


# -- ODM percentile calibration ---------------------------------------------------------------------------
def _odm(source: str, num_batches: int = 2) -> tuple[torch.nn.Module, ODM]:
    method = make_method("odm", {"init": {"num_batches": num_batches, "source": source, "j": 99.0}}, Bits(w=2, a=2))
    return method.quantize(_edsr()), method


def _odm_ranges(model) -> dict[str, torch.Tensor]:
    return {n: torch.stack([m.act_quant.lower.detach(), m.act_quant.upper.detach()]).reshape(-1)
            for n, m in range_quantized_layers(model).items()}


def _odm_calibrated_fp(rank: int) -> dict[str, torch.Tensor]:
    model, method = _odm("fp")
    method.calibrate(model, _batches(rank))
    return _odm_ranges(model)


def _odm_calibrated_sequential(rank: int) -> dict[str, torch.Tensor]:
    model, method = _odm("sequential")
    method.calibrate(model, _batches(rank))
    return _odm_ranges(model)


def _single_process_odm(source: str) -> dict[str, torch.Tensor]:
    """One process calibrating on the union batches: batch k = the ranks' k-th batches concatenated."""
    model, method = _odm(source)
    method.calibrate(model, [torch.cat(parts) for parts in zip(*(_batches(r) for r in range(WORLD)), strict=True)])
    return _odm_ranges(model)


def _assert_same_on_ranks(ranks: list[dict]) -> None:
    assert set(ranks[0]) == set(ranks[1])
    for name in ranks[0]:
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0, msg=name)


def test_odm_calibration_equals_one_process_on_the_union_batches(tmp_path):
    """Percentiles are not linear: the mean of the ranks' half-batch percentiles would not be the percentile of
    the whole batch, so each percentile is taken over the ranks' inputs gathered (issue 9)."""
    for source, fn in (("fp", _odm_calibrated_fp), ("sequential", _odm_calibrated_sequential)):
        ranks = run_on_ranks(fn, WORLD, tmp_path)
        _assert_same_on_ranks(ranks)
        expected = _single_process_odm(source)
        assert set(ranks[0]) == set(expected) and len(expected) == 4
        for name, want in expected.items():
            torch.testing.assert_close(ranks[0][name], want, rtol=1e-6, atol=1e-5, msg=f"{source} {name}")
        # teeth: rank 0 alone would have kept its own (darker) ranges
        model, method = _odm(source)
        method.calibrate(model, _batches(0))
        alone = _odm_ranges(model)
        assert all(float(alone[n][1]) < 0.9 * float(expected[n][1]) for n in expected), source


def _odm_lazy_init(rank: int) -> dict[str, torch.Tensor]:
    model, method = _odm("fp")
    model.train()(_batches(rank)[0])  # no calibration: the first forward sets each range from its batch
    return _odm_ranges(model)


def test_odm_first_batch_ranges_are_those_of_the_union_batch(tmp_path):
    ranks = run_on_ranks(_odm_lazy_init, WORLD, tmp_path)
    _assert_same_on_ranks(ranks)
    model, _ = _odm("fp")
    layers = range_quantized_layers(model)
    first = forward_order(model, _batches(0)[0], layers)[0]  # its input is FP (head conv): computable here
    seen = []
    handle = layers[first].register_forward_pre_hook(lambda _m, inputs: seen.append(batch_range(inputs[0], 99.0)))
    with torch.no_grad():
        layers[first](model.head(model.sub_mean(torch.cat([_batches(r)[0] for r in range(WORLD)]))))
    handle.remove()
    want = seen[0].float()
    torch.testing.assert_close(ranks[0][first], want, rtol=1e-6, atol=1e-5)


# -- PAMS α tracking -------------------------------------------------------------------------------------
def _pams(rank: int, steps: int, epoch: int = 1) -> dict[str, torch.Tensor]:
    model = _edsr()
    teacher = frozen_copy(model)
    method = make_method("pams", {"iters_per_epoch": epoch, "ema_epochs": 1}, Bits(w=2, a=2))
    method.quantize(model)
    for step, lr in zip(range(steps), _batches(rank), strict=False):
        method.training_losses(model.train(), lr, _hr(lr), step, teacher=teacher)
    return {n: torch.stack([m.alpha.detach(), m.running_max]) for n, m in model.named_modules()
            if isinstance(m, PamsActQuantizer)}


def _pams_two_steps(rank: int) -> dict[str, torch.Tensor]:
    return _pams(rank, steps=2)  # step 0 tracks α on this rank's batch, step 1 ends the tracking epoch


def test_pams_alpha_is_averaged_when_tracking_ends(tmp_path):
    ranks = run_on_ranks(_pams_two_steps, WORLD, tmp_path)
    _assert_same_on_ranks(ranks)
    tracked = [_pams(r, steps=1) for r in range(WORLD)]  # single process: each rank's α after its epoch
    assert len(tracked[0]) == 6
    for name, got in ranks[0].items():
        first, second = float(tracked[0][name][0]), float(tracked[1][name][0])
        assert abs(second - first) > 0.02 * first, name  # the ranks really tracked different α
        torch.testing.assert_close(got, (tracked[0][name] + tracked[1][name]) / 2, rtol=1e-6, atol=0, msg=name)


class _PamsStep(torch.nn.Module):
    """One training step's forward inside ``DistributedDataParallel``, as Lightning runs ``training_step``: DDP
    broadcasts rank 0's buffers before it."""

    def __init__(self, model: torch.nn.Module, method: PAMS) -> None:
        super().__init__()
        self.model, self.method, self.teacher = model, method, [frozen_copy(model)]

    def forward(self, lr: torch.Tensor, step: int) -> torch.Tensor:
        out = self.method.training_losses(self.model, lr, _hr(lr), step, teacher=self.teacher[0])
        return sum(out.terms.values())


def _pams_under_ddp(rank: int) -> dict[str, torch.Tensor]:
    model = _edsr()
    method = make_method("pams", {"iters_per_epoch": 2, "ema_epochs": 1}, Bits(w=2, a=2))
    method.quantize(model)
    ddp = torch.nn.parallel.DistributedDataParallel(_PamsStep(model.train(), method), find_unused_parameters=True)
    for step, lr in enumerate(_batches(rank, n=3)):  # steps 0, 1 track α; step 2 ends the tracking epoch
        ddp(lr, step).backward()  # no optimizer step: the weights stay those of the single-process reference
    return {n: m.alpha.detach().clone() for n, m in model.named_modules() if isinstance(m, PamsActQuantizer)}


def test_pams_alpha_under_ddp_is_the_mean_of_the_ranks_tracked_values(tmp_path):
    """DDP broadcasts buffers from rank 0 before each forward: a tracked maximum kept in a buffer would make
    every rank continue rank 0's EMA (issue 14). α after the tracking epoch must be the ranks' mean."""
    ranks = run_on_ranks(_pams_under_ddp, WORLD, tmp_path)
    _assert_same_on_ranks(ranks)
    tracked = [_pams(r, steps=2, epoch=2) for r in range(WORLD)]  # one process each: α after 2 tracked batches
    for name, got in ranks[0].items():
        own = [float(t[name][0]) for t in tracked]
        assert abs(own[1] - own[0]) > 0.02 * own[0], name
        torch.testing.assert_close(got, torch.tensor(sum(own) / 2), rtol=1e-6, atol=0, msg=name)


# -- DDTB calibration epoch -------------------------------------------------------------------------------
def _ddtb(rank: int) -> dict[str, torch.Tensor]:
    model = _edsr(blocks=3)
    teacher = frozen_copy(model)
    method = make_method("ddtb", {"iters_per_epoch": 2, "dynamic_ratio": 0.5}, Bits(w=2, a=2))
    method.quantize(model)
    lrs = _batches(rank, n=3)
    for step, lr in enumerate(lrs):  # steps 0, 1: calibration epoch (recording); step 2: choice + bound init
        method.training_losses(model.train(), lr, _hr(lr), step, teacher=teacher)
    quants = method.act_quantizers(model)
    return {"dynamic": torch.tensor([q.is_dynamic for q in quants.values()]),
            "bounds": torch.stack([torch.stack([q.alpha_lower.detach(), q.alpha_upper.detach()])
                                   for q in quants.values()])}


def _ddtb_single_process_choice() -> torch.Tensor:
    """The dynamic layers chosen from the records of both ranks' calibration batches, in one process."""
    model = _edsr(blocks=3)
    teacher = frozen_copy(model)
    method = make_method("ddtb", {"iters_per_epoch": 2, "dynamic_ratio": 0.5}, Bits(w=2, a=2))
    method.quantize(model)
    for r in range(WORLD):
        for step, lr in enumerate(_batches(r, n=2)):
            method.training_losses(model.train(), lr, _hr(lr), step, teacher=teacher)
    method._finish_calibration(model)
    return torch.tensor([q.is_dynamic for q in method.act_quantizers(model).values()])


def test_ddtb_ranks_choose_the_same_dynamic_layers_and_bounds(tmp_path):
    ranks = run_on_ranks(_ddtb, WORLD, tmp_path)
    _assert_same_on_ranks(ranks)
    expected = _ddtb_single_process_choice()
    assert int(expected.sum()) == 4 and len(expected) == 9  # ⌊0.5 · 9⌋
    assert torch.equal(ranks[0]["dynamic"], expected)
    alone = _ddtb(0)  # no process group: rank 0's own first-batch bounds
    assert not torch.allclose(alone["bounds"], ranks[0]["bounds"], rtol=1e-2)


# -- the helpers themselves -----------------------------------------------------------------------------
def _collectives(rank: int) -> dict[str, torch.Tensor]:
    mean = torch.tensor([1.0 + rank, 10.0 * rank])
    all_reduce_mean_([mean])
    return {"mean": mean, "cat": gather_cat(torch.tensor([[rank, rank + 10]]), dim=1),
            "world": torch.tensor(world_size())}


def test_collectives_by_hand(tmp_path):
    ranks = run_on_ranks(_collectives, WORLD, tmp_path)
    for got in ranks:
        assert torch.equal(got["mean"], torch.tensor([1.5, 5.0]))
        assert torch.equal(got["cat"], torch.tensor([[0, 10, 1, 11]]))
        assert int(got["world"]) == 2
    # without a process group every helper leaves its input alone
    x = torch.tensor([2.0, 4.0])
    all_reduce_mean_([x])
    assert torch.equal(x, torch.tensor([2.0, 4.0])) and gather_cat(x) is x and world_size() == 1
