"""Repeated speed rounds of one speed model's graphs (the noise of ``export_bench.py``'s single figures).

    taskset -c 0,1 python bench/export_repeat.py [--model edsr_baseline_x4_odm_w2a2] [--threads 1 2]
                                                 [--runs 20] [--rounds 3]

The graphs of ``export_bench.speed``: ORT FP (as exported), ORT FP with the composed tail (``export.tail``), the
exact integer graph and the opt-in fast graph (ranges from 2 random images: speed only), built once from the same
random weights; per thread count, ``--rounds`` rounds of ``--runs`` interleaved runs (order rotated) after 2
warm-ups, each round's medians and speed ratios printed with the 1-minute load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401 - puts src/ on sys.path when odm_sr is not installed
import torch
from export_bench import SPEED_MODELS, speed_model

from odm_sr.export.fast import fast_model
from odm_sr.export.integer import extract_spec, integer_model
from odm_sr.export.onnx_graph import to_onnx
from odm_sr.export.runtime import session


def graphs(name: str, tmp: Path) -> tuple[dict[str, bytes], object]:
    fp, net, side = speed_model(name, tmp)
    int_model = integer_model(net, extract_spec(net))
    calib = [torch.rand(1, 3, 48, 48) * float(net.pixel_range) for _ in range(2)]
    built = {"fp": to_onnx(fp, (side, side), compose=False), "fp_composed": to_onnx(fp, (side, side)),
             "int": to_onnx(int_model, (side, side)), "fast": to_onnx(fast_model(int_model, calib), (side, side))}
    return built, (torch.rand(1, 3, side, side) * float(net.pixel_range)).numpy()


def rounds(built: dict[str, bytes], x, threads: int, runs: int, count: int) -> list[dict[str, float]]:
    sessions = {k: session(g, threads) for k, g in built.items()}
    names, out = list(sessions), []
    for r in range(count):
        times = {k: [] for k in names}
        for i in range(runs + 2):
            for k in names[i % len(names):] + names[:i % len(names)]:
                t0 = time.perf_counter()
                sessions[k].run(None, {"lr": x})
                if i >= 2:
                    times[k].append(time.perf_counter() - t0)
        med = {k: 1000 * statistics.median(v) for k, v in times.items()}
        out.append(med)
        print(f"threads {threads} round {r}: " + " ".join(f"{k} {v:.0f} ms" for k, v in med.items())
              + f" | vs ORT FP: int {med['fp'] / med['int']:.2f}x, fast {med['fp'] / med['fast']:.2f}x, "
              f"FP composed {med['fp'] / med['fp_composed']:.2f}x | vs FP composed: int "
              f"{med['fp_composed'] / med['int']:.2f}x, fast {med['fp_composed'] / med['fast']:.2f}x | load "
              f"{os.getloadavg()[0]:.1f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="edsr_baseline_x4_odm_w2a2",
                        choices=[m for m in SPEED_MODELS if not m.startswith("swinir")])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    built, x = graphs(args.model, Path(tempfile.mkdtemp()))
    for threads in args.threads:
        rounds(built, x, threads, args.runs, args.rounds)


if __name__ == "__main__":
    main()
