"""QAT from the official IMDN x4 weights on a GPU: PAMS / DAQ / DDTB / ODM at W2A2 in one process, < 9 minutes.

    python3 bench/gpu_real.py [--budget 490] [--out bench/results/gpu_real.json]   # via bench/gpu_real.sh
    python3 bench/gpu_real.py --dry-run                                             # every part, 2 steps, CPU

The GPU counterpart of the ``real_imdn_x4_w2a2_<method>`` experiments (issue 18 §4): each method is
``odm_sr.train.train(cfg)`` on its composed experiment config, with a larger budget than the CPU sweep: batch 16,
LR patch 48, trained on BSD200 alone (``data.train=<data>/train/BSD200/HR``: T91's smallest image, 78 px, has no
48-pixel LR patch at x4), validation off, tested on Set5 and B100. Every method gets the same number of steps N,
its released schedule compressed to N the way the real experiments compress it to 1000 (``scaled_schedule``:
milestones and epoch length times N / 1000).

Parts, in order (the JSON is rewritten after each one, so a run killed by its time limit keeps the earlier parts):

1. ``env``: GPU, torch; the third-party modules the run imported.
2. ``data``: the data and weights found (``$ODM_SR_DATA`` / ``$ODM_SR_MODELS``, else ``./shared/…``, else
   ``../shared/…``: the device tool carries a ``shared/`` folder inside the checkout, see bench/README.md), and
   BSD200's LR made once (MATLAB bicubic; the runs share it: ``build_source`` is memoised for training folders).
3. ``fp``: the FP network on Set5 / B100 (``odm_sr.eval.evaluate``), beside the published numbers.
4. ``plan``: the step time of each method (``_common.StepRunner`` on BSD200 batches, after calibration), and N:
   as many steps as let the four runs end ``--margin`` seconds before ``--budget`` (``plan_steps``).
5. ``odm``, ``pams``, ``daq``, ``ddtb``: one run each (ODM first: a run cut by the limit loses a baseline, not the
   method under study); Set5 / B100 PSNR/SSIM, steps, seconds, ρ. Before each run N is lowered if the runs so far
   show that the rest would not fit (``steps`` says what ran).

``--dry-run``: the CPU, batch 2, LR patch 12, 2 steps, Set5 only, training on Set5's HR images (a smoke test
of the path, not a result).
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import REPO_ROOT, StepRunner, compose_cfg  # noqa: E402
from gpu_check import Check, _timed, check_args, part_env, run_parts  # noqa: E402

METHODS = ("odm", "pams", "daq", "ddtb")
SETS = ("Set5", "B100")
# ../shared/models/README.md: IMDN x4, Y PSNR / SSIM (paper)
PUBLISHED = {"Set5": (32.21, 0.8948), "B100": (27.56, 0.7353)}
WEIGHTS = "imdn/IMDN_x4.pth"
# Relative costs the plan adds to a measured step: DDTB's calibration epoch (N/10 forward-only iterations),
# ODM's range initialisation (method.init.num_batches forward passes, ~1/3 of a step each)
EXTRA_STEP_FRACTION = {"ddtb": 0.1}
FORWARD_FRACTION = 1 / 3


def find_root(env_var: str, sub: str, needed: tuple[str, ...]) -> Path:
    """``$env_var``, else ``<repo>/shared/<sub>``, else ``<repo>/../shared/<sub>``: the first that holds every
    path of ``needed``; exported as ``$env_var`` so that the configs' ``paths.*`` read it."""
    candidates = [Path(os.environ[env_var])] if os.environ.get(env_var) else []
    candidates += [REPO_ROOT / "shared" / sub, REPO_ROOT.parent / "shared" / sub]
    for root in candidates:
        if all((root / n).exists() for n in needed):
            os.environ[env_var] = str(root.resolve())
            return root.resolve()
    raise FileNotFoundError(f"gpu_real: no {sub} folder with {', '.join(needed)} (looked at "
                            f"{', '.join(str(c) for c in candidates)}); see bench/README.md, 'GPU: QAT from IMDN'")


def scaled_schedule(max_steps: int, iters_per_epoch: int, milestones: list[int], steps: int) -> dict:
    """The experiment's schedule (``max_steps`` optimizer steps) compressed or stretched to ``steps``."""
    f = steps / max_steps
    return {"trainer.max_steps": steps, "data.iters_per_epoch": max(1, round(iters_per_epoch * f)),
            "optim.milestones": [max(1, round(m * f)) for m in milestones]}


def plan_steps(step_s: dict[str, float], overhead_s: dict[str, float], seconds: float, slack: float,
               min_steps: int, max_steps: int) -> int:
    """The largest N with Σ_m overhead_m + slack·N·Σ_m step_m·(1 + extra_m) ≤ ``seconds``, in [min, max]."""
    per_step = slack * sum(s * (1 + EXTRA_STEP_FRACTION.get(m, 0.0)) for m, s in step_s.items())
    fit = (seconds - sum(overhead_s.values())) / per_step if per_step > 0 else max_steps
    return int(min(max_steps, max(min_steps, math.floor(fit))))


