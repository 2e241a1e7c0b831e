"""``SRModel``: the attributes every SR backbone declares, read by training, evaluation, export and analysis
without probing (``getattr``) for them."""

from __future__ import annotations

from torch import nn


class SRModel(nn.Module):
    """An SR backbone whose forward takes and returns images in [0, ``pixel_range``].

    - ``name``: the canonical model name (``build_model``'s, e.g. ``edsr`` for ``edsr_full``).
    - ``scale``: the upscaling factor.
    - ``pixel_range``: 255.0 (EDSR, RDN) or 1.0 (SwinIR, HAT).
    - ``pad_mode``: the window padding of a transformer backbone (``pad_to_multiple``); None for a backbone
      without window padding (EDSR, RDN).
    - ``official_eval_pad_mode``: the padding of the script behind the published numbers
      (``eval.pad_mode=official``); None: the model's own ``pad_mode``.
    - ``official_gray_mode``: how that script compares a grayscale ground truth (Set14's bridge,
      ``eval.gray_mode=official``): ``channel`` (its one channel, as the MATLAB scripts) or ``rgb`` (replicated
      to RGB, then Y: scripts that read every image as colour, IMDN's and PAN's).
    """

    name: str
    scale: int
    pixel_range: float = 1.0
    pad_mode: str | None = None
    official_eval_pad_mode: str | None = None
    official_gray_mode: str = "channel"


def pixel_range(net: nn.Module) -> float:
    """``net.pixel_range`` of an ``SRModel``; 1.0 for any other module (a bare test network)."""
    return float(net.pixel_range) if isinstance(net, SRModel) else 1.0
