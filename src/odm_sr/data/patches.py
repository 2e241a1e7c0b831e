"""Training patches: mod-crop, aligned random LR/HR crops, dihedral augmentation, epoch sampling.

METHODS.md §1.2: ``data.lr_patch`` is the LR side (HR side = lr_patch * scale); LR and HR crops are
aligned (HR crop = the LR crop's footprint); independent p = 0.5 horizontal flip, vertical flip and
transpose; 1 epoch = ``iters_per_epoch`` optimizer steps (default 1000) whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from odm_sr.data.io import to_tensor

__all__ = [
    "mod_crop",
    "check_pair_sizes",
    "random_aligned_crop",
    "dihedral_augment",
    "to_rgb",
    "EpochSampler",
    "PatchDataset",
]


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Top-left crop of an (H, W, C) image to H // scale * scale x W // scale * scale."""
    h, w = img.shape[0] // scale * scale, img.shape[1] // scale * scale
    return img[:h, :w]


def check_pair_sizes(
    lr_hw: tuple[int, int], hr_hw: tuple[int, int], scale: int, lr_file: object, hr_file: object
) -> None:
    """Raise ValueError unless the LR size is floor(HR size / scale) (so HR covers scale * LR)."""
    expected = (hr_hw[0] // scale, hr_hw[1] // scale)
    if tuple(lr_hw) != expected:
        raise ValueError(
            f"LR/HR size mismatch at x{scale}: LR {lr_file} is {lr_hw[0]}x{lr_hw[1]} (HxW), HR {hr_file} is "
            f"{hr_hw[0]}x{hr_hw[1]}; expected LR {expected[0]}x{expected[1]} = floor(HR / {scale})"
        )


def random_aligned_crop(
    lr: np.ndarray, hr: np.ndarray, lr_patch: int, scale: int, generator: torch.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A random LR crop of side ``lr_patch`` at (y, x) and the HR crop at (scale*y, scale*x) of side
    scale*lr_patch. ``hr`` must be mod-cropped to scale * LR size. Arrays are (H, W, C).
    """
    h, w = lr.shape[:2]
    if h < lr_patch or w < lr_patch:
        raise ValueError(f"LR image {h}x{w} is smaller than the {lr_patch}x{lr_patch} patch")
    y = int(torch.randint(0, h - lr_patch + 1, (1,), generator=generator))
    x = int(torch.randint(0, w - lr_patch + 1, (1,), generator=generator))
    hp = lr_patch * scale
    return lr[y : y + lr_patch, x : x + lr_patch], hr[y * scale : y * scale + hp, x * scale : x * scale + hp]


def dihedral_augment(
    lr: Tensor, hr: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """The same random horizontal flip, vertical flip and H/W transpose (each p = 0.5) on both (C, H, W)."""
    hflip, vflip, transpose = (torch.rand(3, generator=generator) < 0.5).tolist()
    if hflip:
        lr, hr = lr.flip(-1), hr.flip(-1)
    if vflip:
        lr, hr = lr.flip(-2), hr.flip(-2)
    if transpose:
        lr, hr = lr.transpose(-1, -2), hr.transpose(-1, -2)
    return lr.contiguous(), hr.contiguous()


def to_rgb(img: np.ndarray) -> np.ndarray:
    """Replicate a one-channel (H, W, 1) image to (H, W, 3); RGB passes through."""
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


class PairSource(Protocol):
    """What ``PatchDataset`` needs from an image data set (see ``odm_sr.data.datasets``)."""

    names: list[str]

    def __len__(self) -> int: ...

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]: ...

    def lr_size(self, index: int) -> tuple[int, int]: ...

    def describe(self, index: int) -> str: ...


class EpochSampler(DistributedSampler):
    """Draws ``num_samples`` image indices uniformly at random (with replacement) from ``range(num_images)``.

    With ``num_samples = iters_per_epoch * batch_size`` one pass is one "epoch" of ``iters_per_epoch``
    batches, whatever the data set size. Each new iteration draws fresh indices; with a ``seed`` the
    sequence is reproducible (the i-th epoch uses seed + i, or seed + the epoch given to ``set_epoch``).

    Under DDP (``num_replicas`` ranks; by default read from the initialised process group) every rank draws the
    same ``num_samples * num_replicas`` indices and takes every ``num_replicas``-th from position ``rank``, so one
    epoch is still ``iters_per_epoch`` optimizer steps per rank, at a global batch of ranks x batch_size. It is
    a ``DistributedSampler`` so that Lightning keeps it instead of wrapping it in its own (which would split the
    epoch between the ranks and lose the mid-epoch resume); one rank gives exactly the single-process sequence.
    """

    def __init__(self, num_images: int, num_samples: int, seed: int | None = None,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        if num_images <= 0 or num_samples <= 0:
            raise ValueError(f"num_images and num_samples must be positive, got {num_images}, {num_samples}")
        dist = torch.distributed
        grouped = dist.is_available() and dist.is_initialized()
        num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if grouped else 1)
        rank = rank if rank is not None else (dist.get_rank() if grouped else 0)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank}: expected 0 <= rank < num_replicas={num_replicas}")
        # DistributedSampler.__init__ is not called: it wants a dataset and shards it without replacement
        self.num_images, self.num_samples, self.seed = num_images, num_samples, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.skip = 0  # samples to leave out at the start of the next pass (mid-epoch resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = None
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.num_samples * self.num_replicas
        first_sample = self.epoch * total
        self.epoch += 1
        skip, self.skip = self.skip, 0
        images = torch.randint(0, self.num_images, (total,), generator=generator).tolist()
        # index = image + num_images * sample id: PatchDataset seeds the crop and flips of each sample from its
        # id, so an epoch's patches do not depend on workers or on what ran before (exact resume).
        for local in range(skip, self.num_samples):
            position = self.rank + local * self.num_replicas
            yield images[position] + self.num_images * (first_sample + position)


class PatchDataset(Dataset):
    """Random aligned LR/HR training patches from a whole-image data set.

    ``len(self) = iters_per_epoch * batch_size``; index i reads image ``i % num_images`` (use
    ``EpochSampler`` to pick images uniformly at random; it encodes a sample id as ``index // num_images``).
    With a ``seed``, the crop position and augmentation of each sample come from a generator seeded by
    (seed, sample id), so training data are reproducible across workers and resumes; without one they use
    torch's global RNG. Grayscale images are replicated to RGB. Items are
    ``{"lr": float (3, p, p) in [0, 1], "hr": float (3, s*p, s*p), "name": str}``.
    """

    def __init__(
        self,
        source: PairSource,
        scale: int,
        lr_patch: int,
        iters_per_epoch: int = 1000,
        batch_size: int = 16,
        augment: bool = True,
        seed: int | None = None,
    ) -> None:
        if len(source) == 0:
            raise ValueError("PatchDataset needs at least one image")
        self.source, self.scale, self.lr_patch, self.augment = source, scale, lr_patch, augment
        self.iters_per_epoch, self.batch_size, self.seed = iters_per_epoch, batch_size, seed
        for i in range(len(source)):
            h, w = source.lr_size(i)
            if h < lr_patch or w < lr_patch:
                raise ValueError(
                    f"{source.describe(i)}: LR size {h}x{w} at x{scale} is smaller than lr_patch={lr_patch} "
                    f"(needs an HR of at least {lr_patch * scale}x{lr_patch * scale})"
                )

    @property
    def num_images(self) -> int:
        return len(self.source)

    def __len__(self) -> int:
        return self.iters_per_epoch * self.batch_size

    def __getitem__(self, index: int) -> dict:
        i, sample_id = index % self.num_images, index // self.num_images
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + sample_id) if self.seed is not None else None
        lr, hr = self.source.load_pair(i)
        lr, hr = random_aligned_crop(lr, hr, self.lr_patch, self.scale, generator)
        lr_t, hr_t = to_tensor(to_rgb(lr)), to_tensor(to_rgb(hr))
        if self.augment:
            lr_t, hr_t = dihedral_augment(lr_t, hr_t, generator)
        return {"lr": lr_t, "hr": hr_t, "name": self.source.names[i]}
