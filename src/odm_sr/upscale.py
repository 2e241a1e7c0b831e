"""`odm-sr-upscale CKPT INPUT OUTPUT`: super-resolve one image file with a trained checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .checkpoint import load_trained
from .data.io import read_image, save_image, to_tensor
from .evaluation import EVAL_PAD_MODES, network_upscale
from .precision import set_tf32


def upscale_file(ckpt: str | Path, src: str | Path, dst: str | Path, tile: int | None = None,
                 overlap: int = 16, pad_mode: str = "official", tf32: bool = False) -> Path:
    """Read ``src`` (grayscale/RGBA converted to RGB), super-resolve it, write ``dst`` (PNG recommended)."""
    set_tf32(tf32)  # fp32 as in training unless asked
    net, _ = load_trained(ckpt)
    img, _ = read_image(src, mode="RGB")
    lr = to_tensor(img).unsqueeze(0)
    with torch.no_grad():
        sr = network_upscale(net, tile, overlap, pad_mode)(lr)
    dst = Path(dst)
    save_image(sr[0], dst)  # creates the parent folders
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="odm-sr-upscale", description=__doc__)
    parser.add_argument("ckpt", help="checkpoint written by odm-sr-train (.ckpt)")
    parser.add_argument("input", help="LR image file (png/jpg/bmp/tif)")
    parser.add_argument("output", help="where to write the SR image")
    parser.add_argument("--tile", type=int, default=None, help="LR tile side for chopped inference")
    parser.add_argument("--overlap", type=int, default=16, help="LR context pixels around each tile")
    parser.add_argument("--pad-mode", default="official", choices=EVAL_PAD_MODES,
                        help="SwinIR/HAT window padding (official: as the released test scripts)")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls/convolutions on Ampere+ GPUs (default fp32)")
    args = parser.parse_args(argv)
    out = upscale_file(args.ckpt, args.input, args.output, args.tile, args.overlap, args.pad_mode, args.tf32)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
