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
                 overlap: int = 16, pad_mode: str = "official", tf32: bool = False, engine: str = "torch",
                 threads: int | None = None) -> Path:
    """Read ``src`` (grayscale/RGBA converted to RGB), super-resolve it, write ``dst`` (PNG recommended).

    ``engine="onnx"``: the integer graph in ONNX Runtime (``export.runtime``; ``ckpt`` may also be an exported
    .onnx/.odmq), with ``threads`` intra-op threads."""
    set_tf32(tf32)  # fp32 as in training unless asked
    if engine == "onnx":
        from .export.runtime import load_engine, onnx_upscale

        upscale = onnx_upscale(load_engine(ckpt, threads, pad_mode), tile, overlap)
    else:
        upscale = network_upscale(load_trained(ckpt)[0], tile, overlap, pad_mode)
    img, _ = read_image(src, mode="RGB")
    lr = to_tensor(img).unsqueeze(0)
    with torch.no_grad():
        sr = upscale(lr)
    dst = Path(dst)
    save_image(sr[0], dst)  # creates the parent folders
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="odm-sr-upscale", description=__doc__)
    parser.add_argument("ckpt", help="checkpoint written by odm-sr-train (.ckpt); with --engine onnx also an "
                                     "odm-sr-export .onnx/.odmq")
    parser.add_argument("input", help="LR image file (png/jpg/bmp/tif)")
    parser.add_argument("output", help="where to write the SR image")
    parser.add_argument("--tile", type=int, default=None, help="LR tile side for chopped inference")
    parser.add_argument("--overlap", type=int, default=16, help="LR context pixels around each tile")
    parser.add_argument("--pad-mode", default="official", choices=EVAL_PAD_MODES,
                        help="SwinIR/HAT window padding (official: as the released test scripts)")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls/convolutions on Ampere+ GPUs (default fp32)")
    parser.add_argument("--engine", default="torch", choices=("torch", "onnx"),
                        help="torch: the PyTorch (fake-quant) model; onnx: its integer graph in ONNX Runtime (CPU)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (--engine onnx)")
    args = parser.parse_args(argv)
    out = upscale_file(args.ckpt, args.input, args.output, args.tile, args.overlap, args.pad_mode, args.tf32,
                       args.engine, args.threads)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
