"""Evaluation under DDP (gloo, 2 CPU processes): the per-set means are over every image of the set, once.

DDP's distributed sampler splits a set between the ranks and pads the shorter shard with a repeated image; the
metrics (``SRMetrics``, summed over the ranks by torchmetrics) must be the single-process ones all the same:
each rank leaves out the images it does not own (``evaluation.owned_weights``).
"""

from __future__ import annotations

import torch
from helpers import run_on_ranks
from torch.utils.data import DataLoader, DistributedSampler

from odm_sr.evaluation import owned_weights, update_metrics
from odm_sr.lit_module import SRLitModule
from odm_sr.metrics import SRMetrics, evaluate_pair, to_uint8
from odm_sr.models import build_model
from odm_sr.quant.base import FullPrecision

WORLD = 2
N_IMAGES = 5  # 5 over 2 ranks: rank 0 gets 0, 2, 4 and rank 1 gets 1, 3 and 0 again (the padding)


def _items() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [{"lr": torch.rand(3, 12, 12, generator=gen), "hr": torch.rand(3, 24, 24, generator=gen),
             "name": f"im{i}", "index": i} for i in range(N_IMAGES)]


def _module() -> SRLitModule:
    torch.manual_seed(0)
    lit = SRLitModule(build_model("edsr", 2, n_resblocks=1, n_feats=8, res_scale=1.0), FullPrecision(), {})
    lit.set_names = {"val": [], "test": ["SetA"]}
    return lit.eval()


def _test_epoch(lit: SRLitModule, loader) -> dict[str, float]:
    """What ``trainer.test`` does with the module's hooks (no Trainer: ``log_dict`` only warns)."""
    lit.on_test_epoch_start()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            lit.test_step(batch, i)
    lit.last_metrics = {}
    lit.on_test_epoch_end()
    return dict(lit.last_metrics)


def _ranked(rank: int) -> dict[str, torch.Tensor]:
    sampler = DistributedSampler(_items(), num_replicas=WORLD, rank=rank, shuffle=False)
    loader = DataLoader(_items(), batch_size=1, sampler=sampler)
    got = _test_epoch(_module(), loader)
    # the same shards without the indices: the padding image counted twice (what the weights prevent)
    naive = SRMetrics(2)
    lit = _module()
    with torch.no_grad():
        for batch in loader:
            update_metrics(naive, lit.upscale(batch["lr"]), batch["hr"])
    return {"seen": torch.tensor([int(b["index"]) for b in loader]),
            "weights": owned_weights(torch.tensor([int(b["index"]) for b in loader]), len(loader)),
            "psnr": torch.tensor(got["test/SetA/psnr"], dtype=torch.float64),
            "ssim": torch.tensor(got["test/SetA/ssim"], dtype=torch.float64),
            "naive": naive.compute()}


def test_two_ranks_with_a_padded_sampler_give_the_one_process_metrics(tmp_path):
    lit = _module()
    one = _test_epoch(lit, DataLoader(_items(), batch_size=1))
    # independent reference: the mean of evaluate_pair over the five images
    with torch.no_grad():
        pairs = [evaluate_pair(to_uint8(lit.upscale(it["lr"][None])[0], 1.0), to_uint8(it["hr"], 1.0), 2)
                 for it in _items()]
    assert one["test/SetA/psnr"] == torch.tensor([p for p, _ in pairs], dtype=torch.float64).mean().item()
    assert abs(one["test/SetA/ssim"] - sum(s for _, s in pairs) / N_IMAGES) < 1e-12

    ranks = run_on_ranks(_ranked, WORLD, tmp_path)
    assert ranks[0]["seen"].tolist() == [0, 2, 4] and ranks[1]["seen"].tolist() == [1, 3, 0]
    assert ranks[0]["weights"].tolist() == [1, 1, 1] and ranks[1]["weights"].tolist() == [1, 1, 0]
    for got in ranks:
        assert abs(float(got["psnr"]) - one["test/SetA/psnr"]) < 1e-12
        assert abs(float(got["ssim"]) - one["test/SetA/ssim"]) < 1e-12
        # without the weights image 0 would count twice: 6 images, another mean
        assert got["naive"][2] == 6 and abs(float(got["naive"][0]) - one["test/SetA/psnr"]) > 1e-6


def test_one_process_counts_every_image():
    assert owned_weights([3, 4, 0], 3).tolist() == [1, 1, 1]
    assert owned_weights(None, 2).tolist() == [1, 1]
