"""Whole-image SR data sets: stored LR/HR pairs, and HR folders with LR made by MATLAB bicubic.

Every item (evaluation form) is ``{"lr": float (3, h, w) in [0, 1], "hr": float (C, s*h, s*w),
"name": str, "hr_channels": C, "index": i}`` (``index``: the item's position in the set, by which a DDP rank
leaves out the padding images of the distributed sampler: ``evaluation.owned_weights``). HR is mod-cropped: its
top-left s*h x s*w region, where h x w is the LR size (shared/data/README.md). The model input is always 3
channels: a grayscale LR is replicated; the grayscale HR keeps its one channel (``hr_channels = 1``) so metrics
compare that channel (``odm_sr.metrics``). For training, wrap a data set in ``odm_sr.data.patches.PatchDataset``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from odm_sr.data.imresize import imresize
from odm_sr.data.io import IMAGE_EXTENSIONS, image_size, read_image, to_tensor
from odm_sr.data.patches import check_pair_sizes, mod_crop, to_rgb

__all__ = ["SRImageDataset", "PairedFolderDataset", "HRFolderDataset", "bicubic_downscale", "list_images"]

PathLike = str | Path


def list_images(folder: PathLike, recursive: bool = False, layout: str = "") -> list[Path]:
    """Image files (any format Pillow opens: ``io.IMAGE_EXTENSIONS``) in ``folder``, sorted; FileNotFoundError
    if none."""
    folder = Path(folder)
    hint = f" Expected layout: {layout}" if layout else ""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}.{hint}")
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS[:6])}, or another format Pillow reads) in {folder}"
            f"{' or below' if recursive else ''}.{hint}"
        )
    return files


def bicubic_downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """uint8 (H, W, C) HR -> uint8 LR = MATLAB imresize(HR, 1/scale, 'bicubic') of the mod-cropped HR."""
    x = torch.from_numpy(np.ascontiguousarray(mod_crop(hr, scale).transpose(2, 0, 1)))
    return np.ascontiguousarray(imresize(x, 1.0 / scale).numpy().transpose(1, 2, 0))


class SRImageDataset(Dataset):
    """Base class: ``names``, ``hr_paths``, ``load_pair(i)`` -> uint8 (LR, mod-cropped HR) arrays.

    Subclasses implement ``_read_hr(i)``, ``_read_lr(i, hr)`` and ``lr_size(i)``. With ``preload``
    every HR (and stored LR) is read once into memory as uint8 at construction (training sets).
    """

    def __init__(self, scale: int, preload: bool = False) -> None:
        if int(scale) != scale or scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        self.scale = int(scale)
        self.names: list[str] = []
        self.hr_paths: list[Path] = []
        self._preload = preload
        self._hr_cache: dict[int, np.ndarray] = {}
        self._lr_cache: dict[int, np.ndarray] = {}

    def _finish_init(self) -> None:
        if self._preload:
            for i in range(len(self)):
                self._hr_cache[i] = self._read_hr(i)

    def __len__(self) -> int:
        return len(self.names)

    def describe(self, index: int) -> str:
        return str(self.hr_paths[index])

    def _read_hr(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def _read_lr(self, index: int, hr: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def lr_size(self, index: int) -> tuple[int, int]:
        raise NotImplementedError

    def load_hr(self, index: int) -> np.ndarray:
        """The HR of image ``index``, uint8 (H, W, C), mod-cropped to scale * LR size."""
        hr = self._hr_cache.get(index)
        return hr if hr is not None else self._read_hr(index)

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (LR, HR) arrays (H, W, C) of image ``index``; HR is scale * LR in size."""
        hr = self.load_hr(index)
        lr = self._lr_cache.get(index)
        if lr is None:
            lr = self._read_lr(index, hr)
        if lr.shape[2] != hr.shape[2]:
            raise ValueError(
                f"{self.describe(index)}: LR has {lr.shape[2]} channel(s) but HR has {hr.shape[2]}"
            )
        return lr, hr

    def __getitem__(self, index: int) -> dict:
        lr, hr = self.load_pair(index)
        return {
            "lr": to_tensor(to_rgb(lr)),
            "hr": to_tensor(hr),
            "name": self.names[index],
            "hr_channels": int(hr.shape[2]),
            "index": int(index),
        }


def _as_list(value: PathLike | Sequence[PathLike]) -> list[Path]:
    return [Path(value)] if isinstance(value, (str, Path)) else [Path(v) for v in value]


