"""Where do the PyTorch fake-quant path and the ORT integer graph disagree, and which one is exact?

    PYTHONPATH=src python bench/export_flips.py <ckpt> [--set B100] [--images img_006 ...] [--out <json>]
    PYTHONPATH=src python bench/export_flips.py --swin-steps 5 --exact-eval ...   # export_bench's small SwinIR

Three runs of the same trained static-quantized network on whole LR images (x4):

- ``torch32``: the fake-quant network as ``odm-sr-eval`` runs it (float32);
- ``ort_int``: the exported integer graph on ONNX Runtime (``ConvInteger``: exact int32 sums, then the float32
  rescale, border fold and bias);
- ``exact64``: a float64 reference of the same model: every activation quantizer replaced by its grid in
  float64 (k = Int((clip(X) − l_a)/s_a), value l_a + k·s_a with the grid's own step), every quantized weight
  replaced by codes·scale in float64, everything else (head, tail, upsampler, skips) the network in float64.

For every quantized layer input (the codes ``ConvInteger`` sees) it counts the codes that differ between the
three runs, and for the codes where torch32 or ort_int differs from exact64 how far exact64's pre-rounding
value lies from the rounding boundary (in units of the step). The uint8 outputs are compared too.
``--exact-eval`` adds a fourth run, ``torch_exact``: the integer model's own PyTorch forward (``odm-sr-eval
eval.exact=true``: every integer layer accumulates exactly, in float64, from the codes).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import _common  # noqa: F401 - puts src/ on sys.path when odm_sr is not installed
import numpy as np
import torch
from _common import RESULTS_DIR, environment, write_json
from torch import Tensor, nn

from odm_sr.data import SRDataModule
from odm_sr.evaluation import eval_pad_mode, network_upscale, window_padding
from odm_sr.export.integer import (
    _IntegerLayer,
    act_quantizers,
    extract_spec,
    input_sources,
    integer_model,
    weight_layers,
)
from odm_sr.export.onnx_graph import INPUT, code_chains, has_dynamic_size, to_onnx
from odm_sr.export.runtime import session, trained_integer
from odm_sr.export.spec import ActGrid
from odm_sr.metrics import to_uint8
from odm_sr.quant.placement import replace_module


class Exact64(nn.Module):
    """An activation quantizer in float64 on its grid; records the codes and the pre-rounding value."""

    def __init__(self, grid: ActGrid, log: list) -> None:
        super().__init__()
        self.grid, self.log = grid, log

    def forward(self, x: Tensor) -> Tensor:
        g = self.grid
        step = float(g.step())
        if g.kind == "odm":
            lower, upper = g.params
            v = (x.clamp(lower, upper) - lower) / step
        else:
            (alpha,) = g.params
            v = x.clamp(-alpha, alpha) * g.levels / alpha + g.levels
        k = torch.round(v)
        self.log.append((k, v))
        return g.dequantize(k)


def exact64_model(net: nn.Module, spec) -> tuple[nn.Module, dict[str, list]]:
    ref = copy.deepcopy(net).double().eval()
    with torch.no_grad():
        for name, layer in weight_layers(ref).items():
            wc = spec.weights[name]
            layer.weight.data = wc.codes.double() * wc.scale
            layer.weight_quant = None
    logs: dict[str, list] = {}
    for name in act_quantizers(ref):
        logs[name] = []
        replace_module(ref, name, Exact64(spec.grids[name], logs[name]))
    return ref, logs


def torch32_codes(net: nn.Module, spec) -> tuple[dict[str, list], list]:
    """Forward hooks recording the float32 codes of every activation quantizer (``ActGrid.codes``)."""
    logs: dict[str, list] = {}
    handles = []
    for name, q in act_quantizers(net).items():
        logs[name] = []

        def hook(_m, inputs, _out, grid=spec.grids[name], log=logs[name]):
            log.append(grid.codes(inputs[0]))
        handles.append(q.register_forward_hook(hook))
    return logs, handles


def ort_with_codes(int_model: nn.Module, hw: tuple[int, int], threads: int):
    """An ORT session whose extra outputs are the uint8 codes of every ConvInteger/MatMulInteger input and the
    float value they were computed from (the first input of the Max of the code chain)."""
    import onnx

    model = onnx.load_from_string(to_onnx(int_model, hw))
    names = code_chains(model)
    for code, value in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(code, onnx.TensorProto.UINT8, None))
        model.graph.output.append(onnx.helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT, None))
    return session(model.SerializeToString(), threads), names


def int_layers(int_model: nn.Module) -> list[nn.Module]:
    return [m for m in int_model.modules() if isinstance(m, _IntegerLayer) and m.grid is not None]


def boundary_distance(v: Tensor) -> Tensor:
    """|frac(v) − 1/2| in units of the step: 0 on a rounding boundary."""
    return (v - torch.floor(v) - 0.5).abs()


def small_swinir(steps: int):
    """``export_bench``'s SwinIR-light (small), ODM W2A2: (net, spec, integer model)."""
    from export_bench import small_swinir as build

    tmp = RESULTS_DIR / ".export_bench_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    net, _ = build(steps, tmp)
    spec = extract_spec(net)
    return net, spec, integer_model(net, spec)


