"""Named data sets: ``build_dataset(name, split, scale, data_root)`` and where the data live.

| name | splits | source (under ``data_root``) |
|---|---|---|
| ``sample`` | train, val/test | photographs shipped inside scikit-image's wheel (no download), see below |
| ``sample_test`` | val/test | the held-out part of ``sample`` (same as ``sample`` with split val/test) |
| ``sr291`` | train | ``train/T91/HR`` + ``train/BSD200/HR`` (HR only; LR by MATLAB bicubic) |
| ``div2k_val`` | val/test | DIV2K 0801-0810 (same as ``div2k`` with split val/test) |
| ``div2k`` | train (0001-0800), val/test (0801-0810) | ``DIV2K/DIV2K_train_HR`` +
  ``DIV2K/DIV2K_train_LR_bicubic/X{s}`` (also ``DIV2K_valid_HR``/``DIV2K_valid_LR_bicubic`` if present) |
| ``Set5``, ``Set14``, ``B100``, ``Urban100`` | val/test | ``benchmark/<name>/HR`` + ``LR_bicubic/X{s}`` |

Names are case-insensitive. A ``train`` split returns a ``PatchDataset`` (random patches, length
``iters_per_epoch * batch_size``, images preloaded as uint8); ``val``/``test`` return whole images.

**The sample set.** Real photographs that are files inside the installed ``skimage/data/`` folder (never
fetched with pooch): train on ``SAMPLE_TRAIN`` (8 images: astronaut, coffee, motorcycle_left,
hubble_deep_field, ihc in RGB; camera, coins, moon in grayscale), hold out ``SAMPLE_TEST`` (chelsea, the
cat, and rocket, both RGB; 451x300 and 640x427). motorcycle_right is left out because it is a near-copy
of motorcycle_left; synthetic images (chessboard, phantom, color, logo, horse), scans (page, text) and
the large retina/cell images are left out.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from torch.utils.data import Dataset

from odm_sr.data.datasets import HRFolderDataset, PairedFolderDataset, SRImageDataset
from odm_sr.data.patches import PatchDataset

__all__ = [
    "DATA_ENV_VAR",
    "SAMPLE_TRAIN",
    "SAMPLE_TEST",
    "BENCHMARK_SETS",
    "DATASET_NAMES",
    "default_data_root",
    "skimage_data_dir",
    "build_source",
    "build_dataset",
]

DATA_ENV_VAR = "ODM_SR_DATA"
SAMPLE_TRAIN = (
    "astronaut.png",
    "coffee.png",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "camera.png",
    "coins.png",
    "moon.png",
)
SAMPLE_TEST = ("chelsea.png", "rocket.jpg")
BENCHMARK_SETS = ("Set5", "Set14", "B100", "Urban100")
DIV2K_TRAIN_RANGE = (1, 800)
DIV2K_VAL_RANGE = (801, 810)
DATASET_NAMES = ("sample", "sample_test", "sr291", "div2k", "div2k_val", *BENCHMARK_SETS)
EVAL_SPLITS = ("val", "test")


def default_data_root() -> Path | None:
    """``$ODM_SR_DATA`` if set; else ``<repo root>/../shared/data`` if that folder exists; else None.

    The repo root is found from this file (``src/odm_sr/data/registry.py`` -> three levels up), so it
    works for an editable install run from anywhere.
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    candidate = Path(__file__).resolve().parents[3].parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def skimage_data_dir() -> Path:
    """The ``data/`` folder inside the installed scikit-image package (located without importing it)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("scikit-image is not installed; the 'sample' set needs its bundled images")
    return Path(spec.origin).parent / "data"


def _sample_files(names: tuple[str, ...]) -> list[Path]:
    folder = skimage_data_dir()
    files = [folder / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"sample images missing from the scikit-image wheel: {missing}")
    return files


def _resolve_root(data_root: str | Path | None) -> Path:
    root = Path(data_root) if data_root is not None else default_data_root()
    if root is None:
        raise FileNotFoundError(
            f"no data root: pass data_root, set ${DATA_ENV_VAR}, or place the data at <repo>/../shared/data "
            "(layout: benchmark/<Set>/HR, benchmark/<Set>/LR_bicubic/X<s>, train/T91/HR, train/BSD200/HR, "
            "DIV2K/)"
        )
    return root


def _canonical(name: str) -> str:
    for known in DATASET_NAMES:
        if known.lower() == name.lower():
            return known
    raise KeyError(f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}")


def build_source(
    name: str,
    split: str,
    scale: int,
    data_root: str | Path | None = None,
    index_range: tuple[int, int] | None = None,
    preload: bool = False,
) -> SRImageDataset:
    """The whole-image data set behind ``name``/``split`` (see the module table). A ``name`` that is a path
    (contains a path separator) is a folder of HR images, whose LR is made on the fly."""
    if "/" in name or "\\" in name:
        return HRFolderDataset(Path(name).expanduser(), scale, preload=preload)
    name = _canonical(name)
    if split not in ("train", *EVAL_SPLITS):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    train = split == "train"
    if name in ("sample", "sample_test"):
        if name == "sample_test" and train:
            raise ValueError("'sample_test' is the held-out part of 'sample'; train with ('sample', 'train')")
        return HRFolderDataset(_sample_files(SAMPLE_TRAIN if train else SAMPLE_TEST), scale, preload=preload)
    root = _resolve_root(data_root)
    if name == "sr291":
        if not train:
            raise ValueError("'sr291' is a training set; evaluate on Set5/Set14/B100/Urban100 or div2k")
        return HRFolderDataset(
            [root / "train" / "T91" / "HR", root / "train" / "BSD200" / "HR"], scale, preload=preload
        )
    if name in ("div2k", "div2k_val"):
        if name == "div2k_val" and train:
            raise ValueError("'div2k_val' is DIV2K 801-810 for validation; train with 'div2k'")
        d = root / "DIV2K"
        rng = index_range or (DIV2K_TRAIN_RANGE if train else DIV2K_VAL_RANGE)
        return PairedFolderDataset(
            [d / "DIV2K_train_HR", d / "DIV2K_valid_HR"],
            [d / "DIV2K_train_LR_bicubic" / f"X{scale}", d / "DIV2K_valid_LR_bicubic" / f"X{scale}"],
            scale,
            index_range=rng,
            preload=preload,
        )
    if train:
        raise ValueError(f"{name!r} is a benchmark (evaluation) set; use split 'val' or 'test'")
    bench = root / "benchmark" / name
    return PairedFolderDataset(
        bench / "HR", bench / "LR_bicubic" / f"X{scale}", scale, index_range=index_range, preload=preload
    )


def build_dataset(
    name: str,
    split: str,
    scale: int,
    data_root: str | Path | None = None,
    *,
    lr_patch: int = 48,
    iters_per_epoch: int = 1000,
    batch_size: int = 16,
    augment: bool = True,
    index_range: tuple[int, int] | None = None,
    seed: int | None = None,
) -> Dataset:
    """A training ``PatchDataset`` (split 'train', images preloaded) or a whole-image evaluation set."""
    if split == "train":
        source = build_source(name, split, scale, data_root, index_range=index_range, preload=True)
        return PatchDataset(
            source, scale, lr_patch, iters_per_epoch=iters_per_epoch, batch_size=batch_size, augment=augment,
            seed=seed,
        )
    return build_source(name, split, scale, data_root, index_range=index_range)