class PairedFolderDataset(SRImageDataset):
    """Stored LR/HR pairs: HR ``<hr_dir>/<stem>.<ext>`` with LR ``<lr_dir>/<stem>x<scale>.<ext>``.

    This one rule covers the EDSR benchmark layout (``<Set>/HR/img_001.png`` +
    ``<Set>/LR_bicubic/X2/img_001x2.png``) and DIV2K (``DIV2K_train_HR/0001.png`` +
    ``DIV2K_train_LR_bicubic/X2/0001x2.png``). ``hr_dir``/``lr_dir`` may be parallel lists of folders
    (e.g. DIV2K train + valid). ``index_range=(first, last)`` keeps numeric stems in that closed range
    (DIV2K 1-800 train, 801-810 validation). Sizes are checked from file headers at construction:
    LR must be floor(HR / scale), else ValueError naming both files.
    """

    def __init__(
        self,
        hr_dir: PathLike | Sequence[PathLike],
        lr_dir: PathLike | Sequence[PathLike],
        scale: int,
        index_range: tuple[int, int] | None = None,
        preload: bool = False,
    ) -> None:
        super().__init__(scale, preload)
        hr_dirs, lr_dirs = _as_list(hr_dir), _as_list(lr_dir)
        if len(hr_dirs) != len(lr_dirs):
            raise ValueError(f"hr_dir and lr_dir must pair up, got {len(hr_dirs)} and {len(lr_dirs)} folders")
        layout = f"HR <hr_dir>/<name>.png with LR <lr_dir>/<name>x{self.scale}.png"
        self.lr_paths: list[Path] = []
        self._lr_sizes: list[tuple[int, int]] = []
        self._hr_sizes: list[tuple[int, int]] = []
        for hdir, ldir in zip(hr_dirs, lr_dirs, strict=True):
            if not hdir.is_dir() and hdir != hr_dirs[0]:
                continue  # optional extra folder, e.g. DIV2K_valid_HR
            for hr_path in list_images(hdir, layout=layout):
                if index_range is not None and not _in_range(hr_path.stem, index_range):
                    continue
                self._add_pair(hr_path, self._find_lr(ldir, hr_path.stem, layout))
        if not self.names:
            where = ", ".join(str(d) for d in hr_dirs)
            raise FileNotFoundError(
                f"no HR images with index in {index_range} in {where}. Expected layout: {layout}"
            )
        self._finish_init()

    def _find_lr(self, lr_dir: Path, stem: str, layout: str) -> Path:
        if not lr_dir.is_dir():
            raise FileNotFoundError(f"LR folder not found: {lr_dir}. Expected layout: {layout}")
        for ext in IMAGE_EXTENSIONS:
            candidate = lr_dir / f"{stem}x{self.scale}{ext}"
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"no LR image {lr_dir / f'{stem}x{self.scale}.png'} (any image extension)")

    def _add_pair(self, hr_path: Path, lr_path: Path) -> None:
        hr_hw, lr_hw = image_size(hr_path), image_size(lr_path)
        check_pair_sizes(lr_hw, hr_hw, self.scale, lr_path, hr_path)
        self.names.append(hr_path.stem)
        self.hr_paths.append(hr_path)
        self.lr_paths.append(lr_path)
        self._hr_sizes.append(hr_hw)
        self._lr_sizes.append(lr_hw)

    def describe(self, index: int) -> str:
        return f"{self.hr_paths[index]} / {self.lr_paths[index]}"

    def lr_size(self, index: int) -> tuple[int, int]:
        return self._lr_sizes[index]

    def _read_hr(self, index: int) -> np.ndarray:
        hr, _ = read_image(self.hr_paths[index])
        h, w = self._lr_sizes[index]
        check_pair_sizes((h, w), hr.shape[:2], self.scale, self.lr_paths[index], self.hr_paths[index])
        return hr[: self.scale * h, : self.scale * w]

    def _read_lr(self, index: int, hr: np.ndarray) -> np.ndarray:
        lr, _ = read_image(self.lr_paths[index])
        if self._preload:
            self._lr_cache[index] = lr
        return lr

    def _finish_init(self) -> None:
        super()._finish_init()
        if self._preload:
            for i in range(len(self)):
                self._read_lr(i, self._hr_cache[i])


def _in_range(stem: str, index_range: tuple[int, int]) -> bool:
    return stem.isdigit() and index_range[0] <= int(stem) <= index_range[1]


class HRFolderDataset(SRImageDataset):
    """HR images only; LR = MATLAB bicubic (``imresize`` on uint8, as the benchmark LR were made) of the
    mod-cropped HR, computed lazily once per image and cached in memory.

    ``roots``: a folder, or a list of folders and/or image files. Folders are scanned for
    png/jpg/jpeg/bmp/tif files, recursively by default; names are the paths relative to their folder,
    without extension.
    """

    def __init__(
        self, roots: PathLike | Sequence[PathLike], scale: int, recursive: bool = True, preload: bool = False
    ) -> None:
        super().__init__(scale, preload)
        for root in _as_list(roots):
            if root.is_file():
                self.names.append(root.stem)
                self.hr_paths.append(root)
                continue
            for path in list_images(root, recursive=recursive, layout="a folder of HR images"):
                self.names.append(path.relative_to(root).with_suffix("").as_posix())
                self.hr_paths.append(path)
        self._hr_sizes = [image_size(p) for p in self.hr_paths]
        self._finish_init()

    def lr_size(self, index: int) -> tuple[int, int]:
        h, w = self._hr_sizes[index]
        return h // self.scale, w // self.scale

    def _read_hr(self, index: int) -> np.ndarray:
        hr = mod_crop(read_image(self.hr_paths[index])[0], self.scale)
        if hr.shape[0] == 0 or hr.shape[1] == 0:
            raise ValueError(f"{self.hr_paths[index]} is smaller than the scale {self.scale}")
        return hr

    def _read_lr(self, index: int, hr: np.ndarray) -> np.ndarray:
        lr = bicubic_downscale(hr, self.scale)
        self._lr_cache[index] = lr
        return lr
