"""Result tables of training runs: collect ``results.json`` files, one row per run, the paper beside ours.

A run row is labelled ``<model> x<scale> <method> <bits>`` (e.g. ``EDSR-baseline x4 ODM W2A2``); each model and
scale also gets the bicubic row and the FP (``model.pretrained``) row once, where a run recorded them. Runs that
share a label (a sweep) are told apart by the overrides that differ between them: from Hydra's
``<run>/.hydra/overrides.yaml`` when every one of them has it, else from a diff of their resolved configs
(paths, loggers and names left out). Cells are ``PSNR/SSIM``, followed by ``(paper PSNR/SSIM)`` where
``paper.paper_entry`` knows the number (METHODS.md §8).

Outputs (``write_report``): ``report.md``, ``report.tex`` (booktabs tabular), ``report.json`` and
``report.png`` (PSNR per set, one bar per row, the paper's numbers as black ticks). No torch import.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from odm_sr.analysis.paper import SETS, bits_label, config_value_or, paper_entry
from odm_sr.files import write_json

RESULTS_FILE = "results.json"
MODEL_LABELS = {"edsr": "EDSR", "edsr_baseline": "EDSR-baseline", "rdn": "RDN", "swinir_light": "SwinIR-light",
                "swinir_classical": "SwinIR", "hat_s": "HAT-S", "imdn": "IMDN", "pan": "PAN"}
METHOD_ORDER = ("fp", "pams", "daq", "ddtb", "lsq", "quantsr", "odm", "fqsr", "odm_fq")
METHOD_LABELS = {"fp": "FP", "pams": "PAMS", "daq": "DAQ", "ddtb": "DDTB", "lsq": "LSQ", "odm": "ODM",
                 "odm_fq": "ODM-FQ", "fqsr": "FQSR", "quantsr": "QuantSR"}
PRETRAINED_ROW = "FP (model.pretrained)"
# Config keys that differ between runs without being an experimental choice
IGNORED_KEYS = ("paths", "logger", "callbacks", "hydra", "run_name", "task_name", "tags", "resume",
                "trainer.default_root_dir", "data.data_root")


@dataclass
class Run:
    """One training run: its folder, its ``results.json`` and its Hydra overrides (None if not recorded)."""

    path: Path
    results: dict[str, Any]
    overrides: list[str] | None = None

    @property
    def config(self) -> dict[str, Any]:
        return self.results.get("config") or {}


@dataclass
class Row:
    """One table row: PSNR/SSIM per set (ours) and the paper's (PSNR, SSIM or None) where known."""

    label: str
    kind: str  # 'bicubic' | 'fp' | 'run'
    group: str  # '<model> x<scale>'
    metrics: dict[str, tuple[float, float]]
    paper: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    paper_source: str | None = None
    run: str | None = None
    key: tuple[str, int, str, str] | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    train_seconds: float | None = None
    steps: int | None = None


