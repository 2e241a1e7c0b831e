"""`odm-sr-upscale CKPT INPUT OUTPUT`: super-resolve one image file with a trained checkpoint
(``odm_sr.upscale.upscale_file``)."""

from __future__ import annotations

import argparse

from odm_sr.console import one_line_errors
from odm_sr.evaluation import EVAL_PAD_MODES
from odm_sr.upscale import upscale_file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="odm-sr-upscale", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="checkpoint written by odm-sr-train (.ckpt); with --engine onnx also an "
                                     "odm-sr-export .onnx/.odmq")
    parser.add_argument("input", help="LR image file (any format Pillow reads: png, jpg, bmp, tif, webp, ...)")
    parser.add_argument("output", help="where to write the SR image")
    parser.add_argument("--tile", type=int, default=None, help="LR tile side for chopped inference")
    parser.add_argument("--overlap", type=int, default=16, help="LR context pixels around each tile")
    parser.add_argument("--pad-mode", default="official", choices=EVAL_PAD_MODES,
                        help="SwinIR/HAT window padding (official: as the released test scripts)")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls/convolutions on Ampere+ GPUs (default fp32)")
    parser.add_argument("--engine", default="torch", choices=("torch", "onnx"),
                        help="torch: the PyTorch (fake-quant) model; onnx: its integer graph in ONNX Runtime (CPU)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (--engine onnx)")
    parser.add_argument("--overwrite", action="store_true", help="allow OUTPUT to be the INPUT file")
    parser.add_argument("--device", default=None, help="where the network runs (--engine torch): cuda, cuda:1, "
                                                       "cpu, ...; default cuda if available, else cpu")
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback of an error (also: "
                                                                  "HYDRA_FULL_ERROR=1)")
    args = parser.parse_args(argv)
    with one_line_errors("odm-sr-upscale", args.traceback):  # a bad value, a missing file: one line
        out = upscale_file(args.ckpt, args.input, args.output, args.tile, args.overlap, args.pad_mode, args.tf32,
                           args.engine, args.threads, args.overwrite, args.device)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
