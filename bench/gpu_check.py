"""The GPU check: what the package does on an H100/H200, in one process that fits a fixed budget.

    python3 bench/gpu_check.py [--budget 270] [--out bench/results/gpu_check.json]   # via bench/gpu_check.sh
    python3 bench/gpu_check.py --dry-run                                               # every part, 1 step, CPU

Parts, in order (the JSON is rewritten after each one, so a run killed by its time limit keeps the earlier parts):

1. ``env``: GPU, torch, driver; the third-party modules the run imported (what the machine must provide).
2. ``counts``: aten ops and host syncs of one training step of FP and ODM on the device (``bench/op_count.py``).
3. ``eager``: FP / PAMS / DAQ / DDTB / ODM (2-bit) steps of EDSR-baseline x4 at the ODM recipe's batch 8 and LR
   patch 48: median step time, it/s, peak memory (``torch.cuda.max_memory_allocated``).
4. ``rho``: does MR act at this scale? EDSR-baseline x4 trained in FP for ``--fp-steps`` steps on B100 patches,
   then ``--qat-steps`` steps of ODM (λ_M = 1e-5) and of ODM with MR off from it: ρ = λ_M·w·‖g_M‖/‖g_R‖ over the
   run (first, last, mean) and the L1 of both on held-out patches (fewer steps if the budget runs short).
5. ``compiled``: FP and ODM with ``torch.compile`` of the student (compile time, step time, graph breaks); last,
   as the compilation is the least predictable part; skipped when less than ``--compile-min`` seconds are left.

``--dry-run`` uses the small EDSR (4 blocks x 32) instead of EDSR-baseline, tiny batches and one step per part, and
compiles with the ``aot_eager`` backend (dynamo's tracing, AOTAutograd and graph breaks as on the GPU, no kernel
generation: the CPU's C++ kernels would be another code path than the GPU's Triton and take a minute to build).

Each part gets a share of what is left of ``--budget`` (seconds, imports included) and shortens its own timed
window to fit; a part that fails records its error and the next part runs.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import RESULTS_DIR, StepRunner, environment, median_ms, sample_batches, sync, write_json  # noqa: E402

METHODS = ("fp", "pams", "daq", "ddtb", "odm")
STDLIB = set(getattr(sys, "stdlib_module_names", ()))


def third_party_modules() -> list[str]:
    """Top-level modules imported so far that are neither the standard library nor odm_sr / this folder."""
    local = {"odm_sr", "_common", "op_count", "step_time", "gpu_check", "__main__"}
    names = {m.split(".")[0] for m in sys.modules}
    return sorted(n for n in names if n not in STDLIB and n not in local and not n.startswith("_")
                  and len(n) < 40)  # inductor's generated kernel modules have 50-character hash names


class Check:
    """The budget, the device and the JSON that grows part by part."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.out = Path(args.out)
        self.model = "small" if self.dry else "baseline"
        self.results: dict = {"dry_run": self.dry, "budget_s": args.budget, "parts": {}}

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - _T0)

    def window(self, share: float) -> float:
        """Seconds of timed steps for one measurement that takes ``share`` of what is left."""
        return 0.0 if self.dry else max(2.0, min(self.args.duration, share * (self.left() - 10.0)))

    def batches(self, n: int = 8, batch: int | None = None, lr_patch: int | None = None) -> list:
        batch = 2 if self.dry else (batch or self.args.batch)
        lr_patch = 12 if self.dry else (lr_patch or self.args.lr_patch)
        return sample_batches(n, batch, lr_patch, 4, self.device)

    def run(self, name: str, fn) -> None:
        start = time.perf_counter()
        print(f"== {name} ({self.left():.0f} s left)", flush=True)
        try:
            result = fn(self)
        except Exception as err:  # noqa: BLE001 - recorded, and the next part still runs
            traceback.print_exc()
            result = {"error": f"{type(err).__name__}: {err}"[:500]}
        result["seconds"] = time.perf_counter() - start
        self.results["parts"][name] = result
        self.results["env"] = {**environment(), "third_party_modules": third_party_modules()}
        write_json(self.out, self.results)


