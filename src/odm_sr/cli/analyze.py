"""`odm-sr-analyze`: the supplement's analyses (METHODS.md §7) of a trained checkpoint.

    odm-sr-analyze variance --ckpt RUN/checkpoints/last.ckpt [--data div2k_801_900] [--definition channel_mean]
    odm-sr-analyze mismatch --ckpt PATH [--data B100] [--quantizer own|fixed] [--before]
    odm-sr-analyze hist     --ckpt PATH [--data B100] [--image img_001] [--layers first middle last]
    odm-sr-analyze wstats   --ckpt PATH
    odm-sr-analyze timing   --runs SWEEP_DIR [RUN_DIR ...]   (or --ckpt: its run folder)

Each prints a markdown table and writes ``<out>/<analysis>.json`` (and ``.png`` for hist and wstats); ``--out``
defaults to ``<run>/analysis``. ``--limit N`` keeps the first N images; ``--data-root`` overrides the data root.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from odm_sr.console import one_line_errors

ANALYSES = ("variance", "mismatch", "hist", "wstats", "timing")
DEFAULT_DATA = {"variance": "div2k_801_900", "mismatch": "B100", "hist": "B100"}  # analysis.*.dataset
DEFAULT_IMAGE = {"B100": "img_001"}  # analysis.hist.image


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="odm-sr-analyze", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("analysis", choices=ANALYSES)
    parser.add_argument("--ckpt", help="an odm-sr training checkpoint (.ckpt)")
    parser.add_argument("--runs", nargs="+", help="timing: run or sweep folders holding results.json")
    parser.add_argument("--data", help=f"test set (defaults: {DEFAULT_DATA})")
    parser.add_argument("--data-root", default=None, help="data root (default: $ODM_SR_DATA or ../shared/data)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N images only")
    parser.add_argument("--out", default=None, help="output folder (default: <run>/analysis)")
    parser.add_argument("--definition", default="channel_mean",
                        choices=("channel_mean", "channel_std", "tensor_mean_std"), help="analysis.var.definition")
    parser.add_argument("--quantizer", default="own", choices=("own", "fixed"), help="analysis.mismatch.quantizer")
    parser.add_argument("--before", action="store_true",
                        help="mismatch: add the before-QAT row (model.pretrained under ODM's j = 99 init)")
    parser.add_argument("--image", default=None, help="hist: image name (default: img_001 on B100, else the first)")
    parser.add_argument("--layers", nargs="+", default=["first", "middle", "last"], help="hist: analysis.hist.layers")
    parser.add_argument("--bins", type=int, default=100)
    args = parser.parse_args(argv)
    if args.analysis != "timing" and not args.ckpt:
        parser.error(f"{args.analysis} needs --ckpt")
    if args.analysis == "timing" and not (args.runs or args.ckpt):
        parser.error("timing needs --runs (or --ckpt)")
    return args


def run_dir(ckpt: str | Path) -> Path:
    """<run> for <run>/checkpoints/x.ckpt, else the checkpoint's folder."""
    parent = Path(ckpt).resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def summary_table(rows: Iterable[tuple[str, Any]]) -> str:
    """A two-column markdown table of (quantity, value)."""
    lines = ["| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def analysis_dataset(name: str, scale: int, data_root: str | Path | None = None, limit: int | None = None):
    """The test split of a named set (``data.registry``); ``div2k_801_900`` is DIV2K 0801-0900
    (``analysis.var.images``). ``limit`` keeps the first images."""
    from torch.utils.data import Subset

    from odm_sr.data.registry import build_dataset

    index_range = None
    if name.lower().startswith("div2k_") and name[6:].replace("_", "").isdigit():
        first, last = name[6:].split("_")
        name, index_range = "div2k", (int(first), int(last))
    dataset = build_dataset(name, "test", int(scale), data_root, index_range=index_range)
    return Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset


def _placement(cfg) -> dict | None:
    """The run's ``method.placement`` as a dict (used where the network has no quantized layer)."""
    from omegaconf import OmegaConf

    placement = cfg.method.get("placement")
    return OmegaConf.to_container(placement, resolve=True) if placement is not None else None


def _images(args: argparse.Namespace, cfg) -> tuple[str, Any]:
    name = args.data or DEFAULT_DATA[args.analysis]
    return name, analysis_dataset(name, int(cfg.model.scale), args.data_root, args.limit)


def _names(dataset) -> list[str]:
    """Image names without loading the images (``SRImageDataset.names``, also through a ``Subset``)."""
    from torch.utils.data import Subset

    from odm_sr.data.datasets import SRImageDataset

    subset = isinstance(dataset, Subset)
    base, indices = (dataset.dataset, dataset.indices) if subset else (dataset, range(len(dataset)))
    if isinstance(base, SRImageDataset):
        return [base.names[i] for i in indices]
    return [dataset[i]["name"] for i in range(len(dataset))]


def _pick_image(dataset, wanted: str | None):
    names = _names(dataset)
    if wanted is None:
        return dataset[0]
    if wanted not in names:
        raise SystemExit(f"odm-sr-analyze: error: image {wanted!r} not in the data set (first: {names[:5]})")
    return dataset[names.index(wanted)]


def analyze_variance(args, net, cfg, out: Path) -> tuple[str, dict]:
    from odm_sr.analysis.distributions import feature_variance
    from odm_sr.analysis.paper import s9_reference

    data, images = _images(args, cfg)
    result = feature_variance(net, images, args.definition, _placement(cfg))
    paper = s9_reference(cfg.model.name, cfg.model.scale)
    rows = [("data", data), ("definition", args.definition), ("images", result["num_images"]),
            ("layers", result["num_layers"]), ("image-wise variance", result["image_wise"]),
            ("channel-wise variance", result["channel_wise"])]
    if paper:
        rows += [("paper image-wise / channel-wise (S9)", f"{paper[0]} / {paper[1]}")]
    return summary_table(rows), {**result, "data": data, "paper": paper}


def analyze_mismatch(args, net, cfg, out: Path) -> tuple[str, dict]:
    from odm_sr.analysis.distributions import feature_mismatch, odm_initialized
    from odm_sr.analysis.paper import s10_reference

    data, images = _images(args, cfg)
    results = {str(cfg.method.name): feature_mismatch(net, images, args.quantizer)}
    if args.before:
        from odm_sr.builders import pretrained_network

        if not cfg.model.get("pretrained"):
            raise ValueError("--before needs the run's FP weights (model.pretrained), and this run has none")
        fp = pretrained_network(cfg.model)
        before = odm_initialized(fp, images, bits=int(cfg.bits.a))  # ODM's own placement
        results = {"before": feature_mismatch(before, images, args.quantizer), **results}
    lines = ["| network | Var[mean] | Var[std] | mismatch | paper (S10) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        paper = s10_reference(cfg.model.name, cfg.model.scale, name)
        ref = " / ".join(f"{v:.3g}" for v in paper) if paper else "–"
        lines.append(f"| {name} | {r['var_mean']:.4g} | {r['var_std']:.4g} | {r['mismatch']:.4g} | {ref} |")
    first = next(iter(results.values()))
    lines.append(f"\n{data}: {first['num_images']} images, {first['num_layers']} layers, quantizer={args.quantizer}")
    return "\n".join(lines), {"data": data, "results": results}


def analyze_hist(args, net, cfg, out: Path) -> tuple[str, dict]:
    from odm_sr.analysis.distributions import activation_histograms

    data, images = _images(args, cfg)
    wanted = args.image or DEFAULT_IMAGE.get(data)
    if args.image is None and wanted not in _names(images):
        wanted = None
    item = _pick_image(images, wanted)
    hists = activation_histograms(net, item, args.layers, args.bins, out / "hist.png")
    lines = ["| layer | quantizer | min | max | mean | std | levels |", "|---|---|---|---|---|---|---|"]
    for name, h in hists.items():
        levels = ", ".join(f"{v:.3g}" for v in h["levels"]) if h["levels"] is not None else "dynamic / none"
        lines.append(f"| {name} | {h['quantizer']} | {h['min']:.4g} | {h['max']:.4g} | {h['mean']:.4g} | "
                     f"{h['std']:.4g} | {levels} |")
    return "\n".join(lines) + f"\n\n{data}/{item['name']}", {"data": data, "image": item["name"], "layers": hists}


def analyze_wstats(args, net, cfg, out: Path) -> tuple[str, dict]:
    from odm_sr.analysis.distributions import weight_stats
    from odm_sr.analysis.plots import plot_weight_stats

    stats = weight_stats(net, _placement(cfg))
    plot_weight_stats(stats, out / "wstats.png")
    lines = ["| layer | min | max | mean | u_w |", "|---|---|---|---|---|"]
    lines += [f"| {s['layer']} | {s['min']:.4g} | {s['max']:.4g} | {s['mean']:.4g} | "
              f"{'–' if s['clip'] is None else format(s['clip'], '.4g')} |" for s in stats]
    return "\n".join(lines), {"layers": stats}


def run_analysis(args: argparse.Namespace, out: Path) -> tuple[str, dict]:
    """(markdown table, JSON-able result) of one analysis."""
    if args.analysis == "timing":
        from odm_sr.analysis.timing import timing_table, training_time

        result = training_time(args.runs or [run_dir(args.ckpt)])
        return timing_table(result), result
    import torch

    from odm_sr.trained import load_trained

    net, _, cfg = load_trained(args.ckpt)  # the analyses read the network and the run's config
    out.mkdir(parents=True, exist_ok=True)
    analyze = {"variance": analyze_variance, "mismatch": analyze_mismatch, "hist": analyze_hist,
               "wstats": analyze_wstats}[args.analysis]
    with torch.no_grad():  # scoped: main() also runs in-process (tests, notebooks)
        return analyze(args, net, cfg, out)


AFTER_FIT = ("mismatch", "variance", "wstats")  # analyses a training run can run on itself (analyze.after_fit)


def analysis_summary(name: str, path: Path) -> dict[str, Any]:
    """The headline numbers of an analysis JSON written by ``main``: mismatch (S10) → mismatch, var_mean,
    var_std of the run's own network; variance (S9) → image_wise, channel_wise; wstats → the number of layers."""
    result = json.loads(Path(path).read_text())
    if name == "mismatch":
        own = result["results"][next(k for k in result["results"] if k != "before")]
        return {"data": result["data"], **{k: own[k] for k in ("mismatch", "var_mean", "var_std")}}
    if name == "variance":
        return {"data": result["data"], "image_wise": result["image_wise"], "channel_wise": result["channel_wise"]}
    if name == "wstats":
        return {"layers": len(result["layers"])}
    raise ValueError(f"analyze.after_fit: {name!r} is not one of {AFTER_FIT}")


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table and write the files (returns None: console scripts pass it to ``sys.exit``)."""
    args = parse_args(argv)
    out = Path(args.out) if args.out else (run_dir(args.ckpt) if args.ckpt else Path(args.runs[0])) / "analysis"
    with one_line_errors("odm-sr-analyze", also=(KeyError,)):  # HYDRA_FULL_ERROR=1: with the traceback
        table, result = run_analysis(args, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.analysis}.json").write_text(json.dumps(_jsonable(result), indent=2))
    print(table)
    print(f"\nwrote {out / (args.analysis + '.json')}" + (f" and {out / (args.analysis + '.png')}"
                                                          if args.analysis in ("hist", "wstats") else ""))


if __name__ == "__main__":
    main()
