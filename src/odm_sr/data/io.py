"""Image file I/O with Pillow: uint8 HWC arrays in, CHW float tensors out.

``read_image(path, mode)`` returns ``(img, is_gray)``: a uint8 array of shape (H, W, C) and whether the
file holds a single (gray) channel. ``mode="keep"`` (default) keeps a gray image as C = 1; ``mode="RGB"``
replicates it to C = 3. File modes:

* ``L`` (and ``1``): kept as one channel; ``LA``: the alpha is dropped, one channel;
* ``RGB``: as is; ``RGBA``: the alpha channel is **dropped** (not composited on a background), because
  SR data sets store opaque photographs and compositing would change the pixels;
* ``P`` (palette): expanded to RGB (its transparency, if any, is dropped);
* 16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``, or ``I`` from a 16-bit PNG): scaled to 8 bit with
  round(v * 255 / 65535); an ``I`` image with values outside [0, 65535] raises ``ImageReadError``;
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: converted to RGB; ``F`` (float) and others: ``ImageReadError``.

The EXIF orientation (a phone photo stored sideways with orientation 6, say) is applied, so pixels come
upright as image viewers show them (``image_size`` gives that upright size); training, evaluation and
``odm-sr-upscale`` all read through here. An animated image (GIF, APNG, WebP with more than one frame)
raises ``ImageReadError``: only its first frame would be used.

A missing file raises ``FileNotFoundError``; a file that is not a decodable image, or is truncated,
raises ``ImageReadError`` (a ``ValueError``) naming the file.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from odm_sr.files import atomic_write
from odm_sr.metrics import to_uint8

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "read_image",
    "image_size",
    "to_tensor",
    "to_hwc_uint8",
    "save_image",
    "write_png",
]

# Not still raster images, or only stubs / external tools in Pillow: never picked up from a data folder
_NOT_IMAGES = {".eps", ".ps", ".mpeg", ".mpg", ".h5", ".hdf", ".bufr", ".grib", ".emf", ".wmf", ".fit", ".fits"}


def _pil_extensions() -> tuple[str, ...]:
    """Every file extension of a format this Pillow can open (WebP, AVIF, TIFF, GIF, PPM, ...), the common SR
    ones first (png, jpg, jpeg, bmp, tif, tiff: the order in which a paired LR file is looked up)."""
    from PIL import Image

    Image.init()
    common = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
    found = {ext for ext, fmt in Image.EXTENSION.items() if fmt in Image.OPEN} - _NOT_IMAGES
    return common + tuple(sorted(found - set(common)))


IMAGE_EXTENSIONS = _pil_extensions()

_EXPECTED = "an 8-bit grayscale/RGB(A)/palette or 16-bit grayscale image (png, jpg, bmp, tif)"
_TO_RGB_MODES = {"CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"}
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageReadError(ValueError):
    """An image file could not be decoded (corrupt, truncated, or an unsupported pixel format)."""


def _open(path: Path) -> Image.Image:
    """Open and decode ``path`` now, so that a truncated file fails here and not later."""
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    img = None
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if img is not None:
            img.close()
        raise ImageReadError(f"cannot read {path}: expected {_EXPECTED} ({err})") from err
    frames = getattr(img, "n_frames", 1)
    if getattr(img, "is_animated", False) and frames > 1:
        img.close()
        raise ImageReadError(f"cannot read {path}: an animated {img.format} of {frames} frames; odm-sr reads "
                             f"still images (only the first frame would be used): save the frame you want as PNG")
    return img


# EXIF orientations that swap width and height (5-8: a transpose or a 90/270 degree rotation); EXIF 2.3, tag 0x0112
_ORIENTATION_TAG = 0x0112
_SIDEWAYS = {5, 6, 7, 8}


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION_TAG, 1))
    except (OSError, SyntaxError, ValueError, TypeError):  # damaged EXIF: the pixels as stored
        return 1


def _upright(img: Image.Image) -> Image.Image:
    """``img`` with its EXIF orientation applied (itself when the orientation is 1 or absent)."""
    return ImageOps.exif_transpose(img) if _orientation(img) != 1 else img


def _16bit_to_uint8(img: Image.Image, path: Path) -> np.ndarray:
    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageReadError(
            f"cannot read {path}: mode {img.mode} values span [{values.min()}, {values.max()}], "
            f"expected {_EXPECTED}"
        )
    return np.floor(values * (255.0 / 65535.0) + 0.5).astype(np.uint8)


def _pixels(img: Image.Image, path: Path) -> np.ndarray:
    mode = img.mode
    if mode in ("L", "1", "LA"):
        return np.asarray(img.convert("L"))
    if mode == "RGB":
        return np.asarray(img)
    if mode == "RGBA":
        return np.asarray(img)[..., :3]  # alpha dropped on purpose, see module docstring
    if mode in ("P", "PA"):
        return np.asarray(img.convert("RGBA"))[..., :3]
    if mode in _TO_RGB_MODES:
        return np.asarray(img.convert("RGB"))
    if mode in _16BIT_MODES:
        return _16bit_to_uint8(img, path)
    raise ImageReadError(f"cannot read {path}: unsupported mode {mode!r}, expected {_EXPECTED}")


def read_image(path: str | Path, mode: str = "keep") -> tuple[np.ndarray, bool]:
    """Read an image file as ``(uint8 (H, W, C) array, is_gray)`` (see the module docstring).

    ``mode="keep"``: C = 1 for a grayscale file, 3 for colour; ``mode="RGB"``: always C = 3 (gray replicated).
    """
    if mode not in ("keep", "RGB"):
        raise ValueError(f"read_image mode must be 'keep' or 'RGB', got {mode!r}")
    path = Path(path)
    with _open(path) as img:
        arr = _pixels(_upright(img), path)
    is_gray = arr.ndim == 2
    if is_gray:
        arr = arr[:, :, None]
        if mode == "RGB":
            arr = np.repeat(arr, 3, axis=2)
    # a writable, contiguous copy: Pillow's array views are read-only, which torch.from_numpy warns about
    return np.array(arr, dtype=np.uint8, order="C"), is_gray


def image_size(path: str | Path) -> tuple[int, int]:
    """Upright (H, W) of an image file (EXIF orientation applied) from its header only (no decoding)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if _orientation(img) in _SIDEWAYS:
                w, h = h, w
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"cannot read {path}: expected {_EXPECTED} ({err})") from err
    return h, w


