"""Time of the small SwinIR's ONNX integer graph on one whole B100 image (ORT CPU), and its time per op type.

    PYTHONPATH=src python bench/export_swin_speed.py [--image img_001] [--runs 7] [--threads 1] [--label after]

The model is ``export_bench``'s SwinIR-light (small), ODM W2A2, 5 QAT steps. Run it with ``PYTHONPATH`` on an
older checkout's ``src`` to time that checkout's graph (e.g. before the exact float64 FP ops of
``export.exact``); median of ``--runs`` runs after 2 warm-ups, 1-minute load average beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import _common  # noqa: F401 - puts src/ on sys.path when odm_sr is not installed
import torch
from _common import RESULTS_DIR, environment, write_json
from export_bench import profile, small_swinir

import odm_sr
from odm_sr.data import SRDataModule
from odm_sr.evaluation import eval_pad_mode, window_padding
from odm_sr.export.integer import extract_spec, integer_model
from odm_sr.export.onnx_graph import INPUT, to_onnx
from odm_sr.export.runtime import session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="img_001")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = RESULTS_DIR / ".export_bench_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    net, _ = small_swinir(5, tmp)
    int_model = integer_model(net, extract_spec(net))
    dm = SRDataModule(train=None, val=[], test=["B100"], scale=4, lr_patch=48, batch_size=1)
    dm.setup("test")
    data = dm.test_sets[0]
    item = next(data[i] for i in range(len(data)) if data[i]["name"] == args.image)
    x = item["lr"][None].numpy()
    graph = to_onnx(int_model, tuple(x.shape[-2:]))
    sess = session(graph, args.threads)
    times = []
    for i in range(args.runs + 2):
        t0 = time.perf_counter()
        sess.run(None, {INPUT: x})
        if i >= 2:
            times.append(time.perf_counter() - t0)
    with torch.no_grad(), window_padding(int_model, eval_pad_mode(int_model, "official")):
        t0 = time.perf_counter()
        int_model(torch.from_numpy(x))
        torch_exact_s = time.perf_counter() - t0
    row = {"label": args.label, "src": str(Path(odm_sr.__file__).parent), "image": args.image,
           "lr_hw": list(x.shape[-2:]), "threads": args.threads, "ort_int_ms": 1000 * statistics.median(times),
           "ort_int_ms_all": [1000 * t for t in times], "graph_nodes": None, "graph_bytes": len(graph),
           "torch_exact_ms_one_run": 1000 * torch_exact_s, "load_avg_1min": os.getloadavg()[0],
           "int_profile": profile(graph, x, args.threads, tmp)}
    import onnx

    row["graph_nodes"] = len(onnx.load_from_string(graph).graph.node)
    print(json.dumps(row, indent=1))
    out = args.out or RESULTS_DIR / f"export_swin_speed_{args.label}.json"
    write_json(out, {"environment": environment(), **row})


if __name__ == "__main__":
    main()
