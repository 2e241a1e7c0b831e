"""aten ops (≈ kernel launches) and host syncs per training step of FP, PAMS, DAQ, DDTB and ODM, and torch.compile's
graph breaks in the quantized forward.

    PYTHONPATH=src python bench/op_count.py [--model baseline|small] [--device cpu|cuda] [--no-compile] [--by-module]

One step is ``bench/_common.StepRunner.step`` (what ``SRLitModule.training_step`` does without Lightning) after
the method's preparation (ODM's calibration, PAMS's α epoch, DDTB's calibration epoch), counted by
``odm_sr.analysis.profiling.step_profile`` per phase: forward (``training_losses``), backward (``backward``),
optimizer (Adam step + zero_grad). View ops are not counted. "ops" is forward + backward: the optimizer's count
depends on the implementation torch picks (on the CPU Adam runs per tensor, with one ``.item()`` per parameter;
on CUDA it defaults to the multi-tensor path), so it is listed on its own. The count does not depend on the input
size, so a small LR patch is used. ``--no-compile`` skips ``torch._dynamo.explain`` of the student forward (graph count
and break reasons) and the compiled training step of ``--compile-step`` methods (default ODM: the whole step
with the student compiled in place by ``--compile-backend``, as ``trainer.compile=true``; graphs and breaks).
``--by-module`` adds, per method, the ops of one more step by module (forward) and autograd node (backward).
Prints a markdown table and writes ``bench/results/op_count_<model>_<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import RESULTS_DIR, StepRunner, environment, sample_batches, write_json  # noqa: E402

from odm_sr.analysis.profiling import step_profile  # noqa: E402

METHODS = ("fp", "pams", "daq", "ddtb", "odm", "lsq")
TARGETS = {"odm": 2000}  # eager ops per step on EDSR-baseline (issue "GPU-ready"); every method also ≤ 10× FP
MAX_RATIO = 10.0


def profile_step(runner: StepRunner, lr: torch.Tensor, hr: torch.Tensor) -> dict:
    """Ops and syncs of one late-stage step, by phase."""
    phases = {}
    with step_profile() as fwd:
        out = runner.method.training_losses(runner.net, lr, hr, 10**6, teacher=runner.teacher)
    phases["forward"] = fwd
    with step_profile() as bwd:
        runner.method.backward(out, runner.net, lambda loss: loss.backward())
    phases["backward"] = bwd
    with step_profile() as opt:
        runner.opt.step()
        runner.opt.zero_grad(set_to_none=True)
    phases["optimizer"] = opt
    total_ops = Counter()
    total_syncs = Counter()
    for p in phases.values():
        total_ops.update(p.ops)
        total_syncs.update(p.syncs)
    return {"ops": phases["forward"].total_ops + phases["backward"].total_ops, "syncs": sum(total_syncs.values()),
            **{f"{k}_ops": p.total_ops for k, p in phases.items()},
            **{f"{k}_syncs": p.total_syncs for k, p in phases.items()},
            "sync_kinds": dict(total_syncs), "top_ops": dict(total_ops.most_common(12))}


def by_module(runner: StepRunner, lr: torch.Tensor, hr: torch.Tensor) -> dict:
    """Ops of one late-stage step (forward + backward, views excluded) by where they run: a forward op under the
    innermost running module of ``odm_sr.quant`` (a quantizer, a gate, a quantized layer; else "model"), a
    backward op under its autograd node (a custom Function's ``...Backward``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    stack: list[str] = []
    counts: Counter = Counter()

    class _ByModule(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                node = torch._C._current_autograd_node()
                where = (f"backward:{type(node).__name__}" if node is not None
                         else f"forward:{stack[-1] if stack else 'model'}")
                counts[where] += 1
            return func(*args, **(kwargs or {}))

    handles = []
    for m in runner.net.modules():
        if type(m).__module__.startswith("odm_sr.quant"):
            name = type(m).__name__
            handles.append(m.register_forward_pre_hook(lambda mod, a, n=name: stack.append(n)))
            handles.append(m.register_forward_hook(lambda mod, a, o: stack.pop() and None, always_call=True))
    try:
        with _ByModule():
            out = runner.method.training_losses(runner.net, lr, hr, 10**6, teacher=runner.teacher)
            runner.method.backward(out, runner.net, lambda loss: loss.backward())
    finally:
        for h in handles:
            h.remove()
    runner.opt.zero_grad(set_to_none=True)
    return dict(counts.most_common())


def graph_breaks(runner: StepRunner, lr: torch.Tensor) -> dict:
    """torch._dynamo.explain of the student forward (training mode): graphs, breaks and their first reasons."""
    import torch._dynamo

    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(runner.net)(lr)
    except Exception as err:  # noqa: BLE001 - a failing compile is a result to report, not a crash
        return {"error": f"{type(err).__name__}: {err}"[:300]}
    reasons = Counter(str(b.reason).split("\n")[0][:120] for b in explained.break_reasons)
    return {"graphs": explained.graph_count, "breaks": explained.graph_break_count,
            "reasons": dict(reasons.most_common(5))}


def compiled_step(runner: StepRunner, lr: torch.Tensor, hr: torch.Tensor, backend: str) -> dict:
    """One whole training step (forward, the method's backward, Adam) with the student compiled in place, as
    ``trainer.compile=true`` does (``SRLitModule``): unique graphs and graph breaks from dynamo's counters."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        runner.net.compile(backend=backend)
        runner.step(lr, hr, record=False)
    except Exception as err:  # noqa: BLE001 - a failing compile is a result to report, not a crash
        return {"backend": backend, "error": f"{type(err).__name__}: {err}"[:300]}
    reasons = Counter({str(k).split("\n")[0][:120]: v for k, v in counters["graph_break"].items()})
    return {"backend": backend, "graphs": int(counters["stats"]["unique_graphs"]),
            "breaks": sum(counters["graph_break"].values()), "reasons": dict(reasons.most_common(5))}


def target_met(name: str, ops: int, fp_ops: int | None) -> bool | None:
    """ops ≤ ``TARGETS[name]`` (where set) and ≤ ``MAX_RATIO``·FP; None for FP itself or without an FP row."""
    if name == "fp" or not fp_ops:
        return None
    return ops <= TARGETS.get(name, ops) and ops <= MAX_RATIO * fp_ops


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="baseline", choices=("baseline", "small"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-step", nargs="*", default=["odm"], choices=METHODS,
                        help="methods whose whole training step is also run compiled (graphs and breaks)")
    parser.add_argument("--compile-backend", default="aot_eager", help="backend of --compile-step")
    parser.add_argument("--by-module", action="store_true",
                        help="also attribute each method's ops to modules (forward) and autograd nodes (backward)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    batches = sample_batches(3, 2, 12, 4, device)
    rows = {}
    for name in args.methods:
        torch.manual_seed(0)
        runner = StepRunner.build(name, args.model, device)
        runner.prepare(batches[:2])
        runner.step(*batches[2])  # warm: lazy state, first-step allocations
        rows[name] = profile_step(runner, *batches[2])
        if args.by_module:
            rows[name]["by_module"] = by_module(runner, *batches[2])
            print(f"{name} by module: " + ", ".join(f"{k} {v}" for k, v in rows[name]["by_module"].items()))
        if not args.no_compile and name != "fp":
            rows[name]["compile"] = graph_breaks(runner, batches[2][0])
        if not args.no_compile and name in args.compile_step:
            rows[name]["compiled_step"] = compiled_step(runner, *batches[2], args.compile_backend)
        print(f"{name}: {rows[name]['ops']} ops, {rows[name]['syncs']} syncs", flush=True)
    fp_ops = rows.get("fp", {}).get("ops")
    lines = ["| method | aten ops fwd+bwd | × FP | fwd | bwd | Adam (CPU, per-tensor) | host syncs (fwd/bwd/opt) "
             "| compiled forward | target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ratio = f"{r['ops'] / fp_ops:.1f}" if fp_ops else "–"
        comp = r.get("compile", {})
        comp_text = (f"{comp['graphs']} graphs, {comp['breaks']} breaks" if "graphs" in comp
                     else comp.get("error", "–"))
        step = r.get("compiled_step")
        if step:
            comp_text += (f"; whole step ({step['backend']}): {step['graphs']} graphs, {step['breaks']} breaks"
                          if "graphs" in step else f"; whole step: {step['error']}")
        r["target_met"] = met = target_met(name, r["ops"], fp_ops)
        target = "–" if met is None else ("met" if met else "missed")
        lines.append(f"| {name} | {r['ops']} | {ratio} | {r['forward_ops']} | {r['backward_ops']} | "
                     f"{r['optimizer_ops']} | {r['syncs']} ({r['forward_syncs']}/{r['backward_syncs']}/"
                     f"{r['optimizer_syncs']}) | {comp_text} | {target} |")
    table = "\n".join(lines)
    print(table)
    payload = {"model": args.model, "device": args.device, "environment": environment(), "rows": rows,
               "targets": {**TARGETS, "max_ratio_to_fp": MAX_RATIO}, "markdown": table}
    write_json(Path(args.out) if args.out else RESULTS_DIR / f"op_count_{args.model}_{args.device}.json", payload)
    return payload


if __name__ == "__main__":
    main()