def memoize_training_sources() -> None:
    """Build each training set once per process (BSD200's LR by MATLAB bicubic takes ~10-20 s of CPU): every
    run's data module then gets the same preloaded images (read-only) instead of making them again."""
    from odm_sr.data import registry

    original, cache = registry.build_source, {}

    def build_source(name, split, scale, data_root=None, index_range=None, preload=False):
        if split != "train":
            return original(name, split, scale, data_root, index_range, preload)
        key = (str(name), int(scale), str(data_root), index_range, preload)
        if key not in cache:
            cache[key] = original(name, split, scale, data_root, index_range, preload)
        return cache[key]

    registry.build_source = build_source


class RealCheck(Check):
    """The budget, the JSON, and what the parts hand on: roots, the FP eval time, N and the runs' costs."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.results["args"] = {k: v for k, v in vars(args).items()}
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_real_"))
        self.batch, self.lr_patch = (2, 12) if self.dry else (args.batch, args.lr_patch)
        self.data_root = self.models_root = None
        self.train_folder = ""
        self.fp_eval_s = 0.0
        self.step_s: dict[str, float] = {}
        self.steps = args.dry_steps if self.dry else args.min_steps
        self.overhead: list[float] = []  # per finished run: wall time less steps x measured step time

    def overrides(self, method: str) -> list[str]:
        """The experiment and the GPU budget's settings (schedule excluded)."""
        sets = "[Set5]" if self.dry else "[" + ",".join(SETS) + "]"
        extra = ["method.init.num_batches=2"] if self.dry and method == "odm" else []
        return [f"experiment=real_imdn_x4_w2a2_{method}", f"trainer={'cpu' if self.dry else 'gpu'}", "logger=none",
                f"data.train={self.train_folder}", f"data.lr_patch={self.lr_patch}", f"data.batch_size={self.batch}",
                f"data.num_workers={self.args.workers}", f"data.test={sets}", "+trainer.limit_val_batches=0",
                "analyze.after_fit=[]", "eval.bicubic_row=false", "trainer.enable_progress_bar=false",
                f"seed={self.args.seed}", *extra]

    def config(self, method: str, steps: int | None = None):
        out = self.work / method
        cfg = compose_cfg(self.overrides(method), out)
        if steps is None:
            return cfg
        sched = scaled_schedule(int(cfg.trainer.max_steps), int(cfg.data.iters_per_epoch),
                                list(cfg.optim.milestones), steps)
        ipe = sched["data.iters_per_epoch"]
        more = [f"{k}={v}".replace(" ", "") for k, v in sched.items()]
        more += [f"trainer.val_check_interval={ipe}", f"callbacks.model_checkpoint.every_n_train_steps={steps}",
                 f"trainer.log_every_n_steps={max(1, min(50, ipe))}"]
        return compose_cfg(self.overrides(method) + more, out)

    def overhead_s(self, method: str) -> float:
        """A run's cost beyond its steps: measured on the runs so far, else estimated from the FP test."""
        base = max(self.overhead) if self.overhead else self.args.run_overhead + 2.0 * self.fp_eval_s
        calib = 100 * FORWARD_FRACTION * self.step_s.get(method, 0.0) if method == "odm" else 0.0
        return base + calib


def part_data(check: RealCheck) -> dict:
    check.data_root = find_root("ODM_SR_DATA", "data", ("benchmark/Set5/HR", "benchmark/Set5/LR_bicubic/X4",
                                                        *(() if check.dry else ("benchmark/B100/HR",
                                                                                "train/BSD200/HR"))))
    check.models_root = find_root("ODM_SR_MODELS", "models", (WEIGHTS,))
    train = "benchmark/Set5/HR" if check.dry else "train/BSD200/HR"
    check.train_folder = str(check.data_root / train)
    memoize_training_sources()
    from odm_sr.data.registry import build_source

    start = time.perf_counter()
    source = build_source(check.train_folder, "train", 4, preload=True)
    return {"data_root": str(check.data_root), "models_root": str(check.models_root), "train": check.train_folder,
            "images": len(source), "lr_seconds": time.perf_counter() - start, "work": str(check.work)}


def part_fp(check: RealCheck) -> dict:
    from odm_sr.eval import evaluate

    sets = ["Set5"] if check.dry else list(SETS)
    cfg = compose_cfg(["model=imdn", "model.scale=4", f"model.pretrained={check.models_root / WEIGHTS}",
                       "data=sr291", f"data.test=[{','.join(sets)}]", "eval.bicubic_row=false"],
                      check.work / "fp", config_name="eval")
    start = time.perf_counter()
    rows = evaluate(cfg)
    check.fp_eval_s = time.perf_counter() - start
    own = next(iter(rows.values()))
    return {"seconds_eval": check.fp_eval_s, "published": {s: PUBLISHED[s] for s in sets},
            **{s: {"psnr": own[s][0], "ssim": own[s][1]} for s in sets}}