def to_tensor(img: np.ndarray) -> Tensor:
    """uint8 (H, W, C) array -> float32 (C, H, W) tensor in [0, 1]. A 2-D array is taken as one channel."""
    if img.dtype != np.uint8:
        raise TypeError(f"to_tensor expects a uint8 array, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


def to_hwc_uint8(img: Tensor | np.ndarray, pixel_range: float = 1.0) -> np.ndarray:
    """A (C, H, W) float tensor in [0, pixel_range] (rounded, clamped) or uint8 tensor -> uint8 (H, W, C)."""
    t = torch.as_tensor(img).detach().cpu()
    if t.dim() != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        t = to_uint8(t, pixel_range)
    return np.ascontiguousarray(t.permute(1, 2, 0).numpy())


def save_image(img: Tensor | np.ndarray, path: str | Path, pixel_range: float = 1.0) -> None:
    """Save an image (torchvision's argument order): a (C, H, W) tensor, float in [0, pixel_range] (rounded
    and clamped) or uint8, or a uint8 (H, W, C) array. One channel is saved as 8-bit grayscale, three as
    RGB; the format follows the file extension; missing parent folders are created. The file is written
    atomically (a temporary file renamed over ``path``): an interrupted save leaves no truncated image.
    PNG is encoded from the array in bands (``write_png``): no second full-size copy of the image.
    """
    if isinstance(img, np.ndarray) and img.dtype == np.uint8:
        arr = img[:, :, None] if img.ndim == 2 else img
    else:
        arr = to_hwc_uint8(img, pixel_range)
    if arr.shape[2] not in (1, 3):
        raise ValueError(f"save_image expects 1 or 3 channels, got {arr.shape[2]}")
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"cannot save {path}: unknown image extension {path.suffix!r}, expected .png, .jpg, "
                         f".bmp, .tif, ...")
    if image_format == "PNG":
        atomic_write(path, lambda f: write_png(f, arr))
        return
    # fromarray infers L from a 2-D uint8 array and RGB from (H, W, 3)
    image = Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr))
    atomic_write(path, lambda f: image.save(f, format=image_format))  # creates the parent folders


def write_png(f: BinaryIO, arr: np.ndarray, band: int = 64, level: int = 6) -> None:
    """A uint8 (H, W, 1|3) array as an 8-bit grayscale/RGB PNG (PNG spec, ISO/IEC 15948), ``band`` rows at a
    time: each row with the Sub filter (byte minus the byte one pixel to the left, mod 256), zlib-compressed
    into IDAT chunks as it goes, so memory is the array plus one band."""
    h, w, c = arr.shape

    def chunk(kind: bytes, data: bytes) -> None:
        f.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))

    f.write(b"\x89PNG\r\n\x1a\n")
    chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2 if c == 3 else 0, 0, 0, 0))
    compressor = zlib.compressobj(level)
    for y0 in range(0, h, band):
        rows = np.ascontiguousarray(arr[y0:y0 + band]).reshape(-1, w * c)
        filtered = np.empty((rows.shape[0], w * c + 1), dtype=np.uint8)
        filtered[:, 0] = 1  # filter type Sub
        filtered[:, 1:c + 1] = rows[:, :c]
        np.subtract(rows[:, c:], rows[:, :-c], out=filtered[:, c + 1:])  # uint8 wraps: mod 256
        data = compressor.compress(filtered.tobytes())
        if data:
            chunk(b"IDAT", data)
    chunk(b"IDAT", compressor.flush())
    chunk(b"IEND", b"")
