"""Peak memory and time of evaluating EDSR-baseline x4 on the largest B100 image: whole image vs tiled.

    PYTHONPATH=src python bench/eval_memory.py [--tile 64] [--overlap 40] [--sizes b100 div2k] [--repeats 3]
    PYTHONPATH=src python bench/eval_memory.py --upscale-side 3000 --tile 128 --overlap 16   # odm-sr-upscale

Both paths are ``odm_sr.evaluation.network_upscale`` (the validation/test path; ``forward_chopped`` when a tile
is set), in eval mode under ``torch.no_grad()``, on CPU. Each measurement runs in a fresh subprocess, so
allocator caches of one run cannot hide the peak of the next:

- **RSS peak**: a thread samples the process RSS (``psutil``) every 0.5 ms during one forward; the figure is
  the peak minus the RSS just before it (after a warm-up forward on a small input, so one-time MKL-DNN /
  OpenMP set-up is not counted). It includes everything the process really touched: tensors, allocator
  slack, convolution workspaces.
- **tensor peak**: ``torch.profiler`` with ``profile_memory=True`` records every CPU tensor allocation and
  free; the running sum of their sizes in time order gives the exact peak of live tensor bytes.
  (``resource.getrusage`` only reports the lifetime maximum RSS, and ``tracemalloc`` does not see torch's
  allocator, hence these two methods.)
- **time**: the median of ``--repeats`` forwards without the profiler.

The tiled output must equal the whole-image output: with ``overlap`` ≥ the network's receptive-field radius
(EDSR-baseline x4: 1 + 33 + 1 LR pixels at LR resolution, plus 3/4 of a pixel in the upsampler, i.e. 36) every
kept output pixel sees the same inputs and zero padding; only float round-off of different conv blockings
remains. ``--sizes b100 div2k`` adds a synthetic LR of DIV2K size (510x339 at x4): how the whole-image peak grows.
Prints a markdown table and writes JSON (default ``bench/results/eval_memory.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import RESULTS_DIR, environment, write_json  # noqa: E402

RECEPTIVE_RADIUS = 36  # EDSR-baseline x4, in LR pixels (see the module docstring)
PEAK_LIMIT_GB = 1.5  # the tiled peak must stay below this


def largest_b100(scale: int) -> tuple[torch.Tensor, str]:
    """The largest B100 LR image at ``scale`` (all are 480x320 HR / 120x80 LR at x4), in [0, 1]."""
    from odm_sr.data.registry import build_source

    source = build_source("B100", "test", scale)
    index = max(range(len(source)), key=lambda i: (source.lr_size(i)[0] * source.lr_size(i)[1], -i))
    return source[index]["lr"][None], f"B100/{source.names[index]}"


def load_input(size: str, scale: int) -> tuple[torch.Tensor, str]:
    if size == "b100":
        return largest_b100(scale)
    gen = torch.Generator().manual_seed(0)  # DIV2K-sized LR (2040x1356 HR at x4), smooth synthetic content
    coarse = torch.rand(1, 3, 43, 64, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(339, 510), mode="bicubic").clamp(0, 1), \
        "synthetic, DIV2K size"


class RssSampler:
    """Peak RSS of this process while active, sampled by a background thread."""

    def __init__(self, interval: float = 0.0005) -> None:
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.peak = self.start = 0
        self.anon_peak = self.anon_start = 0  # RssAnon (Linux): private memory, without the mapped libraries
        self._stop = threading.Event()

    @staticmethod
    def anon() -> int:
        try:
            with open("/proc/self/status") as f:
                return next((int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:")), 0)
        except OSError:
            return 0

    def __enter__(self) -> RssSampler:
        self.start = self.peak = self.proc.memory_info().rss
        self.anon_start = self.anon_peak = self.anon()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.anon_peak = max(self.anon_peak, self.anon())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def tensor_peak_bytes(fn) -> int:
    """Peak of live CPU tensor bytes during ``fn()``, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    from odm_sr.evaluation import network_upscale
    from odm_sr.models import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_model("edsr_baseline", args.scale).eval()
    lr, name = load_input(args.size, args.scale)
    tile = args.tile if args.mode == "tiled" else None
    upscale = network_upscale(net, tile, args.overlap)
    with torch.no_grad():
        upscale(torch.rand(1, 3, 16, 16))  # warm-up: one-time library set-up is not part of the peak
        with RssSampler() as rss:
            out = upscale(lr)
        peak_tensor = tensor_peak_bytes(lambda: upscale(lr))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            upscale(lr)
            times.append(time.perf_counter() - start)
    torch.save(out, args.save)
    print(json.dumps({"image": name, "lr_hw": list(lr.shape[-2:]), "mode": args.mode, "tile": tile,
                      "overlap": args.overlap if tile else None, "rss_peak_mb": (rss.peak - rss.start) / 2**20,
                      "rss_before_mb": rss.start / 2**20, "tensor_peak_mb": peak_tensor / 2**20,
                      "seconds": statistics.median(times), "times": times}))


