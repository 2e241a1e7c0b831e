"""Set5 PSNR of a pretrained network right after a method quantizes it, before any training: weights only,
activations only, both, and the weights of one layer group at a time. It says which quantizer a QAT run must
recover from (issue "Real trained networks": why DAQ W2A2 on IMDN starts 22 dB below the FP network).

    python bench/init_psnr.py --model imdn --pretrained ../shared/models/imdn/IMDN_x4.pth --method daq --bits 2 \
        --groups c1 c2,c3,c4 c5

Methods with statistics set by calibration (ODM's percentile bounds, PAMS's α, DDTB's bounds) are shown as
quantize() leaves them, i.e. before their calibration: compare DAQ (nothing calibrated or learnable) with itself.
Y channel, border = scale, whole images, one thread. ~1 min per row on this CPU for IMDN.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
from _common import REPO_ROOT, RESULTS_DIR

from odm_sr.config import method_defaults
from odm_sr.data.io import read_image
from odm_sr.metrics import evaluate_pair
from odm_sr.models import build_model, load_pretrained
from odm_sr.quant import build_method
from odm_sr.quant.quantizer import Quantizer


def set5(data_root: Path, scale: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    root = data_root / "benchmark" / "Set5"
    pairs = []
    for hr_path in sorted((root / "HR").glob("*.png")):
        lr, _ = read_image(root / "LR_bicubic" / f"X{scale}" / f"{hr_path.stem}x{scale}.png", mode="RGB")
        hr, _ = read_image(hr_path, mode="RGB")
        pairs.append((torch.from_numpy(lr).permute(2, 0, 1).float(), torch.from_numpy(hr).permute(2, 0, 1)))
    if not pairs:
        raise FileNotFoundError(f"{root}: no Set5 images (HR/*.png and LR_bicubic/X{scale}/)")
    return pairs


@torch.no_grad()
def mean_psnr(net: torch.nn.Module, pairs, scale: int) -> float:
    net.eval()
    rng = float(getattr(net, "pixel_range", 1.0))
    values = []
    for lr, hr in pairs:
        sr = net(lr[None] * (rng / 255.0))[0].clamp(0, rng).mul(255.0 / rng).round().byte()
        values.append(evaluate_pair(sr[:, :hr.shape[1], :hr.shape[2]], hr, scale)[0])
    return float(np.mean(values))


def quantized(args, w: int, a: int, only: list[str] | None = None) -> torch.nn.Module:
    """The pretrained network as ``args.method`` quantizes it at W``w``A``a``; ``only``: weight quantizers of
    layers whose name has one of these parts stay, the others pass weights through."""
    net = load_pretrained(build_model(args.model, args.scale), args.pretrained)
    method = build_method(method_defaults(args.method), {"w": w, "a": a})
    net = method.quantize(net)
    if only is not None:
        keep = re.compile(r"\.(" + "|".join(map(re.escape, only)) + r")\.")
        for name, module in net.named_modules():
            if isinstance(module, Quantizer) and name.endswith(".weight_quant") and not keep.search(f".{name}"):
                module.forward = lambda x: x  # this layer's weights stay float
    return net


def network_parser(doc: str, method: str) -> argparse.ArgumentParser:
    """The options this script and ``act_range.py`` share: network, weights, method, bit-widths, data root."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", default="imdn")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--pretrained", default=str(REPO_ROOT.parent / "shared" / "models" / "imdn" / "IMDN_x4.pth"))
    parser.add_argument("--method", default=method)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--data-root", default=str(REPO_ROOT.parent / "shared" / "data"))
    return parser


def main() -> None:
    parser = network_parser(__doc__, "daq")
    parser.add_argument("--groups", nargs="*", default=[], help="weight-only rows per layer-name group, e.g. c1 c2,c3")
    parser.add_argument("--out", default=str(RESULTS_DIR / "init_psnr.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    pairs = set5(Path(args.data_root), args.scale)
    rows = [("FP", mean_psnr(load_pretrained(build_model(args.model, args.scale), args.pretrained), pairs, args.scale))]
    for b in args.bits:
        rows += [(f"W{b}A{b}", mean_psnr(quantized(args, b, b), pairs, args.scale)),
                 (f"W{b} only", mean_psnr(quantized(args, b, 32), pairs, args.scale)),
                 (f"A{b} only", mean_psnr(quantized(args, 32, b), pairs, args.scale))]
        for group in args.groups:
            net = quantized(args, b, 32, group.split(","))
            rows.append((f"W{b} only on {group}", mean_psnr(net, pairs, args.scale)))
    print(f"| {args.model} x{args.scale}, method={args.method}, no training | Set5 PSNR |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value:.2f} |")
    Path(args.out).write_text(json.dumps({"model": args.model, "scale": args.scale, "method": args.method,
                                          "pretrained": str(args.pretrained), "rows": dict(rows)}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