# -- collecting ------------------------------------------------------------------------------------------------
def find_results(root: str | Path) -> list[Path]:
    """Every ``results.json`` under ``root`` (or ``root`` itself if it is one), sorted; FileNotFoundError if none."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or directory")
    files = [root] if root.is_file() else sorted(root.rglob(RESULTS_FILE))
    if not files:
        raise FileNotFoundError(f"{root}: no {RESULTS_FILE} found (a run writes <output_dir>/{RESULTS_FILE} "
                                f"once training and testing finish)")
    return files


def _read_overrides(run_dir: Path) -> list[str] | None:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    import yaml  # ships with Hydra (omegaconf depends on PyYAML)

    loaded = yaml.safe_load(path.read_text())
    return [str(o) for o in loaded] if isinstance(loaded, list) else None


def load_runs(root: str | Path) -> list[Run]:
    """The runs under ``root`` (see ``find_results``)."""
    runs = []
    for path in find_results(root):
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        runs.append(Run(path.parent, results, _read_overrides(path.parent)))
    return runs


# -- labels ------------------------------------------------------------------------------------------------------
def run_key(config: dict[str, Any]) -> tuple[str, int, str, str]:
    """(model.name, model.scale, method.name, 'fp32' | 'w{W}a{A}') of a resolved config."""
    method = str(config_value_or(config, "method.name", "fp"))
    bits = "fp32" if method == "fp" else bits_label(config_value_or(config, "bits", {}))
    return (str(config_value_or(config, "model.name", "?")), int(config_value_or(config, "model.scale", 0)),
            method, bits)


def group_label(model: str, scale: int) -> str:
    return f"{MODEL_LABELS.get(model, model)} x{scale}"


def base_label(config: dict[str, Any]) -> str:
    """'EDSR-baseline x4 ODM W2A2'; FP runs have no bits; full quantization (ODM-FQ, FQSR) adds the skip bits
    ('SC8')."""
    model, scale, method, bits = run_key(config)
    label = f"{group_label(model, scale)} {METHOD_LABELS.get(method, method)}"
    if method != "fp":
        label += f" {bits.upper()}"
        if method == "fqsr" or config_value_or(config, "method.fq.enabled", False):
            label += f" SC{config_value_or(config, 'bits.sc', 32)}"
    return label


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} for nested dicts; lists are kept as values."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)


def _override_dict(overrides: list[str]) -> dict[str, str]:
    out = {}
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        out[key] = value
    return out


def differing(runs: Sequence[Run]) -> list[dict[str, str]]:
    """Per run, the overrides (or config values) that are not the same in all ``runs``."""
    configs = [{k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in flatten(r.config).items()}
               for r in runs]
    if all(r.overrides is not None for r in runs):  # an override one run lacks: that run's config value
        overrides = [_override_dict(r.overrides or []) for r in runs]
        keys = {k for o in overrides for k in o}
        values = [{k: o.get(k, c.get(k, "<unset>")) for k in keys} for o, c in zip(overrides, configs, strict=True)]
    else:
        values = configs
    keys = sorted({k for v in values for k in v if not _ignored(k)})
    varying = [k for k in keys if len({v.get(k) for v in values}) > 1]
    return [{k: v.get(k, "<unset>") for k in varying} for v in values]


def _sort_value(text: str) -> tuple[int, float, str]:
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


# -- rows --------------------------------------------------------------------------------------------------------
def _cells(per_set: dict[str, dict[str, float]]) -> dict[str, tuple[float, float]]:
    return {s: (float(v["psnr"]), float(v["ssim"])) for s, v in per_set.items()}


def _paper_row(row: Row, config: dict[str, Any] | None) -> Row:
    entry = paper_entry(*row.key, config=config) if row.key else None
    if entry is not None:
        row.paper, row.paper_source = dict(entry.sets), entry.source
    return row


def _run_row(run: Run, label: str, overrides: dict[str, str]) -> Row:
    cfg, results = run.config, run.results
    key = run_key(cfg)
    own = results.get("metrics", {}).get(results.get("run_name", ""), {})
    row = Row(label, "run", group_label(*key[:2]), _cells(own), run=str(run.path), key=key, overrides=overrides,
              train_seconds=results.get("train_seconds"), steps=results.get("steps"))
    return _paper_row(row, cfg)


def _own_run(checkpoint: str, runs: Sequence[Run]) -> bool:
    """``checkpoint`` lies in the folder of one of ``runs`` (that FP run has its own row)."""
    path = Path(checkpoint).resolve() if checkpoint else None
    return path is not None and any(path.is_relative_to(run.path.resolve()) for run in runs)


def _shared_rows(runs: Sequence[Run]) -> dict[tuple, list[Row]]:
    """The bicubic row (merged over runs, first value per set) and one FP row per pretrained file that is not one
    of ``runs``' own checkpoints, per model and scale."""
    shared: dict[tuple, dict[str, Row]] = {}
    for run in runs:
        model, scale, _, _ = run_key(run.config)
        rows = shared.setdefault((model, scale), {})
        metrics = run.results.get("metrics", {})
        glabel = group_label(model, scale)
        if "bicubic" in metrics:
            row = rows.setdefault("bicubic", Row(f"{glabel} bicubic", "bicubic", glabel, {}))
            for s, cell in _cells(metrics["bicubic"]).items():
                row.metrics.setdefault(s, cell)
        source = str(config_value_or(run.config, "model.pretrained", ""))
        if PRETRAINED_ROW in metrics and not _own_run(source, runs):
            row = Row(f"{glabel} FP (pretrained)", "fp", glabel, _cells(metrics[PRETRAINED_ROW]),
                      run=str(run.path), key=(model, scale, "fp", "fp32"))
            rows.setdefault(f"fp:{source}", _paper_row(row, run.config))
    return {k: list(v.values()) for k, v in shared.items()}


