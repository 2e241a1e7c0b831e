"""`odm-sr-report`: the PSNR/SSIM table of a run or a sweep folder, with the paper's numbers beside ours.

Example: ``odm-sr-report logs/main --sets Set5 Set14 B100 Urban100`` collects every ``results.json`` below
``logs/main``, prints the markdown table and writes report.md, report.tex, report.json and report.png into
``--out`` (default: the folder itself). Logic: ``odm_sr.analysis.report``.
``odm-sr-report logs/sweeps --mechanism`` instead writes mechanism.{md,json,png}: one table per question of the MR
sweeps (does MR act, cooperative vs naive, ranking of methods, S10 mismatch), ``odm_sr.analysis.mechanism``.
``odm-sr-report logs/sweeps/real_methods logs/sweeps/real_odm_ablation --real [--fp-eval eval.json]`` writes
real.{md,json,png} into the folder the roots share: per network and bit-width, FP, bicubic and every method as mean ±
sd over seeds, and ODM's ablation rows, ``odm_sr.analysis.real``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from odm_sr.analysis.mechanism import write_mechanism_report
from odm_sr.analysis.real import write_real_report
from odm_sr.analysis.report import write_report
from odm_sr.console import one_line_errors


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="odm-sr-report", description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="+", help="a run folder, a sweep folder, or one results.json (--real: one "
                        "or more sweep folders)")
    parser.add_argument("--out", default=None, help="where report.{md,tex,json,png} go (default: ROOT; --real: "
                        "the folder the roots share)")
    parser.add_argument("--sets", nargs="+", default=None,
                        help="columns, in order (default: every set found; Set5 Set14 B100 Urban100 first)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--mechanism", action="store_true",
                      help="the MR-mechanism tables of the mr_* sweeps (mechanism.md/.json/.png) instead")
    mode.add_argument("--real", action="store_true",
                      help="the tables of the real_* sweeps (real.md/.json/.png): mean ± sd over seeds per network "
                      "and bit-width, FP and bicubic rows, S10 mismatch, ρ, ODM ablation rows")
    parser.add_argument("--fp-eval", action="append", default=[], metavar="EVAL_JSON",
                        help="--real: an odm-sr-eval JSON with the FP row of the official weights (used where no "
                        "run has eval.pretrained_row=true); repeatable")
    args = parser.parse_args(argv)
    if not args.real and len(args.root) > 1:
        parser.error(f"{len(args.root)} roots given; only --real reads several (one sweep folder per root)")
    if args.fp_eval and not args.real:
        parser.error("--fp-eval goes with --real")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Print the markdown table (returns None: console scripts pass the return value to ``sys.exit``)."""
    args = parse_args(argv)
    with one_line_errors("odm-sr-report"):  # HYDRA_FULL_ERROR=1: with the traceback
        if args.real:
            report = write_real_report(args.root, args.out, args.fp_eval)
        elif args.mechanism:
            report = write_mechanism_report(args.root[0], args.out)
        else:
            report = write_report(args.root[0], args.out, args.sets)
    print(report["markdown"])
    print("\nwrote " + ", ".join(str(p) for p in report["paths"].values()))


if __name__ == "__main__":
    main()
