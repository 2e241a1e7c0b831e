"""Whole-image inference: tiled ("chopped") forward with bounded memory (window padding: ``models.windows``).

``forward_chopped`` splits the LR image into a grid of *core* blocks of side ``tile``; each block is
run with up to ``overlap`` LR pixels of context on every side (less at the image edge, where the
context is the image border itself), and only the block's own output region is kept, the context is
discarded. Every output pixel therefore comes from a tile in which it lies at least ``overlap`` pixels
from any cut, and for a network whose receptive-field radius is <= ``overlap`` LR pixels (and that pads
with zeros like ``nn.Conv2d``) the result equals the whole-image forward up to float round-off. Peak
activation memory is that of one ``(tile + 2 * overlap)``-sided input.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["forward_chopped"]


def _starts(length: int, core: int) -> list[int]:
    return list(range(0, length, core))


def forward_chopped(
    model_fn: Callable[[Tensor], Tensor], lr: Tensor, scale: int, tile: int | None, overlap: int,
    out: Tensor | None = None,
) -> Tensor:
    """Run ``model_fn`` on (N, C, H, W) ``lr`` in overlapping tiles; returns (N, C', scale*H, scale*W).

    ``tile`` is the LR side of the block kept from each run, ``overlap`` the LR context added on each side
    (so inputs are at most ``tile + 2 * overlap`` on a side). ``None``, or a tile covering the whole
    image, runs the whole image at once. ``out``: a destination of that shape (e.g. a uint8 view of an
    (N, H, W, C) image buffer, with a ``model_fn`` that returns uint8), written and returned, so that no
    full-size float output is ever held.
    """
    if lr.dim() != 4:
        raise ValueError(f"lr must be (N, C, H, W), got shape {tuple(lr.shape)}")
    n, _, h, w = lr.shape
    if tile is None or (h <= tile and w <= tile):
        return model_fn(lr) if out is None else out.copy_(model_fn(lr))
    if tile <= 0 or overlap < 0:
        raise ValueError(f"need tile > 0 and overlap >= 0, got tile={tile}, overlap={overlap}")
    core = tile
    for y0 in _starts(h, core):
        y1 = min(y0 + core, h)
        for x0 in _starts(w, core):
            x1 = min(x0 + core, w)
            # input window: the core plus up to `overlap` context pixels, clipped to the image
            iy0, iy1 = max(y0 - overlap, 0), min(y1 + overlap, h)
            ix0, ix1 = max(x0 - overlap, 0), min(x1 + overlap, w)
            sr_tile = model_fn(lr[:, :, iy0:iy1, ix0:ix1])
            expected = (scale * (iy1 - iy0), scale * (ix1 - ix0))
            if tuple(sr_tile.shape[-2:]) != expected:
                raise ValueError(
                    f"model_fn output {tuple(sr_tile.shape[-2:])} for a {iy1 - iy0}x{ix1 - ix0} tile is not "
                    f"scale={scale} times its input"
                )
            if out is None:
                out = sr_tile.new_empty(n, sr_tile.shape[1], scale * h, scale * w)
            oy, ox = scale * (y0 - iy0), scale * (x0 - ix0)
            out[:, :, scale * y0 : scale * y1, scale * x0 : scale * x1] = sr_tile[
                :, :, oy : oy + scale * (y1 - y0), ox : ox + scale * (x1 - x0)
            ]
    return out
