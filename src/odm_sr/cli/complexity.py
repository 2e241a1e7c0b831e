"""`odm-sr-complexity`: storage and BitOPs (METHODS.md §6) of backbones under quantization methods.

Example: ``odm-sr-complexity --model edsr_baseline --scale 4 --method fp pams daq ddtb odm --bits 2 4``
prints one markdown row per model, method and bit-width (FP once per model). Each row quantizes a fresh,
uncalibrated model: DDTB's dynamic gates are then assumed at the method's own dynamic ratio.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from odm_sr.analysis.complexity import RULES, complexity_table, summarize
from odm_sr.config import CONFIG_DIR, compose_config
from odm_sr.console import one_line_errors
from odm_sr.models import MODEL_NAMES, SUPPORTED_SCALES, build_model
from odm_sr.quant import VALID_BITS, build_method

METHODS = sorted(path.stem for path in (CONFIG_DIR / "method").glob("*.yaml"))  # the method= choices


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="odm-sr-complexity", description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["edsr_baseline"], choices=MODEL_NAMES)
    parser.add_argument("--scale", type=int, default=4, choices=SUPPORTED_SCALES)
    parser.add_argument("--method", nargs="+", default=["odm"], choices=METHODS)
    parser.add_argument("--bits", nargs="+", type=int, default=[2],
                        choices=[b for b in VALID_BITS if b < 32], help="W = A bits, one row each")
    parser.add_argument("--sc-bits", type=int, default=8, choices=list(VALID_BITS),
                        help="bits.sc: skip operands (odm_fq), conv outputs and adds (fqsr); 8 as conf/bits/w*a*.yaml")
    parser.add_argument("--lr-hw", nargs=2, type=int, default=[64, 64], metavar=("H", "W"),
                        help="LR input size for BitOPs (analysis.bitops.lr_hw)")
    parser.add_argument("--rule", default="full", choices=RULES, help="analysis.storage.rule")
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback of an error (also: "
                        "HYDRA_FULL_ERROR=1)")
    parser.add_argument("--no-ddtb-bn", action="store_true",
                        help="leave DDTB's gate BN affine out (analysis.storage.ddtb_count_bn=false)")
    parser.add_argument("--daq-ops-per-elem", type=float, default=4.0,
                        help="analysis.bitops.daq_ops_per_elem")
    return parser.parse_args(argv)


def complexity_row(model_name: str, scale: int, method_name: str, bits: int, args: argparse.Namespace,
                   ) -> dict[str, Any]:
    """Build the model, quantize it with ``method_name`` at W = A = ``bits`` and count."""
    model = build_model(model_name, scale)
    method_cfg = compose_config([f"method={method_name}"], output_dir=".").method  # conf/method/<name>.yaml
    method = build_method(method_cfg, {"w": bits, "a": bits, "sc": args.sc_bits if bits < 32 else 32})
    method.quantize(model)
    ratio = method.gate_ratio()  # DDTB: the dynamic ratio for this backbone
    counts = summarize(model, method_name, bits, args.lr_hw, rule=args.rule, ddtb_count_bn=not args.no_ddtb_bn,
                       daq_ops_per_elem=args.daq_ops_per_elem, dynamic_ratio=ratio)
    return {"model": f"{model_name} x{scale}", "method": method_name, "bits": str(min(bits, 32)),
            **{key.removeprefix("complexity/"): value for key, value in counts.items()}}


def complexity_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per model, method and bit-width; FP once per model."""
    rows = []
    for model_name in args.model:
        for method_name in dict.fromkeys(args.method):
            for bits in [32] if method_name == "fp" else dict.fromkeys(args.bits):
                rows.append(complexity_row(model_name, args.scale, method_name, bits, args))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Print the markdown table (returns None: console scripts pass the return value to ``sys.exit``)."""
    args = parse_args(argv)
    with one_line_errors("odm-sr-complexity", args.traceback):  # e.g. a method that refuses the backbone: one line
        table = complexity_table(complexity_rows(args))
    print(f"LR input {args.lr_hw[0]}x{args.lr_hw[1]}; storage rule {args.rule}\n")
    print(table)


if __name__ == "__main__":
    main()
