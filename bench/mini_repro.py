"""CPU-sized reproduction of the paper's comparison (METHODS.md §8 main table) on the small EDSR x4.

    PYTHONPATH=src python bench/mini_repro.py                       # defaults: 30 min on 2 cores (~75 loaded)
    PYTHONPATH=src python bench/mini_repro.py --fp-steps 20 --qat-steps 10 --bits 2 --out /tmp/mr   # smoke test

1. FP: the small EDSR (4 blocks x 32 features) trained from scratch on T91 + BSD200 (``data=sr291``) for
   ``--fp-steps`` steps (Adam ``--fp-lr``, x0.5 at 70 %).
2. QAT: PAMS, DAQ, DDTB and ODM at each of ``--bits``, each from that FP checkpoint (``model.pretrained``) with
   the same budget of ``--qat-steps`` optimizer steps, its own loss and quantizers, Adam 1e-4 (each method's own
   quantizer-parameter lr), x0.5 at 70 %. ``data.iters_per_epoch`` = qat_steps / 10, so each method's epoch-based
   stages fit the budget as in the released schedules: PAMS tracks α in the first 10 %; DDTB calibrates in an
   extra 10 % of forward-only iterations (no optimizer steps, as its released epoch 1), regularises its gates for
   the next 40 % and uses them for the last 60 %; ODM calibrates its ranges on ``--calibration-batches`` batches.
3. Every stage is ``odm_sr.train.train(cfg)`` on a config composed from ``conf/`` (``trainer=cpu logger=csv``),
   tested on Set5 / Set14 / B100 (MATLAB-convention Y PSNR / SSIM); validation during training is off.

A stage whose ``results.json`` exists is skipped, so an interrupted run resumes at the stage it was in. The
paper-style table (bicubic and FP rows first) is written to ``<out>.md`` and ``<out>.json``.

sr291 at x4: T91's smallest image (t20, 78x78) gives a 19x19 LR image, and the patch sampler refuses patches
larger than any image, so a requested ``--lr-patch`` above the smallest LR side is lowered to it and the batch
raised to keep the LR pixels per step (24x24x8 → 19x19x13).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import RESULTS_DIR, compose_cfg, environment  # noqa: E402

METHODS = ("pams", "daq", "ddtb", "odm")
LABELS = {"pams": "PAMS", "daq": "DAQ", "ddtb": "DDTB", "odm": "ODM"}
SETS = ("Set5", "Set14", "B100")


def fit_patch(lr_patch: int, batch: int, scale: int) -> tuple[int, int]:
    """The largest LR patch sr291 allows at ``scale`` (≤ ``lr_patch``) and a batch with as many LR pixels."""
    from odm_sr.data.registry import build_source

    source = build_source("sr291", "train", scale)
    smallest = min(min(source.lr_size(i)) for i in range(len(source)))
    if lr_patch <= smallest:
        return lr_patch, batch
    fitted = smallest
    new_batch = max(batch, round(batch * lr_patch**2 / fitted**2))
    print(f"sr291 at x{scale}: the smallest LR image is {smallest}x{smallest}; LR patch {lr_patch} -> {fitted}, "
          f"batch {batch} -> {new_batch} (same LR pixels per step)", flush=True)
    return fitted, new_batch


def common_overrides(args: argparse.Namespace, steps: int, iters_per_epoch: int, lr: float) -> list[str]:
    milestone = max(1, int(0.7 * steps))
    return ["model=edsr_small", "model.scale=4", "data=sr291", "trainer=cpu", "logger=csv",
            f"data.lr_patch={args.lr_patch}", f"data.batch_size={args.batch}",
            f"data.num_workers={args.workers}", f"data.iters_per_epoch={iters_per_epoch}",
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={iters_per_epoch}",
            "+trainer.limit_val_batches=0", f"trainer.enable_progress_bar={str(args.progress).lower()}",
            f"trainer.log_every_n_steps={max(1, min(50, steps // 10))}",
            f"callbacks.model_checkpoint.every_n_train_steps={steps}",
            f"optim.lr={lr}", f"optim.milestones=[{milestone}]", f"seed={args.seed}",
            "auto_resume=true"]  # a stage stopped before its results.json continues from its last.ckpt


def stage_overrides(args: argparse.Namespace, method: str, bits: int, fp_ckpt: Path) -> list[str]:
    if method == "fp":
        ipe = min(1000, args.fp_steps)
        return common_overrides(args, args.fp_steps, ipe, args.fp_lr) + ["method=fp", "bits=fp32"]
    ipe = max(1, args.qat_steps // 10)
    extra = [f"method={method}", f"bits=w{bits}a{bits}", f"model.pretrained={fp_ckpt}", "eval.bicubic_row=false"]
    if method == "odm":
        extra.append(f"method.init.num_batches={args.calibration_batches}")
    return common_overrides(args, args.qat_steps, ipe, args.qat_lr) + extra


def run_stage(name: str, overrides: list[str], out_dir: Path) -> dict:
    """``train(cfg)`` in ``out_dir`` unless its results.json exists; returns the results dict."""
    from odm_sr.files import write_json
    from odm_sr.train import train

    results = out_dir / "results.json"
    if results.is_file():
        print(f"[{name}] done before: {results}", flush=True)
        return json.loads(results.read_text())
    print(f"[{name}] training: {' '.join(overrides)}", flush=True)
    cfg = compose_cfg(overrides, out_dir)
    start = time.perf_counter()
    result = train(cfg)
    result["stage_seconds"] = time.perf_counter() - start
    # train() wrote it already; add the stage wall time (atomically: the file marks the stage as done)
    write_json(results, result)
    print(f"[{name}] {result['stage_seconds']:.0f} s", flush=True)
    return result


def row_metrics(result: dict, row: str | None = None) -> dict[str, list[float]]:
    """{set: [psnr, ssim]} of ``row`` (default: the run's own row) in a results dict."""
    metrics = result.get("metrics", {})
    key = row if row is not None else result.get("run_name")
    per_set = metrics.get(key) or next((v for k, v in metrics.items() if k != "bicubic"), {})
    return {s: [per_set[s]["psnr"], per_set[s]["ssim"]] for s in SETS if s in per_set}


def paper_set5(method: str, bits: int) -> float | None:
    """The paper's main-table Set5 PSNR of EDSR-baseline x4 (METHODS.md §8), for orientation only."""
    from odm_sr.analysis.paper import paper_entry

    entry = paper_entry("edsr_baseline", 4, method, "fp32" if bits == 32 else f"w{bits}a{bits}")
    return entry.sets["Set5"][0] if entry is not None and entry.source == "main" else None


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Small EDSR x4 (4 blocks x 32 features) on T91 + BSD200, CPU: FP {args.fp_steps} steps, QAT "
             f"{args.qat_steps} optimizer steps per method, batch {args.batch}, LR patch {args.lr_patch}. "
             "PSNR/SSIM on Y (MATLAB convention), scale-pixel border crop.", "",
             "| method | bits | " + " | ".join(SETS) + " | train min | paper Set5 (EDSR-baseline, DIV2K) |",
             "|---|---|" + "---|" * len(SETS) + "---|---|"]
    for r in rows:
        cells = [f"{r['metrics'][s][0]:.2f}/{r['metrics'][s][1]:.4f}" if s in r["metrics"] else "–" for s in SETS]
        minutes = "" if r.get("seconds") is None else f"{r['seconds'] / 60:.1f}"
        paper = paper_set5(r["method"], r["bits"])
        bits = "–" if r["method"] == "bicubic" else ("32" if r["bits"] == 32 else str(r["bits"]))
        lines.append(f"| {r['label']} | {bits} | " + " | ".join(cells) +
                     f" | {minutes} | {'' if paper is None else f'{paper:.2f}'} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fp-steps", type=int, default=1500)
    p.add_argument("--qat-steps", type=int, default=300)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 2], choices=[2, 3, 4, 8])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--lr-patch", type=int, default=24)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--fp-lr", type=float, default=5e-4)
    p.add_argument("--qat-lr", type=float, default=1e-4)
    p.add_argument("--calibration-batches", type=int, default=20, help="ODM's range-init batches (paper: 100)")
    p.add_argument("--workers", type=int, default=1, help="data loader workers")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: robust on a shared 2-core machine; 0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                   help="Lightning's progress bars (default: on in a terminal, off when stderr is a file)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "mini_repro",
                   help="run folder (one sub-folder per stage); the table goes to <out>.md and <out>.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.lr_patch, args.batch = fit_patch(args.lr_patch, args.batch, 4)
    start = time.perf_counter()
    fp = run_stage("fp", stage_overrides(args, "fp", 32, Path()), args.out / "fp")
    fp_ckpt = args.out / "fp" / "checkpoints" / "last.ckpt"
    if not fp_ckpt.is_file():
        raise FileNotFoundError(f"the FP stage left no checkpoint at {fp_ckpt}")
    rows = [{"label": "Bicubic", "method": "bicubic", "bits": 32, "metrics": row_metrics(fp, "bicubic")},
            {"label": "FP", "method": "fp", "bits": 32, "metrics": row_metrics(fp),
             "seconds": fp.get("train_seconds")}]
    for bits in sorted(args.bits, reverse=True):
        for method in args.methods:
            name = f"w{bits}a{bits}_{method}"
            result = run_stage(name, stage_overrides(args, method, bits, fp_ckpt), args.out / name)
            rows.append({"label": LABELS[method], "method": method, "bits": bits, "metrics": row_metrics(result),
                         "seconds": result.get("train_seconds"), "steps": result.get("steps")})
    table = markdown(rows, args)
    print("\n" + table + "\n")
    md, js = args.out.with_suffix(".md"), args.out.with_suffix(".json")
    md.write_text(table + "\n")
    js.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()},
                              "total_seconds": time.perf_counter() - start, "env": environment()}, indent=2))
    print(f"wrote {md} and {js} ({(time.perf_counter() - start) / 60:.1f} min)")
    if not all(math.isfinite(v[0]) for r in rows for v in r["metrics"].values()):
        sys.exit("some PSNR values are not finite")


if __name__ == "__main__":
    main()
