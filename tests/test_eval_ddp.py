"""Evaluation under DDP (gloo, 2 CPU processes): the per-set means are over every image of the set, once.

DDP's distributed sampler splits a set between the ranks and pads the shorter shard with a repeated image; the
metrics must be the single-process ones all the same.
"""

from __future__ import annotations

import torch
from helpers import run_on_ranks

from odm_sr.evaluation import accumulate, merge_across_ranks
from odm_sr.metrics import MetricAccumulator, evaluate_pair, to_uint8

# Set5 split over 2 ranks as DistributedSampler(shuffle=False) does: indices 0,2,4 | 1,3,0 (0 is the padding)
IMAGES = {"baby": (34.0, 0.91), "bird": (35.0, 0.95), "butterfly": (28.0, 0.90), "head": (33.0, 0.80),
          "woman": (30.0, 0.92)}
SHARDS = (["baby", "butterfly", "woman"], ["bird", "head", "baby"])


def _merged(rank: int) -> dict[str, torch.Tensor]:
    acc = MetricAccumulator("Set5")
    for name in SHARDS[rank]:
        acc.update(*IMAGES[name], image_name=name)
    acc.update(20.0 + rank, 0.5, image_name="")  # unnamed images are all kept
    merged = merge_across_ranks(acc)
    return {"count": torch.tensor(merged.count), "psnr": torch.tensor(merged.psnr, dtype=torch.float64),
            "ssim": torch.tensor(merged.ssim, dtype=torch.float64)}


def test_ranks_report_the_mean_over_the_whole_set(tmp_path):
    ranks = run_on_ranks(_merged, 2, tmp_path)
    psnr = (34 + 35 + 28 + 33 + 30 + 20 + 21) / 7
    ssim = (0.91 + 0.95 + 0.90 + 0.80 + 0.92 + 0.5 + 0.5) / 7
    for got in ranks:
        assert int(got["count"]) == 7
        assert abs(float(got["psnr"]) - psnr) < 1e-12 and abs(float(got["ssim"]) - ssim) < 1e-12
    # a rank alone (no process group) keeps its shard: the mean a per-rank log would have shown
    acc = MetricAccumulator("Set5")
    for name in SHARDS[0]:
        acc.update(*IMAGES[name], image_name=name)
    assert merge_across_ranks(acc) is acc and acc.psnr == (34 + 28 + 30) / 3


def test_accumulate_records_the_image_names():
    gen = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 40, 40, generator=gen)
    sr = (hr + 0.05 * torch.randn(hr.shape, generator=gen)).clamp(0, 1)
    acc = MetricAccumulator()
    accumulate(acc, sr, hr, scale=2, names=["a", "b"])
    accumulate(acc, sr[:1], hr[:1], scale=2)
    assert [r[0] for r in acc.per_image] == ["a", "b", ""]
    want = evaluate_pair(to_uint8(sr[1], 1.0), to_uint8(hr[1], 1.0), 2)
    assert acc.per_image[1][1:] == want and acc.per_image[2][1:] == acc.per_image[0][1:]
