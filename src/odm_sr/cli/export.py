"""`odm-sr-export CKPT OUT.onnx`: the integer ONNX graph of a trained static-quantized checkpoint (ODM, ODM-LSQ,
ODM-FQ, PAMS) and its packed b-bit weight file ``OUT.odmq``; prints the file sizes beside the storage figure of
``odm-sr-complexity``. DAQ and DDTB are refused (their ranges are computed per image at test time).
``--mode fast-inexact`` (opt-in, EDSR only): the inexact fast graph of ``export.fast``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from odm_sr.console import one_line_errors
from odm_sr.evaluation import EVAL_PAD_MODES


def size_report(packed: Path, storage_k: float) -> dict:
    """Packed body bytes against the storage figure (K 32-bit params → bytes), and the header apart."""
    from odm_sr.export.packing import body_size

    data = packed.read_bytes()
    body = body_size(data)
    header = len(data) - body  # magic, version, header and the trailing SHA-256
    expected = storage_k * 1000 * 4
    return {"packed_bytes": len(data), "header_bytes": header, "body_bytes": body,
            "storage_bytes": expected, "body_over_storage": body / expected}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="odm-sr-export", description=__doc__)
    parser.add_argument("ckpt", help="checkpoint written by odm-sr-train (.ckpt)")
    parser.add_argument("output", help="where to write the ONNX graph (.onnx); the packed file goes beside it")
    parser.add_argument("--lr-size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"),
                        help="traced LR size (the only size of a SwinIR/HAT graph; EDSR/RDN graphs take any)")
    parser.add_argument("--pad-mode", default="official", choices=EVAL_PAD_MODES,
                        help="SwinIR/HAT window padding baked into the graph (official: as odm-sr-eval)")
    parser.add_argument("--mode", default="exact", help="exact (default: equals odm-sr-eval eval.exact=true) or "
                        "fast-inexact (opt-in, EDSR only: 8-bit residual branches and body-end conv on QLinearConv; "
                        "PSNR cost in bench/README.md)")
    parser.add_argument("--calib-images", type=int, default=16, metavar="N",
                        help="fast-inexact: training LR images (sr291) that set its 8-bit ranges")
    parser.add_argument("--data-root", default=None, help="fast-inexact: data root of sr291 (default: "
                        "$ODM_SR_DATA or ../shared/data)")
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback of an error (also: "
                        "HYDRA_FULL_ERROR=1)")
    args = parser.parse_args(argv)
    from odm_sr.export.runtime import export_checkpoint
    from odm_sr.export.spec import ExportError

    with one_line_errors("odm-sr-export", args.traceback):  # a missing or unreadable file: one line
        try:
            info = export_checkpoint(args.ckpt, args.output, tuple(args.lr_size), args.pad_mode, args.mode,
                                     args.calib_images, args.data_root)
        except ExportError as err:  # what the integer graph cannot hold, named with the checkpoint
            sys.exit(f"odm-sr-export: {args.ckpt}: {err}")
    info.update(size_report(Path(info["packed"]), info["storage_k"]))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
