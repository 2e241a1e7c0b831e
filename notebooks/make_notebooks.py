"""Write the thin analysis notebooks of odm-sr (no outputs, no execution counts).

Usage: python notebooks/make_notebooks.py notebooks   (edit the cells here, not in the .ipynb files)
"""
# ruff: noqa: E501  (the cell sources are kept as written in the notebooks)
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(sys.argv[1])

SETUP = """%matplotlib inline
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

# Paths are relative to the repository root (Jupyter starts notebooks in notebooks/)
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()"""

LOAD = """from odm_sr.trained import load_trained
from odm_sr.data.registry import build_dataset

net, _, cfg = load_trained(ROOT / CKPT)
dataset = build_dataset(DATA, "test", int(cfg.model.scale))
images = [dataset[i] for i in range(min(LIMIT, len(dataset)) if LIMIT else len(dataset))]
print(f"{cfg.run_name}: {len(images)} images of {DATA}")"""


def params(*lines: str):
    cell = new_code_cell("import os\n\n" + "\n".join(lines))
    cell.metadata["tags"] = ["parameters"]
    return cell


CKPT = 'CKPT = os.environ.get("ODM_SR_CKPT", "logs/main/odm_w2a2/checkpoints/last.ckpt")'
DATA = ('DATA = os.environ.get("ODM_SR_DATASET", "sample_test")  # METHODS.md §7 uses B100 '
        '(S1: B100/img_001)')
LIMIT = 'LIMIT = int(os.environ.get("ODM_SR_LIMIT", "0"))  # first N images only; 0 = all'