def _batches(check: RealCheck, n: int) -> list:
    """``n`` training batches of the training folder, scaled to IMDN's pixel range (1)."""
    from odm_sr.data.patches import PatchDataset
    from odm_sr.data.registry import build_source

    source = build_source(check.train_folder, "train", 4, preload=True)
    ds = PatchDataset(source, 4, check.lr_patch, iters_per_epoch=n, batch_size=check.batch, seed=0)
    items = [ds[i] for i in range(n * check.batch)]
    stack = [(torch.stack([it["lr"] for it in items[i::n]]), torch.stack([it["hr"] for it in items[i::n]]))
             for i in range(n)]
    return [(lr.to(check.device), hr.to(check.device)) for lr, hr in stack]


def part_plan(check: RealCheck) -> dict:
    batches, rows = _batches(check, 6), {}
    for i, name in enumerate(METHODS):
        runner = StepRunner.from_config(name, check.config(name), check.device)
        runner.prepare(batches[:2])
        rows[name] = _timed(check, runner, batches, 0.04 / (len(METHODS) - i))
        check.step_s[name] = rows[name]["step_ms"] / 1000
        del runner
        print(f"{name}: {rows[name]['step_ms']:.1f} ms/step", flush=True)
    seconds = check.left() - check.args.margin
    overhead = {m: check.overhead_s(m) for m in METHODS}
    if not check.dry:
        check.steps = plan_steps(check.step_s, overhead, seconds, check.args.slack, check.args.min_steps,
                                 check.args.max_steps)
    print(f"plan: {check.steps} steps per method ({seconds:.0f} s for the runs)", flush=True)
    return {"steps": check.steps, "seconds_for_runs": seconds, "overhead_s": overhead, "slack": check.args.slack,
            "step_time": rows}


def part_method(name: str):
    def run(check: RealCheck) -> dict:
        from odm_sr.train import train

        todo = METHODS[METHODS.index(name):]
        planned = check.steps
        if not check.dry and check.step_s:
            fit = plan_steps({m: check.step_s[m] for m in todo}, {m: check.overhead_s(m) for m in todo},
                             check.left() - check.args.margin, check.args.slack, 1, check.args.max_steps)
            check.steps = min(check.steps, fit)
        cfg = check.config(name, check.steps)
        start = time.perf_counter()
        results = train(cfg)
        seconds = time.perf_counter() - start
        check.overhead.append(seconds - results["steps"] * check.step_s.get(name, 0.0))
        own = results["metrics"][results["run_name"]]
        out = {"steps": results["steps"], "planned_steps": planned, "run_seconds": seconds,
               "train_seconds": results["train_seconds"], "rho_mean": results["mr_balance"]["rho_mean"],
               "s_per_step": results["train_seconds"] / max(1, results["steps"]),
               "milestones": list(cfg.optim.milestones), "iters_per_epoch": int(cfg.data.iters_per_epoch),
               **{s: own[s] for s in own}}
        print(f"{name}: {out['steps']} steps in {seconds:.0f} s; " +
              ", ".join(f"{s} {own[s]['psnr']:.2f}" for s in own), flush=True)
        return out
    return run


PARTS = (("env", part_env), ("data", part_data), ("fp", part_fp), ("plan", part_plan),
         *((m, part_method(m)) for m in METHODS))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every part for 2 steps on the CPU (tiny batches)")
    p.add_argument("--budget", type=float, default=490.0, help="seconds for the whole run, imports included")
    p.add_argument("--margin", type=float, default=25.0, help="seconds the last run should end before --budget")
    p.add_argument("--duration", type=float, default=3.0, help="timed seconds per method in the plan part")
    p.add_argument("--slack", type=float, default=1.25, help="a step in Lightning over a measured bare step")
    p.add_argument("--run-overhead", type=float, default=20.0,
                   help="seconds a run costs beyond its steps and its test (setup, workers, checkpoint), first guess")
    p.add_argument("--min-steps", type=int, default=200)
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--dry-steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr-patch", type=int, default=48)
    p.add_argument("--workers", type=int, default=6, help="data loader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="run folders (default: a new temporary folder)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    check_args(args, "gpu_real")
    if args.dry_run:
        args.workers = 0
    return run_parts(RealCheck(args), list(PARTS), "gpu_real", _T0, needed=("data",))

if __name__ == "__main__":
    results = main()
    sys.exit(1 if any("error" in r for r in results["parts"].values()) else 0)