def part_env(check: Check) -> dict:
    info = {"cuda": torch.cuda.is_available(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                    memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
    return info


def part_counts(check: Check) -> dict:
    from op_count import profile_step

    batches = check.batches(3)
    rows = {}
    for name in ("fp", "odm"):
        runner = StepRunner.build(name, check.model, check.device)
        runner.prepare(batches[:2])
        runner.step(*batches[2])
        rows[name] = profile_step(runner, *batches[2])
        print(f"{name}: {rows[name]['ops']} ops fwd+bwd, {rows[name]['syncs']} host syncs", flush=True)
    return rows


def _timed(check: Check, runner: StepRunner, batches: list, share: float) -> dict:
    for j in range(1 if check.dry else 5):  # warm-up (the compiled ones compile here)
        runner.step(*batches[j % len(batches)], record=False)
    sync(check.device)
    window, n, start = check.window(share), 0, time.perf_counter()
    while n == 0 or time.perf_counter() - start < window:
        runner.step(*batches[n % len(batches)])
        n += 1
    sync(check.device)
    elapsed = time.perf_counter() - start
    mem = torch.cuda.max_memory_allocated(check.device) / 2**30 if check.device.type == "cuda" else None
    return {"steps": n, "it_per_s": n / elapsed, "step_ms": median_ms(runner.times["total"]),
            "forward_ms": median_ms(runner.times["forward"]), "backward_ms": median_ms(runner.times["backward"]),
            "optimizer_ms": median_ms(runner.times["optimizer"]), "peak_mem_gib": mem}


def _fresh(check: Check) -> None:
    if check.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(check.device)


def part_eager(check: Check) -> dict:
    batches, rows = check.batches(), {}
    for i, name in enumerate(METHODS):
        _fresh(check)
        runner = StepRunner.build(name, check.model, check.device)
        runner.prepare(batches[:2])
        rows[name] = _timed(check, runner, batches, 0.35 / (len(METHODS) - i))
        print(f"{name}: {rows[name]['step_ms']:.2f} ms/step, {rows[name]['it_per_s']:.1f} it/s", flush=True)
    for name in rows:
        rows[name]["x_fp"] = rows[name]["step_ms"] / rows["fp"]["step_ms"]
    return rows


def part_compiled(check: Check) -> dict:
    from op_count import graph_breaks
    from step_time import compile_runner

    if not check.dry and check.left() < check.args.compile_min:
        return {"skipped": f"{check.left():.0f} s left, under --compile-min {check.args.compile_min:.0f} s"}
    batches, rows = check.batches(), {}
    backend = check.args.compile_backend or ("aot_eager" if check.dry else "inductor")
    for i, name in enumerate(("fp", "odm")):
        _fresh(check)
        runner = StepRunner.build(name, check.model, check.device)
        runner.prepare(batches[:2])
        breaks = graph_breaks(runner, batches[0][0]) if name != "fp" else {}
        compile_runner(runner, recompile_limit=256, backend=backend)
        t0 = time.perf_counter()
        runner.step(*batches[0], record=False)
        sync(check.device)
        rows[name] = {"compile_s": time.perf_counter() - t0, "backend": backend, "graph_breaks": breaks,
                      **_timed(check, runner, batches, 0.3 / (2 - i))}
        print(f"{name} compiled: {rows[name]['step_ms']:.2f} ms/step (compile {rows[name]['compile_s']:.0f} s)",
              flush=True)
    return rows


def part_rho(check: Check) -> dict:
    """FP pre-training, then ODM and ODM with MR off from it: ρ over the QAT steps, held-out L1."""
    import copy

    fp_steps, qat_steps = (1, 1) if check.dry else (check.args.fp_steps, check.args.qat_steps)
    batches, held_out = check.batches(16), check.batches(2)[0]
    deadline = time.perf_counter() + 0.6 * (check.left() - 10.0)  # leave the rest to the compiled part
    fp = StepRunner.build("fp", check.model, check.device, ["optim.lr=5e-4"])
    start = time.perf_counter()
    for i in range(fp_steps):
        fp.step(*batches[i % len(batches)], record=False)
        if i == 9 and not check.dry:  # the three runs' step costs are ~1 : 4 : 3 (FP : ODM : MR off)
            per_fp_step = (time.perf_counter() - start) / 10
            fit = int((deadline - time.perf_counter()) / (per_fp_step * (fp_steps / qat_steps + 7)) * qat_steps)
            fp_steps = min(fp_steps, max(10, fit * fp_steps // qat_steps))
            qat_steps = min(qat_steps, max(10, fit))
        if i + 1 >= fp_steps:
            break
    out = {"fp_steps": fp_steps, "qat_steps": qat_steps}
    for name, extra in (("odm", []), ("odm_mr_off", ["method.mr.mode=off"])):
        runner = StepRunner.build("odm", check.model, check.device, extra)
        runner.net.load_state_dict(copy.deepcopy(fp.net.state_dict()), strict=False)  # θ from FP; qparams kept
        runner.method.calibrate(runner.net, [lr for lr, _ in batches[:4]])
        rhos, done = [], 0
        for i in range(qat_steps):
            if not check.dry and time.perf_counter() > deadline + 0.1 * check.left():
                break  # a slower step than the estimate: keep what ran
            done += 1
            lr, hr = batches[i % len(batches)]
            o = runner.method.training_losses(runner.net, lr, hr, 10**6)
            logs = runner.method.backward(o, runner.net, lambda loss: loss.backward())
            runner.opt.step()
            runner.opt.zero_grad(set_to_none=True)
            if "mr/rho" in logs:
                rhos.append(float(logs["mr/rho"]))
        with torch.no_grad():
            runner.net.eval()
            l1 = torch.nn.functional.l1_loss(runner.net(held_out[0]), held_out[1]).item()
        out[name] = {"steps": done, "held_out_l1": l1, "rho_first": rhos[0] if rhos else None,
                     "rho_last": rhos[-1] if rhos else None, "rho_mean": statistics.fmean(rhos) if rhos else None}
        print(f"{name}: held-out L1 {l1:.3f}, rho {out[name]['rho_mean']}", flush=True)
    return out


PARTS = (("env", part_env), ("counts", part_counts), ("eager", part_eager), ("rho", part_rho),
         ("compiled", part_compiled))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every part for one step on the CPU (tiny batches)")
    p.add_argument("--budget", type=float, default=270.0, help="seconds for the whole run, imports included")
    p.add_argument("--duration", type=float, default=20.0, help="at most this many timed seconds per measurement")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr-patch", type=int, default=48)
    p.add_argument("--fp-steps", type=int, default=300)
    p.add_argument("--qat-steps", type=int, default=300)
    p.add_argument("--compile-min", type=float, default=90.0, help="skip the compiled part with less time left")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend of the compiled part (default "
                   "inductor; aot_eager with --dry-run: the same tracing and graph breaks without generating kernels)")
    p.add_argument("--parts", nargs="+", default=[n for n, _ in PARTS], choices=[n for n, _ in PARTS])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    check_args(args, "gpu_check")
    if not args.dry_run:
        torch.backends.cudnn.benchmark = True
    return run_parts(Check(args), [(n, fn) for n, fn in PARTS if n in args.parts], "gpu_check", _T0)


def check_args(args: argparse.Namespace, stem: str) -> None:
    """``--out`` defaults to results/<stem>.json (<stem>_dry_run.json); without --dry-run CUDA must be there."""
    args.out = args.out or str(RESULTS_DIR / (f"{stem}_dry_run.json" if args.dry_run else f"{stem}.json"))
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit(f"{stem}: no CUDA device visible to PyTorch {torch.__version__}; run it on a GPU machine, or "
                 f"use --dry-run on the CPU")


def run_parts(check: Check, parts: list, prog: str, t0: float, needed: tuple[str, ...] = ()) -> dict:
    """Run ``parts`` in order (stop after a failed part of ``needed``: nothing else can run without it)."""
    for name, fn in parts:
        check.run(name, fn)
        if name in needed and "error" in check.results["parts"][name]:
            break
    failed = [n for n, r in check.results["parts"].items() if "error" in r]
    print(f"{prog}: {len(check.results['parts'])} parts in {time.perf_counter() - t0:.0f} s"
          + (f"; failed: {failed}" if failed else ""))
    return check.results

if __name__ == "__main__":
    results = main()
    sys.exit(1 if any("error" in r for r in results["parts"].values()) else 0)
