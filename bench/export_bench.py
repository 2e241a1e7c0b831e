"""Integer ONNX export (``odm-sr-export``): exactness against the PyTorch model, file sizes, CPU speed.

    PYTHONPATH=src python bench/export_bench.py --ckpt odm=<ckpt> pams=<ckpt> [--sets Set5 Set14 B100]
                                               [--runs 10] [--skip-speed] [--before-src <checkout>/src]
                                               [--exact-models NAME ...] [--out bench/results/export_bench.json]
                                               [--fast [--calib-images 16]]

- **Exactness**: every checkpoint given, and a small SwinIR-light x4 (ODM W2A2, random init, calibrated and
  ``--swin-steps`` QAT steps on synthetic pairs), on the test sets at x4: the uint8 output of the ONNX Runtime
  integer graph (``export.runtime.onnx_upscale``, whole images) against the PyTorch model's
  (``evaluation.network_upscale``, the ``odm-sr-eval`` path), both its float32 fake quant (default) and its
  exact forward (``eval.exact=true``): share of equal pixels, largest difference, and the PSNR/SSIM rows
  (``evaluation.evaluate_sets``).
- **Size**: the packed file (``export.packing``) against ``odm-sr-complexity``'s storage figure.
- **Speed** (``--speed-models``, default all of ``SPEED_MODELS``: EDSR-baseline x4 ODM W2A2 and W4A4, the main
  job's EDSR-small x4 ODM W2A2, SwinIR-light x4 ODM W2A2; random weights, ODM ranges calibrated on random
  images), with 1 and 2 threads: the ORT integer graph, with ``--before-src <checkout>/src`` also the integer
  graph that checkout's code exports from the same weights (a subprocess), the ORT FP graph (the float backbone
  through ``to_onnx``) and PyTorch FP eager; median of ``--runs`` runs after 2 warm-ups, engines interleaved
  (order rotated each round); the 1-minute load average; ORT's profiler gives every graph's ms per op type.
- ``--exact-models``: the exactness rows for speed models too (random weights: exactness, not quality).
- ``--fast``: the opt-in inexact fast graph (``export.fast``, EDSR family) too: per set its uint8 output against
  ``eval.exact=true`` (``*_fast_vs_exact``: equal pixels, max difference, ΔPSNR/ΔSSIM; ranges from
  ``--calib-images`` sr291 LR images) and, in the speed rows, ``ort_int_fast`` (ranges from random images).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common  # noqa: F401 - puts src/ on sys.path when odm_sr is not installed
import numpy as np
import torch
from _common import RESULTS_DIR, compose_cfg, environment, write_json

from odm_sr.builders import build_backbone, build_network
from odm_sr.data import SRDataModule
from odm_sr.evaluation import evaluate_sets, network_upscale
from odm_sr.export.integer import extract_spec, integer_model
from odm_sr.export.onnx_graph import to_onnx
from odm_sr.export.runtime import OnnxEngine, onnx_upscale, session
from odm_sr.metrics import to_uint8
from odm_sr.quant.backbones import backbone_of

SWIN_SMALL = ["model=swinir_light", "model.scale=4", "method=odm", "bits=w2a2", "method.init.num_batches=4",
              "+model.kwargs={embed_dim: 24, depths: [2, 2], num_heads: [3, 3], window_size: 8, img_size: 32}"]


class Recorder:
    """An upscaler that keeps the uint8 of every output (in call order)."""

    def __init__(self, upscale) -> None:
        self.upscale, self.outputs = upscale, []

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        sr = self.upscale(lr)
        self.outputs.append(to_uint8(sr, 1.0))
        return sr


def synthetic_pairs(n: int, scale: int, side: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        coarse = torch.rand(4, 3, side * scale // 8, side * scale // 8, generator=gen)
        hr = torch.nn.functional.interpolate(coarse, scale_factor=8, mode="bicubic").clamp(0, 1)
        pairs.append((torch.nn.functional.avg_pool2d(hr, scale), hr))
    return pairs


def small_swinir(steps: int, tmp: Path):
    """SwinIR-light (small), ODM W2A2 x4: random init, calibration, ``steps`` QAT steps (Adam, lr 1e-3)."""
    torch.manual_seed(0)
    cfg = compose_cfg(SWIN_SMALL, tmp)
    net, method, _ = build_network(cfg)
    pairs = synthetic_pairs(steps + 4, 4)
    method.calibrate(net, [lr for lr, _ in pairs[:4]])
    opt = torch.optim.Adam(method.param_groups(net, 1e-3))
    net.train()
    for step, (lr, hr) in enumerate(pairs[4:]):
        opt.zero_grad()
        out = method.training_losses(net, lr, hr, step)
        method.backward(out, net, lambda loss: loss.backward())
        opt.step()
    return net.eval(), cfg


def load_models(ckpts: dict[str, str], swin_steps: int, tmp: Path) -> dict:
    from odm_sr.trained import load_trained

    models = {name: (trained.net, trained.cfg) for name, trained in ((n, load_trained(p)) for n, p in ckpts.items())}
    if swin_steps >= 0:
        models["swinir_light_small_odm"] = small_swinir(swin_steps, tmp)
    return models


def exactness(net, sets: list[str], threads: int, calib: list[torch.Tensor] | None = None) -> dict:
    """Per set: the ORT integer graph against the float32 fake-quant forward (``odm-sr-eval``, default) and
    against the exact PyTorch forward (``odm-sr-eval eval.exact=true``: the integer model in PyTorch); with
    ``calib`` (EDSR), also the inexact fast graph (``export.fast``, ranges from ``calib``) against the latter."""
    spec = extract_spec(net)
    int_model = integer_model(net, spec)
    engine = OnnxEngine(int_model, threads)
    dm = SRDataModule(train=None, val=[], test=sets, scale=int(net.scale), lr_patch=48, batch_size=1)
    recs = {"torch": Recorder(network_upscale(net)), "torch_exact": Recorder(network_upscale(int_model)),
            "onnx": Recorder(onnx_upscale(engine))}
    pairs = [("onnx", "torch", ""), ("onnx", "torch_exact", "_vs_exact")]
    if calib is not None:
        from odm_sr.export.fast import fast_model  # here: --before-src's subprocess imports this file with older src

        recs["onnx_fast"] = Recorder(onnx_upscale(OnnxEngine(fast_model(int_model, calib), threads)))
        pairs.append(("onnx_fast", "torch_exact", "_fast_vs_exact"))
    with torch.no_grad():
        rows = {name: evaluate_sets(rec, dm) for name, rec in recs.items()}
    per_set, start = {}, 0
    dm.setup("test")
    for name, source in zip(dm.test_set_names, dm.test_sets, strict=True):
        count = len(source)
        out = {k: torch.cat([t.flatten() for t in rec.outputs[start:start + count]]).to(torch.int16)
               for k, rec in recs.items()}
        start += count
        cell = {"images": count, **{k: rows[k][name] for k in recs}}
        for graph, ref, suffix in pairs:
            d = (out[graph] - out[ref]).abs()
            cell.update({f"equal_pixels{suffix}": float((d == 0).double().mean()), f"max_diff{suffix}": int(d.max()),
                         f"d_psnr{suffix}": rows[graph][name][0] - rows[ref][name][0],
                         f"d_ssim{suffix}": rows[graph][name][1] - rows[ref][name][1]})
        per_set[name] = cell
    return per_set


def sizes(net, cfg) -> dict:
    from odm_sr.analysis.complexity import storage
    from odm_sr.export.packing import body_size, pack  # here: see export_graph

    data = pack(net, extract_spec(net), cfg)
    body, expected = body_size(data), storage(net)["total_k"] * 4000
    return {"packed_bytes": len(data), "header_bytes": len(data) - body, "body_bytes": body,
            "storage_bytes": expected, "body_over_storage": body / expected}


SPEED_MODELS = {  # name: (overrides, LR side); random FP weights, ODM ranges calibrated on random images
    "edsr_baseline_x4_odm_w2a2": (["model=edsr_baseline", "model.scale=4", "method=odm", "bits=w2a2"], 128),
    "edsr_baseline_x4_odm_w4a4": (["model=edsr_baseline", "model.scale=4", "method=odm", "bits=w4a4"], 128),
    "main_edsr_small_x4_odm_w2a2": (["model=edsr_small", "model.scale=4", "method=odm", "bits=w2a2"], 128),
    "swinir_light_x4_odm_w2a2": (["model=swinir_light", "model.scale=4", "method=odm", "bits=w2a2"], 48),
}


def speed_model(name: str, tmp: Path) -> tuple:
    """(FP backbone, calibrated quantized network, LR side) of a ``SPEED_MODELS`` entry."""
    overrides, side = SPEED_MODELS[name]
    torch.manual_seed(0)
    cfg = compose_cfg(overrides, tmp)
    fp = build_backbone(cfg.model).eval()
    net, method, _ = build_network(cfg)
    net.eval().load_state_dict(fp.state_dict(), strict=False)
    with torch.no_grad():
        method.calibrate(net, [torch.rand(1, 3, 48, 48) * float(net.pixel_range)])
    return fp, net, side


def before_graph(src: Path, name: str, net, side: int, tmp: Path) -> bytes:
    """The integer graph of ``net`` exported by another checkout's ``src`` (a subprocess on its code)."""
    state, out = tmp / f"{name}_state.pt", tmp / f"{name}_before.onnx"
    torch.save(net.state_dict(), state)
    env = dict(os.environ, PYTHONPATH=str(src))
    subprocess.run([sys.executable, __file__, "--export-graph", name, str(state), str(out)], env=env, check=True)
    return out.read_bytes()