def upscale_child(args: argparse.Namespace) -> None:
    """``odm-sr-upscale``'s path (``upscale.upscale_image``: read the PNG, tiled forward into a uint8 buffer,
    atomic PNG write) on a synthetic ``--upscale-side``² LR PNG, EDSR-baseline with random weights; prints JSON."""
    import numpy as np
    from PIL import Image

    from odm_sr.models import build_model
    from odm_sr.upscale import upscale_image

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_model("edsr_baseline", args.scale).eval()
    side = args.upscale_side
    src, dst = Path(args.save).with_suffix(".in.png"), Path(args.save).with_suffix(".out.png")
    rng = np.random.default_rng(0)  # smooth content (a random-noise PNG would be an unusually large file)
    coarse = torch.from_numpy(rng.random((1, 3, side // 16 + 1, side // 16 + 1), dtype=np.float32))
    img = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic").clamp(0, 1)
    Image.fromarray((img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(src)
    del coarse, img
    small = src.with_name("small.png")
    Image.fromarray(np.zeros((args.tile + 8, args.tile + 8, 3), dtype=np.uint8)).save(small)
    with torch.no_grad():
        upscale_image(net, small, dst.with_name("warmup.png"), args.tile, args.overlap)  # one-time set-up
        start = time.perf_counter()
        with RssSampler(interval=0.005) as rss:
            upscale_image(net, src, dst, args.tile, args.overlap)
        seconds = time.perf_counter() - start
    print(json.dumps({"lr_side": side, "scale": args.scale, "tile": args.tile, "overlap": args.overlap,
                      "threads": args.threads, "rss_peak_mb": rss.peak / 2**20,
                      "rss_before_mb": rss.start / 2**20, "rss_anon_peak_mb": rss.anon_peak / 2**20,
                      "rss_anon_before_mb": rss.anon_start / 2**20, "seconds": seconds,
                      "output_uint8_mb": 3 * (args.scale * side) ** 2 / 2**20,
                      "output_png_mb": dst.stat().st_size / 2**20}))


def measure_upscale(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--_upscale_child", "--upscale-side", str(args.upscale_side), "--tile",
               str(args.tile), "--overlap", str(args.overlap), "--threads", str(args.threads), "--scale",
               str(args.scale), "--save", str(Path(tmp) / "x")]
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if res.returncode != 0:
            raise RuntimeError(f"upscale {args.upscale_side}: failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])


def measure(size: str, mode: str, args: argparse.Namespace, tmp: Path) -> tuple[dict, torch.Tensor]:
    save = tmp / f"{size}_{mode}.pt"
    cmd = [sys.executable, __file__, "--_child", "--size", size, "--mode", mode, "--tile", str(args.tile),
           "--overlap", str(args.overlap), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--scale", str(args.scale), "--save", str(save)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if res.returncode != 0:
        raise RuntimeError(f"{size}/{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1]), torch.load(save)


def markdown(rows: list[dict]) -> str:
    lines = ["| image (LR) | mode | RSS peak MB | tensor peak MB | time s | max abs diff vs whole |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mode = r["mode"] if r["tile"] is None else f"tiled {r['tile']} + {r['overlap']} overlap"
        diff = "" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.2e}" + \
            (" (uint8 equal)" if r["uint8_equal"] else f" ({r['uint8_differing']} uint8 values differ by 1)")
        lines.append(f"| {r['image']} ({r['lr_hw'][1]}x{r['lr_hw'][0]}) | {mode} | {r['rss_peak_mb']:.0f} | "
                     f"{r['tensor_peak_mb']:.0f} | {r['seconds']:.2f} | {diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tile", type=int, default=64, help="LR tile side kept per run")
    p.add_argument("--overlap", type=int, default=40, help=f"LR context per side (≥ {RECEPTIVE_RADIUS} for "
                                                             "an exact match)")
    p.add_argument("--sizes", nargs="+", default=["b100"], choices=["b100", "div2k"],
                   help="div2k: also a DIV2K-sized synthetic LR (slow on CPU: about 15 min at 1 thread)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "eval_memory.json")
    p.add_argument("--upscale-side", type=int, default=None,
                   help="instead: peak RSS of odm-sr-upscale --tile on a synthetic side x side LR PNG "
                        "(the whole process, absolute; e.g. --upscale-side 3000 --tile 128)")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_upscale_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", default="b100", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="whole", help=argparse.SUPPRESS)
    p.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        return child(args)
    if args._upscale_child:
        return upscale_child(args)
    if args.upscale_side:
        return report_upscale(args)
    if args.overlap < RECEPTIVE_RADIUS:
        print(f"warning: overlap {args.overlap} < receptive-field radius {RECEPTIVE_RADIUS}: tiles will differ")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            whole, out_whole = measure(size, "whole", args, Path(tmp))
            tiled, out_tiled = measure(size, "tiled", args, Path(tmp))
            diff = (out_whole - out_tiled).abs().max().item()
            as_uint8 = lambda t: (t * 255).round().clamp(0, 255).to(torch.uint8)  # noqa: E731
            flips = int((as_uint8(out_whole) != as_uint8(out_tiled)).sum())
            tiled.update(max_abs_diff=diff, uint8_differing=flips, uint8_equal=flips == 0)
            rows += [whole, tiled]
            print(f"{size}: whole {whole['rss_peak_mb']:.0f} MB / {whole['seconds']:.2f} s, tiled "
                  f"{tiled['rss_peak_mb']:.0f} MB / {tiled['seconds']:.2f} s, max abs diff {diff:.2e}", flush=True)
            assert diff < 1e-4, f"{size}: tiled output differs from the whole image by {diff}"
            peak_gb = max(tiled["rss_peak_mb"], tiled["tensor_peak_mb"]) / 1024
            assert peak_gb < PEAK_LIMIT_GB, f"{size}: tiled peak {peak_gb:.2f} GB ≥ {PEAK_LIMIT_GB} GB"
    print("\n" + markdown(rows) + "\n")
    write_json(args.out, {"model": "edsr_baseline", "scale": args.scale, "threads": args.threads,
                          "rows": rows, "env": environment(), "peak_limit_gb": PEAK_LIMIT_GB})


def report_upscale(args: argparse.Namespace) -> None:
    row = measure_upscale(args)
    print(f"odm-sr-upscale --tile {row['tile']}: LR {row['lr_side']}^2 x{row['scale']}: peak RSS "
          f"{row['rss_peak_mb']:.0f} MB ({row['rss_before_mb']:.0f} before), private (RssAnon) "
          f"{row['rss_anon_peak_mb']:.0f} MB ({row['rss_anon_before_mb']:.0f} before); uint8 output "
          f"{row['output_uint8_mb']:.0f} MB; {row['seconds']:.0f} s")
    out = args.out if args.out != RESULTS_DIR / "eval_memory.json" else \
        RESULTS_DIR / f"upscale_memory_{args.upscale_side}.json"
    write_json(out, {"model": "edsr_baseline", **row, "env": environment(), "peak_limit_gb": PEAK_LIMIT_GB})
    # as for the tiled eval rows: what the upscale adds to the process (imports and torch's libraries excluded)
    grown = row["rss_peak_mb"] - row["rss_before_mb"]
    assert grown / 1024 < PEAK_LIMIT_GB, f"peak - before = {grown:.0f} MB ≥ {PEAK_LIMIT_GB} GB"


if __name__ == "__main__":
    main()
