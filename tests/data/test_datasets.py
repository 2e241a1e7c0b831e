"""Data sets on tiny fake folders: layouts, mod-crop, grayscale, patch alignment, augmentation, errors."""

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from odm_sr.data.datasets import HRFolderDataset, PairedFolderDataset, bicubic_downscale
from odm_sr.data.patches import EpochSampler, PatchDataset, dihedral_augment, mod_crop
from odm_sr.data.registry import DATA_ENV_VAR, SAMPLE_TEST, build_dataset, default_data_root


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr).save(path)


def _rand(h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _kron_pair(h, w, scale, c=3, seed=0):
    """An LR and the HR made by repeating each LR pixel scale x scale: crops align iff HR == kron(LR)."""
    lr = _rand(h, w, c, seed)
    return lr, np.repeat(np.repeat(lr, scale, axis=0), scale, axis=1)


def _kron_t(lr: torch.Tensor, scale: int) -> torch.Tensor:
    return lr.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


@pytest.fixture
def bench_dir(tmp_path):
    """EDSR benchmark layout: HR/<name>.png, LR_bicubic/X2/<name>x2.png; HR sides not multiples of 2."""
    root = tmp_path / "Tiny"
    for i, (h, w, c) in enumerate([(27, 31, 3), (24, 30, 1)]):
        hr = _rand(h, w, c, seed=i)
        _save(root / "HR" / f"img_{i:03d}.png", hr)
        _save(root / "LR_bicubic" / "X2" / f"img_{i:03d}x2.png", bicubic_downscale(hr, 2))
    return root


def test_paired_benchmark_layout_mod_crop_and_grayscale(bench_dir):
    ds = PairedFolderDataset(bench_dir / "HR", bench_dir / "LR_bicubic" / "X2", scale=2)
    assert ds.names == ["img_000", "img_001"]
    rgb, gray = ds[0], ds[1]
    assert rgb["lr"].shape == (3, 13, 15) and rgb["hr"].shape == (3, 26, 30)  # HR top-left 2h x 2w
    assert rgb["hr_channels"] == 3 and rgb["lr"].dtype == torch.float32
    assert gray["hr"].shape == (1, 24, 30) and gray["hr_channels"] == 1
    assert gray["lr"].shape == (3, 12, 15)
    torch.testing.assert_close(gray["lr"][0], gray["lr"][1])


def test_div2k_layout_with_index_range(tmp_path):
    d = tmp_path / "DIV2K"
    for i in (1, 2, 801):
        hr = _rand(12, 16, seed=i)
        _save(d / "DIV2K_train_HR" / f"{i:04d}.png", hr)
        _save(d / "DIV2K_train_LR_bicubic" / "X4" / f"{i:04d}x4.png", bicubic_downscale(hr, 4))
    train = build_dataset("DIV2K", "test", 4, tmp_path, index_range=(1, 800))
    val = build_dataset("div2k", "val", 4, tmp_path)
    assert train.names == ["0001", "0002"] and val.names == ["0801"]
    assert build_dataset("div2k_val", "test", 4, tmp_path).names == ["0801"]


def test_size_mismatch_names_both_files(tmp_path):
    _save(tmp_path / "HR" / "a.png", _rand(20, 20))
    _save(tmp_path / "LR" / "ax2.png", _rand(9, 10))
    with pytest.raises(ValueError, match=r"ax2\.png.*9x10.*a\.png.*20x20"):
        PairedFolderDataset(tmp_path / "HR", tmp_path / "LR", scale=2)


def test_missing_or_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*Expected layout"):
        PairedFolderDataset(tmp_path / "nowhere", tmp_path / "LR", scale=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images.*empty"):
        HRFolderDataset(tmp_path / "empty", scale=2)
    _save(tmp_path / "HR" / "a.png", _rand(8, 8))
    with pytest.raises(FileNotFoundError, match=r"ax2\.png"):
        PairedFolderDataset(tmp_path / "HR", tmp_path / "HR", scale=2)
    with pytest.raises(FileNotFoundError, match="data root|T91"):
        build_dataset("sr291", "train", 2, tmp_path)


def test_hr_folder_recursive_lr_is_cached_bicubic(tmp_path):
    hr = _rand(25, 22)
    _save(tmp_path / "sub" / "b.jpg", _rand(16, 16, seed=3))
    _save(tmp_path / "a.bmp", hr)
    (tmp_path / "notes.txt").write_text("ignored")
    ds = HRFolderDataset(tmp_path, scale=3)
    assert ds.names == ["a", "sub/b"]
    lr, hr_out = ds.load_pair(0)
    np.testing.assert_array_equal(hr_out, mod_crop(hr, 3))
    np.testing.assert_array_equal(lr, bicubic_downscale(hr, 3))
    assert ds.load_pair(0)[0] is lr  # computed once, then cached
    assert ds[0]["lr"].shape == (3, 8, 7)


def test_patch_crops_are_aligned_and_augmented_identically(tmp_path):
    lr, hr = _kron_pair(20, 17, 3)
    _save(tmp_path / "HR" / "k.png", hr)
    _save(tmp_path / "LR" / "kx3.png", lr)
    source = PairedFolderDataset(tmp_path / "HR", tmp_path / "LR", scale=3, preload=True)
    ds = PatchDataset(source, scale=3, lr_patch=6, iters_per_epoch=5, batch_size=4, augment=True)
    assert len(ds) == 20
    torch.manual_seed(0)
    for i in range(len(ds)):
        item = ds[i]
        assert item["lr"].shape == (3, 6, 6) and item["hr"].shape == (3, 18, 18)
        torch.testing.assert_close(item["hr"], _kron_t(item["lr"], 3), rtol=0, atol=0)


def test_dihedral_augment_uses_all_eight_transforms():
    lr = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3)
    hr = _kron_t(lr, 2)
    torch.manual_seed(0)
    seen = set()
    for _ in range(200):
        a, b = dihedral_augment(lr, hr)
        torch.testing.assert_close(b, _kron_t(a, 2), rtol=0, atol=0)
        seen.add(tuple(a.flatten().tolist()))
    assert len(seen) == 8


def test_lr_patch_matches_bicubic_of_hr_patch_interior(tmp_path):
    hr = _rand(60, 48, seed=5)
    hr = np.asarray(Image.fromarray(hr).filter(ImageFilter.SMOOTH))
    _save(tmp_path / "a.png", hr)
    ds = PatchDataset(
        HRFolderDataset(tmp_path, 2, preload=True),
        2,
        lr_patch=14,
        iters_per_epoch=3,
        batch_size=2,
        augment=False,
    )
    torch.manual_seed(1)
    for i in range(len(ds)):
        item = ds[i]
        hr_patch = (item["hr"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        expected = bicubic_downscale(hr_patch, 2)
        got = (item["lr"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        # the x2 kernel reaches 2 LR pixels: away from the patch edge both are the same computation
        np.testing.assert_array_equal(got[3:-3, 3:-3], expected[3:-3, 3:-3])


def test_patch_larger_than_image_names_the_file(tmp_path):
    _save(tmp_path / "small.png", _rand(30, 40))
    with pytest.raises(ValueError, match=r"small\.png.*lr_patch=16"):
        PatchDataset(HRFolderDataset(tmp_path, 2), 2, lr_patch=16)


def test_epoch_sampler_uniform_and_reproducible():
    sampler = EpochSampler(num_images=5, num_samples=4000, seed=3)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(sampler) == 4000
    images = [i % 5 for i in first]
    assert images != [i % 5 for i in second]
    counts = Counter(images)
    assert set(counts) == set(range(5)) and min(counts.values()) > 700
    # every sample of every epoch gets its own id (index // num_images), which seeds its crop and flips
    assert [i // 5 for i in first] == list(range(4000)) and [i // 5 for i in second] == list(range(4000, 8000))
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_epoch_sampler_ranks_split_one_draw():
    """Under DDP each rank takes every 2nd sample of the draw a single process makes for both ranks' samples."""
    ranks = [EpochSampler(num_images=7, num_samples=6, seed=3, num_replicas=2, rank=r) for r in range(2)]
    both = EpochSampler(num_images=7, num_samples=12, seed=3)
    for _ in range(2):  # two epochs
        per_rank = [list(s) for s in ranks]
        whole = list(both)
        assert len(per_rank[0]) == len(ranks[0]) == 6  # an epoch is num_samples per rank
        assert per_rank[0] == whole[0::2] and per_rank[1] == whole[1::2]
    # a resumed rank skips the samples it already served, and only those
    ranks[1].set_epoch(1)
    ranks[1].skip = 4
    assert list(ranks[1]) == whole[1::2][4:]
    with pytest.raises(ValueError, match="rank=2"):
        EpochSampler(num_images=7, num_samples=6, num_replicas=2, rank=2)


def _default_rank_sampler(rank: int) -> list[int]:
    return list(EpochSampler(num_images=7, num_samples=6, seed=3))  # rank and world from the process group


def test_epoch_sampler_reads_rank_and_world_from_the_process_group(tmp_path):
    from helpers import run_on_ranks

    got = run_on_ranks(_default_rank_sampler, 2, tmp_path)
    assert got == [list(EpochSampler(num_images=7, num_samples=6, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert list(EpochSampler(num_images=7, num_samples=6, seed=3)) != got[0]  # no process group: one rank


def test_seeded_patches_depend_only_on_the_sample_id():
    train = build_dataset("sample", "train", scale=4, lr_patch=12, iters_per_epoch=2, batch_size=3, seed=7)
    a, b = train[3 + 8 * 11], train[3 + 8 * 11]
    assert torch.equal(a["lr"], b["lr"]) and torch.equal(a["hr"], b["hr"])
    assert not torch.equal(train[3 + 8 * 12]["lr"], a["lr"])  # same image, another sample: another patch


def test_sample_set_split_and_training_items():
    test_set = build_dataset("sample", "test", scale=4)
    assert test_set.names == [n.rsplit(".", 1)[0] for n in SAMPLE_TEST]
    assert build_dataset("sample_test", "val", scale=4).names == test_set.names
    train = build_dataset("sample", "train", scale=4, lr_patch=12, iters_per_epoch=2, batch_size=3)
    assert len(train) == 6 and not set(train.source.names) & set(test_set.names)
    item = train[5]
    assert item["lr"].shape == (3, 12, 12) and item["hr"].shape == (3, 48, 48)


def test_registry_errors_and_default_root(monkeypatch, tmp_path):
    with pytest.raises(KeyError, match="unknown data set"):
        build_dataset("Set6", "test", 2, tmp_path)
    with pytest.raises(ValueError, match="training set"):
        build_dataset("sr291", "val", 2, tmp_path)
    with pytest.raises(ValueError, match="evaluation"):
        build_dataset("Set5", "train", 2, tmp_path)
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    assert default_data_root() == tmp_path


def test_any_format_pillow_reads_is_a_data_image(tmp_path):
    """WebP (lossless) HR/LR pairs and a TIFF HR folder load like PNGs; a stray .h5 or .txt is not an image."""
    hr, lr = _rand(24, 20), _rand(12, 10, seed=1)
    (tmp_path / "HR").mkdir()
    (tmp_path / "LR").mkdir()
    Image.fromarray(hr).save(tmp_path / "HR" / "a.webp", lossless=True)
    Image.fromarray(lr).save(tmp_path / "LR" / "ax2.webp", lossless=True)
    (tmp_path / "HR" / "notes.txt").write_text("not an image")
    (tmp_path / "HR" / "features.h5").write_bytes(b"\x89HDF")
    pair = PairedFolderDataset(tmp_path / "HR", tmp_path / "LR", scale=2)
    assert pair.names == ["a"]
    item = pair[0]
    assert torch.equal((item["hr"] * 255).round().byte(), torch.from_numpy(hr).permute(2, 0, 1))
    assert torch.equal((item["lr"] * 255).round().byte(), torch.from_numpy(lr).permute(2, 0, 1))
    (tmp_path / "tiff").mkdir()
    Image.fromarray(hr).save(tmp_path / "tiff" / "b.tiff")
    assert HRFolderDataset(tmp_path / "tiff", scale=2).names == ["b"]