def export_graph(name: str, state: Path, out: Path) -> None:
    """``--export-graph``: build ``name``'s network, load ``state``, write its integer graph (this process's
    odm_sr: another checkout's, so this file imports at its top only what that code has too)."""
    _, net, side = speed_model(name, out.parent)
    net.load_state_dict(torch.load(state))
    out.write_bytes(to_onnx(integer_model(net, extract_spec(net)), (side, side)))


def speed(names: list[str], runs: int, threads_list: list[int], before_src: Path | None, tmp: Path,
          fast: bool = False) -> dict:
    """Per model and thread count: median ms of the ORT integer graph (this checkout's; ``before_src``'s too;
    with ``fast``, the inexact fast graph of EDSR models), the ORT FP graph and PyTorch FP eager, interleaved
    (order rotated each round), and ms per op type. Where the backbone's tail composes (``export.tail``): the
    ORT FP graph with the same composed tail and the integer graph with the sequential one too."""
    from odm_sr.export.tail import tail_modules  # here: see exactness

    results = {}
    for name in names:
        fp, net, side = speed_model(name, tmp)
        int_model = integer_model(net, extract_spec(net))
        graphs = {"ort_int": to_onnx(int_model, (side, side))}
        if fast and backbone_of(net).family == "edsr":  # ranges from random images: speed only
            calib = [torch.rand(1, 3, 48, 48) * float(net.pixel_range) for _ in range(2)]
            from odm_sr.export.fast import fast_model

            graphs["ort_int_fast"] = to_onnx(fast_model(int_model, calib), (side, side))
        if before_src is not None:
            graphs["ort_int_before"] = before_graph(before_src, name, net, side, tmp)
        graphs["ort_fp"] = to_onnx(fp, (side, side), compose=False)
        if tail_modules(fp):  # the same tail composition in the FP graph, and the integer graph without it
            graphs["ort_fp_composed"] = to_onnx(fp, (side, side))
            graphs["ort_int_sequential_tail"] = to_onnx(int_model, (side, side), compose=False)
        x = (torch.rand(1, 3, side, side) * float(net.pixel_range)).numpy()
        results[name] = {str(t): speed_row(graphs, fp, x, runs, t, tmp) for t in threads_list}
        print(name, json.dumps(results[name], indent=1), flush=True)
    return results


