"""Training-step time of FP, PAMS, DAQ, DDTB and ODM (2-bit, each with its own loss), as ratios to the FP step.

    PYTHONPATH=src python bench/step_time.py [--model small|baseline|both] [--steps N] [--warmup N] [--compile]
    PYTHONPATH=src python bench/step_time.py --device cuda --duration 60     # the GPU check (gpu_check.sh)

One step is what ``SRLitModule.training_step`` does, without Lightning (``bench/_common.StepRunner``):
forward = ``method.training_losses`` (student forward, the FP teacher forward of PAMS/DDTB, the losses),
backward = ``method.backward`` (ODM: the two autograd passes and the cooperative combination), then the Adam
step. PAMS is timed after its α-tracking epoch (α clips), DDTB in its final stage (after the calibration epoch,
gates used), ODM after its percentile calibration. ``quant_only`` is ODM with ``mr.mode=off``: quantizers but
no teacher and no extra loss.

CPU timings on a shared machine are noisy, so the variants are interleaved (one step of each per round, the
order rotated every round); "× FP" is the median over rounds of t_variant / t_FP of the same round, "× FP
(medians)" the ratio of the two median step times (both are in the JSON, with every step time).
Prints a markdown table and writes JSON (default ``bench/results/step_time_<model>.json``).
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # process start, for the GPU check's --budget (imports count against it)

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import (  # noqa: E402
    MODELS,
    RESULTS_DIR,
    VARIANTS,
    StepRunner,
    TeacherRunner,
    environment,
    median_ms,
    sample_batches,
    sync,
    write_json,
)

TARGETS = {"pams": 1.35, "ddtb": 1.6, "odm": 2.0, "quant_only": 1.15}  # × FP (the issue); ODM also ≤ 1.5× PAMS
OFFICIAL = {"pams": 1.5, "ddtb": 2.3}  # × FP measured with the released PAMS / DDTB code (the issue)
LABELS = {"fp": "FP", "pams": "PAMS", "daq": "DAQ", "ddtb": "DDTB (gates used)", "odm": "ODM",
          "quant_only": "quantizers only (ODM, mr.mode=off)",
          "teacher": "(PAMS/DDTB teacher forward to F alone)"}


def compile_runner(runner: StepRunner, recompile_limit: int | None = None, backend: str = "inductor") -> None:
    """torch.compile the student in place (``nn.Module.compile``): the method code keeps calling the same
    module object, so hooks (SKT capture) and ``modules()`` walks keep working. ``backend``: torch.compile's
    (``aot_eager`` traces the same graphs, breaks included, without generating kernels).

    The quantizers' Python-side branches (ODM's mismatch registry, DAQ's post-ReLU test, DDTB's gates) break
    the graph, and each quantizer instance then compiles its own frame; past dynamo's recompile limit (8) the
    rest run eager. ``recompile_limit`` raises it (the GPU check does, for ODM's 32 quantizers); not for DAQ,
    whose resumed frame recompiles on every call and would never settle.
    """
    if recompile_limit is not None:
        import torch._dynamo

        for key in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, key):
                setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), recompile_limit))
    runner.net.compile(backend=backend)
    if runner.teacher is not None:
        runner.teacher.compile(backend=backend)


def build_runners(model: str, variants: list[str], device: torch.device, compiled: bool,
                  batches: list) -> dict[str, StepRunner]:
    runners = {}
    for name in variants:
        if compiled and name == "teacher":  # eager only: its forward is stopped by an exception in a hook
            continue
        torch.manual_seed(0)
        runner = (TeacherRunner if name == "teacher" else StepRunner).build(name, model, device)
        if compiled:
            compile_runner(runner)
        runner.prepare(batches[:2])
        runners[name] = runner
    return runners


def interleaved(runners: dict[str, StepRunner], batches: list, steps: int, warmup: int) -> None:
    names = list(runners)
    for r in range(warmup + steps):
        lr, hr = batches[r % len(batches)]
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            runners[name].step(lr, hr, record=r >= warmup)


def paired_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def summarize(runners: dict[str, StepRunner], tag: str = "") -> dict[str, dict]:
    fp = runners["fp"].times["total"]
    rows = {}
    for name, runner in runners.items():
        t = runner.times
        rows[name + tag] = {
            "label": LABELS[name] + (f" [{tag.strip('+')}]" if tag else ""),
            "total_ms": median_ms(t["total"]), "forward_ms": median_ms(t["forward"]),
            "backward_ms": median_ms(t["backward"]), "optimizer_ms": median_ms(t["optimizer"]),
            "x_fp": paired_ratio(t["total"], fp), "x_fp_of_medians": median_ms(t["total"]) / median_ms(fp),
            "steps": len(t["total"]), "total_ms_all": [1000.0 * v for v in t["total"]],
        }
    if "pams" in runners and "odm" in runners:
        rows["odm" + tag]["x_pams"] = paired_ratio(runners["odm"].times["total"], runners["pams"].times["total"])
    return rows


def markdown(model: str, rows: dict[str, dict]) -> str:
    spec = MODELS[model]
    lines = [f"**{model}** (batch {spec['batch']}, LR patch {spec['lr_patch']}, x4, 2-bit)", "",
             "| variant | step ms | × FP | × FP (medians) | target | fwd ms | bwd ms | opt ms |",
             "|---|---|---|---|---|---|---|---|"]
    for key, row in rows.items():
        name = key.split("+")[0]
        target = f"≤ {TARGETS[name]}" if name in TARGETS else ""
        if name in OFFICIAL:
            target += f" (official {OFFICIAL[name]})"
        ratio = f"{row['x_fp']:.2f}"
        if "x_fp_eager" in row:
            ratio += f" ({row['x_fp_eager']:.2f}× eager FP)"
        if "x_pams" in row:
            ratio += f" ({row['x_pams']:.2f}× PAMS)"
            target += "; ≤ 1.5× PAMS"
        lines.append(f"| {row['label']} | {row['total_ms']:.1f} | {ratio} | {row['x_fp_of_medians']:.2f} | {target} | "
                     f"{row['forward_ms']:.1f} | {row['backward_ms']:.1f} | {row['optimizer_ms']:.1f} |")
    return "\n".join(lines)


def cpu_benchmark(model: str, variants: list[str], steps: int, warmup: int, compile_too: bool,
                  device: torch.device) -> dict:
    spec = MODELS[model]
    batches = sample_batches(8, spec["batch"], spec["lr_patch"], 4, device)
    runners = build_runners(model, variants, device, False, batches)
    compiled = build_runners(model, variants, device, True, batches) if compile_too else {}
    start = time.perf_counter()
    # eager and compiled runners interleaved in one loop; extra warm-up rounds let the compiled ones compile
    interleaved({**runners, **{f"{k}+compile": v for k, v in compiled.items()}}, batches, steps,
                warmup + (3 if compile_too else 0))
    rows = summarize(runners)
    if compile_too:
        crow = summarize(compiled, "+compile")
        eager_fp = runners["fp"].times["total"]
        for name, runner in compiled.items():  # also relative to the eager FP step of the same rounds
            crow[name + "+compile"]["x_fp_eager"] = paired_ratio(runner.times["total"], eager_fp)
        rows.update(crow)
    return {"model": model, "batch": spec["batch"], "lr_patch": spec["lr_patch"], "scale": 4, "bits": 2,
            "steps": steps, "warmup": warmup, "seconds": time.perf_counter() - start, "rows": rows}


# -- GPU check (bench/gpu_check.sh) ------------------------------------------------------------------------------
def gpu_check(duration: float, variants: list[str], batch: int, lr_patch: int, modes: list[str],
              budget: float | None = None) -> dict:
    """Steps of EDSR-baseline x4 for ``duration`` seconds per variant and mode (eager / torch.compile):
    it/s, median step time and peak memory (``torch.cuda.max_memory_allocated``). ``budget`` (seconds for the
    whole call) shortens the timed window so that a hard ``timeout`` around the call is never hit."""
    if not torch.cuda.is_available():
        sys.exit("gpu check: CUDA is not available (torch.cuda.is_available() is False); run it on a GPU "
                 "machine: `bash bench/gpu_check.sh` from the repository root")
    start_all = _T0
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    batches = sample_batches(8, batch, lr_patch, 4, device)
    runs = [(mode, name) for mode in modes for name in variants]
    results = {}
    for i, (mode, name) in enumerate(runs):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        runner = StepRunner.build(name, "baseline", device)
        if mode == "compile":
            compile_runner(runner, recompile_limit=256)
        runner.prepare(batches[:2])
        t_warm = time.perf_counter()
        for j in range(5):  # the first compiled steps compile (forward and both backward passes)
            runner.step(*batches[j % len(batches)], record=False)
        sync(device)
        warm_s = time.perf_counter() - t_warm
        window = duration
        if budget is not None:  # what is left, shared by the remaining runs, minus a safety margin
            left = budget - (time.perf_counter() - start_all) - 10.0
            window = max(5.0, min(duration, left / (len(runs) - i)))
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < window:
            runner.step(*batches[n % len(batches)])
            n += 1
        sync(device)
        elapsed = time.perf_counter() - start
        key = f"{name}/{mode}"
        results[key] = {"it_per_s": n / elapsed, "steps": n, "seconds": elapsed,
                        "step_ms": median_ms(runner.times["total"]),
                        "forward_ms": median_ms(runner.times["forward"]),
                        "backward_ms": median_ms(runner.times["backward"]),
                        "optimizer_ms": median_ms(runner.times["optimizer"]),
                        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30, "warmup_s": warm_s}
        r = results[key]
        print(f"{key:14s} {r['it_per_s']:7.2f} it/s  step {r['step_ms']:7.2f} ms (fwd {r['forward_ms']:.2f}, "
              f"bwd {r['backward_ms']:.2f}, opt {r['optimizer_ms']:.2f})  peak {r['peak_mem_gib']:.2f} GiB  "
              f"{n} steps in {elapsed:.0f} s, warm-up {warm_s:.1f} s", flush=True)
        del runner
    return {"device": torch.cuda.get_device_name(), "batch": batch, "lr_patch": lr_patch, "results": results}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("small", "baseline", "both"), default="both")
    p.add_argument("--steps", type=int, default=20, help="timed rounds (one step of every variant per round)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd networks")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU check")
    p.add_argument("--duration", type=float, default=60.0, help="GPU check: seconds per variant and mode")
    p.add_argument("--batch", type=int, default=8, help="GPU check: batch (ODM recipe: 8)")
    p.add_argument("--lr-patch", type=int, default=48, help="GPU check: LR patch (ODM recipe: 48)")
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"],
                   help="GPU check: eager and/or torch.compile")
    p.add_argument("--budget", type=float, default=None, help="GPU check: seconds for the whole call")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for CPU runs (default 1: on a shared 2-core box two OpenMP threads "
                        "stall whenever the other core is busy, which distorts the ratios; 0 = torch's default)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    args = p.parse_args(argv)
    if args.threads and not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        gpu_vars = [v for v in args.variants if v in ("fp", "odm")] if args.variants == list(VARIANTS) \
            else args.variants
        payload = gpu_check(args.duration, gpu_vars, args.batch, args.lr_patch, args.modes, args.budget)
        payload["env"] = environment()
        write_json(args.out or RESULTS_DIR / "gpu_check.json", payload)
        return
    if "fp" not in args.variants:
        args.variants.insert(0, "fp")
    models = ["small", "baseline"] if args.model == "both" else [args.model]
    for model in models:
        result = cpu_benchmark(model, args.variants, args.steps, args.warmup, args.compile, torch.device("cpu"))
        result["env"] = environment()
        print("\n" + markdown(model, result["rows"]) + "\n", flush=True)
        out = args.out if args.out and len(models) == 1 else None
        if args.out and len(models) > 1:
            out = args.out.with_name(f"{args.out.stem}_{model}{args.out.suffix}")
        write_json(out or RESULTS_DIR / f"step_time_{model}.json", result)


if __name__ == "__main__":
    main()