def build_rows(runs: Sequence[Run]) -> list[Row]:
    """All rows, grouped by model and scale: bicubic, FP, then the runs by bits (high first), method, sweep value."""
    by_label: dict[str, list[Run]] = {}
    for run in runs:
        by_label.setdefault(base_label(run.config), []).append(run)
    run_rows: list[Row] = []
    for label, group in by_label.items():
        diffs = differing(group) if len(group) > 1 else [{}]
        for run, diff in zip(group, diffs, strict=True):
            suffix = ", ".join(f"{k}={v}" for k, v in diff.items())
            run_rows.append(_run_row(run, f"{label} ({suffix})" if suffix else label, diff))
    _disambiguate(run_rows)

    def order(row: Row) -> tuple:
        _, _, method, bits = row.key or ("", 0, "", "")
        width = 32 if bits == "fp32" else int(bits[1:].partition("a")[0])
        rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
        return (-width, rank, row.label.split(" (")[0], tuple(_sort_value(v) for v in row.overrides.values()))

    shared = _shared_rows(runs)
    groups = list(dict.fromkeys([*shared, *((r.key[0], r.key[1]) for r in run_rows if r.key)]))
    rows: list[Row] = []
    for model, scale in groups:
        rows += shared.get((model, scale), [])
        rows += sorted((r for r in run_rows if r.key and r.key[:2] == (model, scale)), key=order)
    return rows


def _disambiguate(rows: list[Row]) -> None:
    """Rows that still share a label (identical configs) get their run folder appended."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.label] = counts.get(row.label, 0) + 1
    for row in rows:
        if counts[row.label] > 1:
            row.label += f" [{Path(row.run or '').name}]"


def report_sets(rows: Iterable[Row], sets: Sequence[str] | None = None) -> list[str]:
    """``sets`` if given, else every set any row has: Set5, Set14, B100, Urban100 first, the rest by name."""
    if sets:
        return list(sets)
    found = {s for row in rows for s in row.metrics}
    return [s for s in SETS if s in found] + sorted(found - set(SETS))


# -- formats -----------------------------------------------------------------------------------------------------
def cell_parts(row: Row, set_name: str) -> tuple[str | None, str | None]:
    """('31.20/0.8712', '31.50/0.882'): ours and the paper's, None where absent."""
    ours = row.metrics.get(set_name)
    ref = row.paper.get(set_name)
    ours_text = f"{ours[0]:.2f}/{ours[1]:.4f}" if ours else None
    ref_text = (f"{ref[0]:.2f}" + (f"/{ref[1]:.3f}" if ref[1] is not None else "")) if ref else None
    return ours_text, ref_text


def format_cell(row: Row, set_name: str) -> str:
    """'31.20/0.8712 (paper 31.50/0.882)'; '–' where the row has no number for the set."""
    ours, ref = cell_parts(row, set_name)
    return (ours or "–") + (f" (paper {ref})" if ref else "")