def speed_row(graphs: dict[str, bytes], fp, x: np.ndarray, runs: int, threads: int, tmp: Path) -> dict:
    torch.set_num_threads(threads)
    sessions = {name: session(g, threads) for name, g in graphs.items()}
    calls = {name: (lambda s=s: s.run(None, {"lr": x})) for name, s in sessions.items()}
    calls["torch_fp"] = lambda: fp(torch.from_numpy(x))
    times = {name: [] for name in calls}
    order = list(calls)
    with torch.no_grad():
        for i in range(runs + 2):
            for name in order[i % len(order):] + order[:i % len(order)]:  # rotate: no engine always first
                t0 = time.perf_counter()
                calls[name]()
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
    med = {name: 1000 * statistics.median(v) for name, v in times.items()}
    row = {f"{k}_ms": round(v, 1) for k, v in med.items()}
    row.update({f"{k}_over_ort_fp": round(med[k] / med["ort_fp"], 3) for k in graphs if k != "ort_fp"})
    if "ort_fp_composed" in med:
        row.update({f"{k}_over_ort_fp_composed": round(med[k] / med["ort_fp_composed"], 3) for k in graphs
                    if k.startswith("ort_int")})
    row["ort_fp_over_torch_fp"] = round(med["ort_fp"] / med["torch_fp"], 3)
    row["load_avg_1min"] = os.getloadavg()[0]
    row["op_ms"] = {k: profile(g, x, threads, tmp) for k, g in graphs.items()}
    return row


