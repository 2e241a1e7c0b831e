"""Matplotlib figures of the distribution analyses (``analysis.distributions``): Figure S1's activation
histograms with the quantization levels, Figure S2's per-layer weight ranges. Each returns the Figure and
saves it when given a path; matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def plot_histograms(hists: dict[str, dict[str, Any]], path: str | Path | None = None):
    """One panel per layer: the histogram (log counts) and the static levels as red lines; returns the Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * max(1, len(hists)), 3.4), layout="constrained")
    axes = fig.subplots(1, max(1, len(hists)), squeeze=False)[0]
    for ax, (name, h) in zip(axes, hists.items(), strict=False):
        ax.stairs(h["counts"], h["edges"], fill=True, alpha=0.7)
        ax.set_yscale("log")
        for level in h["levels"] if h["levels"] is not None else []:
            ax.axvline(level, color="red", linewidth=0.8)
        bits = f", {h['bits']}-bit {h['quantizer']}" if h["bits"] else ""
        ax.set_title(f"{name}{bits}", fontsize="small")
        ax.set_xlabel("X (before quantization)")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_weight_stats(stats: Sequence[dict[str, Any]], path: str | Path | None = None):
    """Min / max / mean per layer (and ±u_w where known); returns the Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.25 * len(stats) + 3.0), 3.6), layout="constrained")
    ax = fig.subplots()
    xs = np.arange(len(stats))
    for key, style in (("max", "^-"), ("mean", "o-"), ("min", "v-")):
        ax.plot(xs, [s[key] for s in stats], style, label=key, markersize=4)
    clips = [s["clip"] if s["clip"] is not None else np.nan for s in stats]
    if not np.all(np.isnan(clips)):
        ax.plot(xs, clips, "k--", linewidth=0.8, label="±u_w")
        ax.plot(xs, -np.array(clips), "k--", linewidth=0.8)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xticks(xs, [s["layer"] for s in stats], rotation=90, fontsize="x-small")
    ax.set_ylabel("latent weight")
    ax.legend(fontsize="small")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


__all__ = ["plot_histograms", "plot_weight_stats"]