NOTEBOOKS = {
    "01_activation_distributions.ipynb": [
        new_markdown_cell("# Figure S1: activation distributions before quantization\n\n"
                          "Histograms of the pre-quantizer tensor X_i of the first, middle and last quantized layer "
                          "(quantized forward of one image, after QAT), with the quantizer's static levels in red "
                          "(`odm_sr.analysis.activation_histograms`; METHODS.md §7, `analysis.hist.*`)."),
        params(CKPT, DATA, LIMIT, 'IMAGE = os.environ.get("ODM_SR_IMAGE", "")  # image name; "" = the first',
               'LAYERS = ["first", "middle", "last"]  # analysis.hist.layers'),
        new_code_cell(SETUP),
        new_code_cell(LOAD),
        new_code_cell("from odm_sr.analysis import activation_histograms, plot_histograms\n\n"
                      "names = [item[\"name\"] for item in images]\n"
                      "image = images[names.index(IMAGE)] if IMAGE else images[0]\n"
                      "hists = activation_histograms(net, image, LAYERS)\n"
                      "for name, h in hists.items():\n"
                      "    levels = None if h[\"levels\"] is None else h[\"levels\"].round(3).tolist()\n"
                      "    print(f\"{name}: {h['quantizer']}, range [{h['min']:.3g}, {h['max']:.3g}], levels {levels}\")\n"
                      "plot_histograms(hists)"),
    ],
    "02_weight_ranges.ipynb": [
        new_markdown_cell("# Figure S2: weight ranges after QAT\n\n"
                          "Min, max and mean of the latent weights of every quantized layer, with the weight "
                          "quantizer's clip bound ±u_w where it has one (`odm_sr.analysis.weight_stats`; "
                          "`analysis.wstats.source=latent`)."),
        params(CKPT),
        new_code_cell(SETUP),
        new_code_cell("from odm_sr.analysis import plot_weight_stats, weight_stats\n"
                      "from odm_sr.trained import load_trained\n\n"
                      "net, _, cfg = load_trained(ROOT / CKPT)\n"
                      "stats = weight_stats(net)\n"
                      "rows = [\"| layer | min | max | mean | u_w |\", \"|---|---|---|---|---|\"]\n"
                      "for s in stats:\n"
                      "    clip = \"–\" if s[\"clip\"] is None else f\"{s['clip']:.4g}\"\n"
                      "    rows.append(f\"| {s['layer']} | {s['min']:.4g} | {s['max']:.4g} | {s['mean']:.4g} | {clip} |\")\n"
                      "display(Markdown(\"\\n\".join(rows)))"),
        new_code_cell("plot_weight_stats(stats)"),
    ],
    "03_feature_mismatch.ipynb": [
        new_markdown_cell("# S9 / S10: feature variance and feature mismatch\n\n"
                          "S9: image-wise and channel-wise variance of the quantized layers' inputs in the FP "
                          "forward (`feature_variance`, `analysis.var.definition`). S10: Var[mean], Var[std] of the "
                          "pre-quantizer tensors over images and the mismatch ‖X − q(X)‖₂ with each layer's own "
                          "quantizer (`feature_mismatch`). The paper's numbers are in `odm_sr.analysis.paper`."),
        params(CKPT, DATA, LIMIT, 'DEFINITION = "channel_mean"  # analysis.var.definition'),
        new_code_cell(SETUP),
        new_code_cell(LOAD),
        new_code_cell("from odm_sr.analysis import feature_mismatch, feature_variance\n"
                      "from odm_sr.analysis.paper import s9_reference, s10_reference\n\n"
                      "var = feature_variance(net, images, DEFINITION)\n"
                      "mis = feature_mismatch(net, images)\n"
                      "paper_var = s9_reference(cfg.model.name, cfg.model.scale)  # None: not in the paper\n"
                      "paper_mis = s10_reference(cfg.model.name, cfg.model.scale, cfg.method.name)\n"
                      "display(Markdown(\"\\n\".join([\n"
                      "    \"| quantity | ours | paper |\", \"|---|---|---|\",\n"
                      "    f\"| image-wise variance (S9) | {var['image_wise']:.4g} | {paper_var[0] if paper_var else '–'} |\",\n"
                      "    f\"| channel-wise variance (S9) | {var['channel_wise']:.4g} | {paper_var[1] if paper_var else '–'} |\",\n"
                      "    f\"| Var[mean] (S10) | {mis['var_mean']:.4g} | {paper_mis[0] if paper_mis else '–'} |\",\n"
                      "    f\"| Var[std] (S10) | {mis['var_std']:.4g} | {paper_mis[1] if paper_mis else '–'} |\",\n"
                      "    f\"| mismatch (S10) | {mis['mismatch']:.4g} | {paper_mis[2] if paper_mis else '–'} |\",\n"
                      "])))"),
        new_code_cell("fig, ax = plt.subplots(figsize=(7, 3))\n"
                      "layers = list(mis[\"layers\"])\n"
                      "ax.bar(range(len(layers)), [mis[\"layers\"][n][\"mismatch\"] for n in layers])\n"
                      "ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=\"x-small\")\n"
                      "ax.set_ylabel(\"mean ‖X − q(X)‖₂\")\n"
                      "ax.set_title(f\"{cfg.run_name}: mismatch per layer\");"),
    ],
    "04_compare_methods.ipynb": [
        new_markdown_cell("# Compare methods: the result table of a sweep\n\n"
                          "Every `results.json` under `SWEEP_DIR`, one row per run (sweeps labelled by the overrides "
                          "that differ), the paper's numbers beside ours (`odm_sr.analysis.report`, also "
                          "`odm-sr-report SWEEP_DIR`), and the training time per method (S12)."),
        params('SWEEP_DIR = os.environ.get("ODM_SR_SWEEP_DIR", "logs/main")',
               'SETS = None  # e.g. ["Set5", "Set14", "B100", "Urban100"]; None = every set found'),
        new_code_cell(SETUP),
        new_code_cell("from odm_sr.analysis import build_rows, load_runs, plot_report, to_markdown\n"
                      "from odm_sr.analysis.report import report_sets\n\n"
                      "rows = build_rows(load_runs(ROOT / SWEEP_DIR))\n"
                      "sets = report_sets(rows, SETS)\n"
                      "display(Markdown(to_markdown(rows, sets)))"),
        new_code_cell("plot_report(rows, sets)"),
        new_code_cell("from odm_sr.analysis import timing_table, training_time\n\n"
                      "display(Markdown(timing_table(training_time(ROOT / SWEEP_DIR))))"),
    ],
}

for name, cells in NOTEBOOKS.items():
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.validate(nb)
    nbformat.write(nb, OUT / name)
    print("wrote", OUT / name)