def analyse(ckpt: str | None, set_name: str, images: list[str] | None, threads: int, exact_eval: bool,
            swin_steps: int = -1) -> dict:
    net, spec, int_model = trained_integer(ckpt)[:3] if ckpt else small_swinir(swin_steps)
    net.eval()
    rng = float(net.pixel_range)
    sources = [s for s in input_sources(net).values() if s is not None]  # the integer layers' codes
    ref, ref_logs = exact64_model(net, spec)
    t_logs, _ = torch32_codes(net, spec)
    dm = SRDataModule(train=None, val=[], test=[set_name], scale=int(net.scale), lr_patch=48, batch_size=1)
    dm.setup("test")
    data = dm.test_sets[0]
    up32 = network_upscale(net)
    x_logs: list = []
    if exact_eval:  # the integer model's torch forward: exact (float64) accumulation of every integer layer
        for layer in int_layers(int_model):
            layer.register_forward_hook(lambda m, inputs, _o: x_logs.append(m.grid.codes(inputs[0])))
        up_exact = network_upscale(int_model)
    per_image, totals, sess, sess_hw = [], {}, None, None
    for index in range(len(data)):
        item = data[index]
        if images and item["name"] not in images:
            continue
        lr = item["lr"][None]
        for log in (*t_logs.values(), *ref_logs.values()):
            log.clear()
        with torch.no_grad():
            out = {"torch32": to_uint8(up32(lr), 1.0)}
            with window_padding(ref, eval_pad_mode(ref, "official")):  # SwinIR/HAT: as odm-sr-eval pads
                out["exact64"] = to_uint8(ref(lr.double() * rng) / rng, 1.0)
            if exact_eval:
                x_logs.clear()
                out["torch_exact"] = to_uint8(up_exact(lr), 1.0)
        hw = tuple(lr.shape[-2:])
        if sess is None or (sess_hw != hw and not has_dynamic_size(int_model)):  # SwinIR: one graph per size
            sess, names = ort_with_codes(int_model, hw, threads)
            sess_hw = hw
        res = sess.run(None, {INPUT: (lr * rng).numpy().astype(np.float32)})
        out["ort_int"] = to_uint8(torch.from_numpy(res[0]) / rng, 1.0)
        ort_codes = [torch.from_numpy(res[1 + 2 * i].astype(np.float32)) for i in range(len(names))]
        row = {"name": item["name"], "pixels": int(out["torch32"].numel()), "layers": {}}
        for a, b in (("torch32", "ort_int"), ("torch32", "exact64"), ("ort_int", "exact64")) + (
                (("torch_exact", "ort_int"), ("torch_exact", "exact64")) if exact_eval else ()):
            d = (out[a].to(torch.int16) - out[b].to(torch.int16)).abs()
            row[f"{a}_vs_{b}"] = {"unequal_pixels": int((d > 0).sum()), "max_diff": int(d.max())}
        for i, src in enumerate(sources):
            k32, (k64, v64), kort = t_logs[src][0], ref_logs[src][0], ort_codes[i]
            cell = {"codes": int(k64.numel()),
                    "torch32_vs_ort": int((k32 != kort).sum()),
                    "torch32_vs_exact64": int((k32 != k64.float()).sum()),
                    "ort_vs_exact64": int((kort != k64.float()).sum())}
            if exact_eval:
                ke = x_logs[i]
                cell["exact_eval_vs_ort"] = int((ke != kort).sum())
                cell["exact_eval_vs_exact64"] = int((ke != k64.float()).sum())
            dist = boundary_distance(v64)
            for key, k in (("torch32", k32), ("ort", kort)) + ((("exact_eval", ke),) if exact_eval else ()):
                wrong = k != k64.float()
                # a flip by round-off: exact64's value lies within 1e-4 step of the rounding boundary (a flip
                # inherited from a flipped input code lies anywhere)
                cell[f"{key}_roundoff_flips"] = int((wrong & (dist < 1e-4)).sum())
                if wrong.any():
                    cell[f"{key}_wrong_min_boundary_dist"] = float(dist[wrong].min())
            row["layers"][f"{i}:{src}"] = cell
            for key, value in cell.items():
                if not key.endswith("boundary_dist"):
                    totals.setdefault(src, {}).setdefault(key, 0)
                    totals[src][key] += value
        per_image.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
    return {"ckpt": ckpt, "swin_steps": None if ckpt else swin_steps, "set": set_name, "images": per_image,
            "per_layer_totals": totals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", nargs="?", help="trained checkpoint (or --swin-steps)")
    parser.add_argument("--swin-steps", type=int, default=-1, help="without ckpt: export_bench's small SwinIR")
    parser.add_argument("--set", default="B100")
    parser.add_argument("--images", nargs="*", help="image names (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--exact-eval", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "export_flips.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.ckpt and args.swin_steps < 0:
        parser.error("give a checkpoint or --swin-steps")
    result = analyse(args.ckpt, args.set, args.images, args.threads, args.exact_eval, args.swin_steps)
    write_json(args.out, {"environment": environment(), **result})


if __name__ == "__main__":
    main()
