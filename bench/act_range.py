"""The full-precision network's activations where a method puts its activation quantizers: per layer, PAMS's
tracking statistic (mean over images of max|x|), the 99th / 99.9th percentiles of |x|, and the share of
activations that a symmetric b-bit grid clipped at that max rounds to zero (|x| < α / (2·(2^(b-1) − 1))). It says
what PAMS's max-tracked α does to a network (issue "Real trained networks": why PAMS W4A4 on IMDN ends below its
W2A2).

    python bench/act_range.py --model imdn --pretrained ../shared/models/imdn/IMDN_x4.pth --method pams --bits 2 4

Set5 LR images (whole), the official weights, no activation quantizer acting (each passes its input through); the
weights float, or with ``--weight-bits B`` quantized by the method's weight quantizer at B bits (what PAMS's
tracking epoch sees at WBAB, less the activation quantization).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS_DIR
from init_psnr import network_parser, quantized, set5

from odm_sr.quant.quantizer import Quantizer


@torch.no_grad()
def activations(args) -> dict[str, list[np.ndarray]]:
    """|x| at each activation quantizer's input, per Set5 image, with every activation quantizer passing through
    and the weights float (``args.weight_bits`` None) or quantized by the method at that width."""
    net = quantized(args, args.weight_bits or 4, 4)
    seen: dict[str, list[np.ndarray]] = {}
    for name, module in net.named_modules():
        if isinstance(module, Quantizer):
            if name.endswith(".weight_quant"):
                if args.weight_bits is None:
                    module.forward = lambda x: x
            else:
                def record(x, name=name):
                    seen.setdefault(name, []).append(x.detach().abs().flatten().numpy())
                    return x
                module.forward = record
    net.eval()
    rng = float(getattr(net, "pixel_range", 1.0))
    for lr, _ in set5(Path(args.data_root), args.scale):
        net(lr[None] * (rng / 255.0))
    return seen


def main() -> None:
    parser = network_parser(__doc__, "pams")
    parser.add_argument("--weight-bits", type=int, default=None, help="quantize the weights at this width")
    parser.add_argument("--out", default=str(RESULTS_DIR / "act_range.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {}
    for name, per_image in activations(args).items():
        alpha = float(np.mean([a.max() for a in per_image]))
        allx = np.concatenate(per_image)
        row = {"mean_max": alpha, "p99": float(np.percentile(allx, 99)), "p999": float(np.percentile(allx, 99.9))}
        for b in args.bits:
            row[f"zero_share_{b}bit"] = float(np.mean(allx < alpha / (2 * (2 ** (b - 1) - 1))))
        rows[name.removesuffix(".act_quant")] = row
    head = " | ".join(f"rounds to 0 at {b} bits" for b in args.bits)
    print(f"| layer | mean max abs x (PAMS α) | p99 abs x | p99.9 abs x | {head} |")
    print("|---|---:|---:|---:|" + "---:|" * len(args.bits))
    for name, row in rows.items():
        zeros = " | ".join(f"{100 * row[f'zero_share_{b}bit']:.1f} %" for b in args.bits)
        print(f"| {name} | {row['mean_max']:.2f} | {row['p99']:.2f} | {row['p999']:.2f} | {zeros} |")
    Path(args.out).write_text(json.dumps({"model": args.model, "scale": args.scale, "method": args.method,
                                          "weight_bits": args.weight_bits, "pretrained": str(args.pretrained),
                                          "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
