"""``SRDataModule``: one training set of random patches, and whole-image val/test sets (batch size 1)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from odm_sr.data.patches import EpochSampler, PatchDataset
from odm_sr.data.registry import build_dataset
from odm_sr.metrics import check_eval_size

__all__ = ["ResumableLoader", "SRDataModule"]


class ResumableLoader(DataLoader):
    """Training loader that resumes mid-epoch: its state (saved in Lightning checkpoints, which call
    ``state_dict``/``load_state_dict`` on loaders that have them) is the number of batches served in the
    current epoch; after a restore the first epoch skips those batches' samples without loading them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._skip = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        if skip >= len(self):  # saved at the end of an epoch: the next one starts from its beginning
            skip = 0
        if isinstance(self.sampler, EpochSampler):
            self.sampler.skip = skip * self.batch_size
        else:
            skip = 0
        self._served = skip
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"batches_served": self._served}

    def load_state_dict(self, state: dict) -> None:
        self._skip = int(state.get("batches_served", 0))


class SRDataModule(L.LightningDataModule):
    """Data for one scale.

    * ``train``: a name for ``build_dataset`` (e.g. ``"div2k"``, ``"sr291"``, ``"sample"``); batches of
      ``batch_size`` aligned patches (LR side ``lr_patch``), ``iters_per_epoch`` batches per epoch, images
      drawn uniformly at random by ``EpochSampler`` (seeded by ``seed``).
    * ``val`` / ``test``: lists of set names; one DataLoader per set, in list order, batch size 1.
      ``val_set_names`` / ``test_set_names`` give the set name for each ``dataloader_idx``;
      ``set_names`` is the list behind the evaluation loaders returned last (test names until
      ``val_dataloader`` is called).
    * ``train=None``: no training set (evaluation only).
    """

    def __init__(
        self,
        train: str | None = "sample",
        val: list[str] | tuple[str, ...] = ("sample_test",),
        test: list[str] | tuple[str, ...] = ("Set5",),
        scale: int = 4,
        lr_patch: int = 48,
        batch_size: int = 16,
        iters_per_epoch: int = 1000,
        num_workers: int = 0,
        data_root: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_name = train
        self.val_set_names = list(val)
        self.test_set_names = list(test)
        self.set_names: list[str] = self.test_set_names
        self.scale, self.lr_patch, self.batch_size = scale, lr_patch, batch_size
        self.iters_per_epoch, self.num_workers = iters_per_epoch, num_workers
        self.data_root, self.seed = data_root, seed
        self.train_set: PatchDataset | None = None
        self.val_sets: list[Dataset] | None = None
        self.test_sets: list[Dataset] | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None and self.train_name is not None:
            self.train_set = build_dataset(
                self.train_name,
                "train",
                self.scale,
                self.data_root,
                lr_patch=self.lr_patch,
                iters_per_epoch=self.iters_per_epoch,
                batch_size=self.batch_size,
                seed=self.seed,
            )
        if stage in (None, "fit", "validate") and self.val_sets is None:
            self.val_sets = [build_dataset(n, "val", self.scale, self.data_root) for n in self.val_set_names]
        if stage in (None, "test") and self.test_sets is None:
            self.test_sets = [
                build_dataset(n, "test", self.scale, self.data_root) for n in self.test_set_names
            ]

    def check_eval_sets(self) -> None:
        """Open every validation and test image now (decode it, check the LR/HR pairing and sizes, and that it is
        large enough for PSNR/SSIM): a truncated, mismatched or too small file fails before training starts,
        naming itself, instead of at the first validation or after training. Each set is read once (a set used
        for both validation and test too)."""
        self.setup("validate")
        self.setup("test")
        checked = set()
        named = [*zip(self.val_set_names, self.val_sets, strict=True),
                 *zip(self.test_set_names, self.test_sets, strict=True)]
        for name, dataset in named:
            if name not in checked:
                checked.add(name)
                for index in range(len(dataset)):
                    _, hr = dataset.load_pair(index)
                    check_eval_size(hr.shape[:2], self.scale, dataset.describe(index))

    def _loader_kwargs(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        if self.train_set is None:
            raise ValueError("SRDataModule(train=None) has no training set")
        sampler = EpochSampler(self.train_set.num_images, len(self.train_set), seed=self.seed)
        return ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed),
            **self._loader_kwargs(),
        )

    def _eval_loaders(self, sets: list[Dataset]) -> list[DataLoader]:
        return [DataLoader(ds, batch_size=1, shuffle=False, **self._loader_kwargs()) for ds in sets]

    def val_dataloader(self) -> list[DataLoader]:
        if self.val_sets is None:
            self.setup("validate")
        self.set_names = self.val_set_names
        return self._eval_loaders(self.val_sets)

    def test_dataloader(self) -> list[DataLoader]:
        if self.test_sets is None:
            self.setup("test")
        self.set_names = self.test_set_names
        return self._eval_loaders(self.test_sets)
