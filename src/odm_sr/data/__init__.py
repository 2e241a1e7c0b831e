"""Data: MATLAB bicubic resize, image I/O, SR data sets, patch sampling and the Lightning data module.

``SRDataModule`` is imported lazily (``odm_sr.data.SRDataModule`` or ``odm_sr.data.datamodule``) so that
``import odm_sr.data`` does not pull in Lightning.
"""

from odm_sr.data.datasets import (
    HRFolderDataset,
    PairedFolderDataset,
    SRImageDataset,
    bicubic_downscale,
    list_images,
)
from odm_sr.data.imresize import imresize
from odm_sr.data.io import ImageReadError, read_image, save_image, to_tensor
from odm_sr.data.patches import EpochSampler, PatchDataset, dihedral_augment, mod_crop, random_aligned_crop
from odm_sr.data.registry import (
    DATASET_NAMES,
    SAMPLE_TEST,
    SAMPLE_TRAIN,
    build_dataset,
    build_source,
    default_data_root,
)

__all__ = [
    "DATASET_NAMES",
    "SAMPLE_TEST",
    "SAMPLE_TRAIN",
    "EpochSampler",
    "HRFolderDataset",
    "ImageReadError",
    "PairedFolderDataset",
    "PatchDataset",
    "SRDataModule",
    "SRImageDataset",
    "bicubic_downscale",
    "build_dataset",
    "build_source",
    "default_data_root",
    "dihedral_augment",
    "imresize",
    "list_images",
    "mod_crop",
    "random_aligned_crop",
    "read_image",
    "save_image",
    "to_tensor",
]


def __getattr__(name: str):
    if name == "SRDataModule":
        from odm_sr.data.datamodule import SRDataModule

        return SRDataModule
    raise AttributeError(f"module 'odm_sr.data' has no attribute {name!r}")