def to_markdown(rows: Sequence[Row], sets: Sequence[str]) -> str:
    lines = ["| run | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
    lines += [f"| {row.label} | " + " | ".join(format_cell(row, s) for s in sets) + " |" for row in rows]
    sources = sorted({row.paper_source for row in rows if row.paper_source})
    note = f"\n\nPSNR/SSIM (MATLAB Y). In parentheses: the paper (METHODS.md §8: {', '.join(sources)})." \
        if sources else "\n\nPSNR/SSIM (MATLAB Y)."
    return "\n".join(lines) + note


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(rows: Sequence[Row], sets: Sequence[str]) -> str:
    """A booktabs ``tabular``: one block per model and scale, paper numbers in small type."""
    lines = [r"\begin{tabular}{l" + "c" * len(sets) + "}", r"\toprule",
             "Run & " + " & ".join(latex_escape(s) for s in sets) + r" \\", r"\midrule"]
    previous = None
    for row in rows:
        if previous is not None and row.group != previous:
            lines.append(r"\midrule")
        previous = row.group
        cells = [(ours or "--") + (f" {{\\scriptsize ({ref})}}" if ref else "")
                 for ours, ref in (cell_parts(row, s) for s in sets)]
        lines.append(latex_escape(row.label) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_json(rows: Sequence[Row], sets: Sequence[str]) -> dict[str, Any]:
    return {"sets": list(sets), "rows": [asdict(row) for row in rows]}


def plot_report(rows: Sequence[Row], sets: Sequence[str], path: str | Path | None = None):
    """PSNR per set: one panel per model and scale, one bar per row, the paper's PSNR as black ticks.
    Returns the matplotlib ``Figure`` (drawn without pyplot, i.e. on the Agg canvas)."""
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys(row.group for row in rows))
    fig = Figure(figsize=(max(6.0, 1.6 * len(sets) + 4.0), 3.6 * max(1, len(groups))), layout="constrained")
    axes = fig.subplots(max(1, len(groups)), 1, squeeze=False)[:, 0]
    for ax, group in zip(axes, groups, strict=False):
        members = [r for r in rows if r.group == group]
        width = 0.8 / max(1, len(members))
        values, labelled = [], False
        for i, row in enumerate(members):
            xs = [j + (i - (len(members) - 1) / 2) * width for j in range(len(sets))]
            # an exact reconstruction has PSNR inf: no bar (the tables print "inf")
            ys = [row.metrics[s][0] if s in row.metrics and math.isfinite(row.metrics[s][0]) else math.nan
                  for s in sets]
            ax.bar(xs, ys, width, label=row.label)
            refs = [row.paper[s][0] if s in row.paper else math.nan for s in sets]
            has_paper = any(not math.isnan(v) for v in refs)
            ax.scatter(xs, refs, marker="_", s=200, color="black", zorder=3,
                       label="paper" if has_paper and not labelled else None)
            labelled = labelled or has_paper
            values += [v for v in ys + refs if not math.isnan(v)]
        if values:
            ax.set_ylim(min(values) - 1.0, max(values) + 0.5)
        ax.set_xticks(range(len(sets)), list(sets))
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(group)
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def write_report(root: str | Path, out: str | Path | None = None, sets: Sequence[str] | None = None
                 ) -> dict[str, Any]:
    """Collect the runs under ``root`` and write report.{md,tex,json,png} into ``out`` (default ``root``).
    Returns {'markdown', 'rows', 'sets', 'paths'}."""
    rows = build_rows(load_runs(root))
    sets = report_sets(rows, sets)
    out = Path(out) if out is not None else (Path(root) if Path(root).is_dir() else Path(root).parent)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows, sets)
    paths = {ext: out / f"report.{ext}" for ext in ("md", "tex", "json", "png")}
    paths["md"].write_text(markdown + "\n")
    paths["tex"].write_text(to_latex(rows, sets))
    write_json(paths["json"], to_json(rows, sets))  # strict JSON: inf PSNR as "inf"
    plot_report(rows, sets, paths["png"])
    return {"markdown": markdown, "rows": rows, "sets": sets, "paths": paths}