def profile(graph: bytes, x: np.ndarray, threads: int, tmp: Path, runs: int = 3) -> dict[str, float]:
    """Node time per run by op type (ORT profiler, ms), the eight largest."""
    sess = session(graph, threads, profile_prefix=str(tmp / "ort_profile"))
    for _ in range(runs):
        sess.run(None, {"lr": x})
    path = Path(sess.end_profiling())
    events = json.loads(path.read_text())
    path.unlink()
    per_op: dict[str, float] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            per_op[ev["args"]["op_name"]] = per_op.get(ev["args"]["op_name"], 0.0) + ev["dur"]
    return {op: round(t / runs / 1000, 1) for op, t in sorted(per_op.items(), key=lambda kv: -kv[1])[:8]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", nargs="*", default=[], metavar="NAME=PATH", help="trained checkpoints (x4)")
    parser.add_argument("--sets", nargs="+", default=["Set5", "Set14", "B100"])
    parser.add_argument("--swin-steps", type=int, default=5, help="QAT steps of the small SwinIR (-1: skip it)")
    parser.add_argument("--threads", type=int, default=2, help="threads of the exactness runs")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--speed-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--speed-models", nargs="+", default=list(SPEED_MODELS), choices=list(SPEED_MODELS))
    parser.add_argument("--exact-models", nargs="*", default=[], choices=list(SPEED_MODELS),
                        help="also the exactness of these (random-weight, calibrated) speed models")
    parser.add_argument("--fast", action="store_true", help="also the opt-in inexact fast graph (export.fast; EDSR "
                        "family): its exactness rows against eval.exact=true and its speed rows")
    parser.add_argument("--calib-images", type=int, default=16, help="--fast: sr291 LR images for its ranges")
    parser.add_argument("--before-src", type=Path, help="another checkout's src/: its integer graph is timed too")
    parser.add_argument("--export-graph", nargs=3, metavar=("MODEL", "STATE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "export_bench.json")
    args = parser.parse_args()
    if args.export_graph:
        name, state, out = args.export_graph
        return export_graph(name, Path(state), Path(out))
    tmp = args.out.parent / ".export_bench_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), "models": {}}
    models = load_models(dict(item.split("=", 1) for item in args.ckpt), args.swin_steps, tmp)
    models.update({f"{name}_random": speed_model(name, tmp)[1:2] + (None,) for name in args.exact_models})
    for name, (net, cfg) in models.items():
        fast = args.fast and backbone_of(net).family == "edsr"
        from odm_sr.export.fast import calibration_images

        calib = calibration_images(int(net.scale), args.calib_images, float(net.pixel_range)) if fast else None
        payload["models"][name] = {"exactness": exactness(net, args.sets, args.threads, calib)}
        if cfg is not None:
            payload["models"][name]["size"] = sizes(net, cfg)
        print(name, json.dumps(payload["models"][name], indent=1))
    if not args.skip_speed:
        payload["speed"] = speed(args.speed_models, args.runs, args.speed_threads, args.before_src, tmp, args.fast)
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
