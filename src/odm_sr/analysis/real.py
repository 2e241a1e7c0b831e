"""QAT from real trained networks: the tables of the ``real_*`` sweeps (``conf/sweep/real_*.yaml``).

``odm-sr-report <sweep folder> [<sweep folder> ...] --real`` reads every ``results.json`` below the folders
(``report.load_runs``) and groups the runs by what differs between them except the seed: the resolved config
less the seed, the sweep's name and the keys that do not change a result (``hydra.job.config.override_dirname.
exclude_keys`` of ``conf/sweep/common.yaml``: paths, loggers, progress bars, ...). λ_M and the ``mr.*`` settings
do not act when MR is off (``mechanism.condition_of``), so they do not split a no-MR condition. Two runs of one
condition and one seed (the same job in two sweeps) count once: the first by path; the JSON names the other.

Tables, per network, scale and bit-width:

* methods: FP (the official weights: the ``FP (model.pretrained)`` row that runs with ``eval.pretrained_row=true``
  test, else the ``<model> FP (<file>)`` row of an ``odm-sr-eval`` JSON given with ``--fp-eval``, else left out
  with a note), bicubic, then every method (ODM with cooperative MR; its ablation rows in the next table);
  columns Set5 / Set14 / B100 PSNR and SSIM (MATLAB Y), the S10 mismatch on B100 (``analysis.mismatch``), the run
  mean of ρ = λ_M·w·‖g_M‖/‖g_R‖ (``mr_balance.rho_mean``) and n, the number of seeds;
* ablation: ODM's rows a–e of METHODS.md §5.8 that ran (c: WCC, no MR; d: naive MR; e: cooperative), by λ_M.

Cells are ``mean ± sd`` over seeds (sample sd; the mean alone for one seed). A seed whose value is not finite
(a run that diverged) is left out of the mean and counted in the cell (``+1 nan``). Outputs: ``real.md``,
``real.json`` and ``real.png`` (PSNR per set and row, ± sd). No torch import.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from odm_sr.analysis.mechanism import Condition, condition_of
from odm_sr.analysis.paper import config_value_or
from odm_sr.analysis.report import IGNORED_KEYS, METHOD_ORDER, PRETRAINED_ROW, Run, flatten, group_label, load_runs
from odm_sr.config import CONFIG_DIR
from odm_sr.files import write_json

SETS = ("Set5", "Set14", "B100")
MISMATCH_SET = "B100"
SEED_KEYS = ("seed", "data.seed", "sweep_name")
MR_KEYS = ("method.lambda_m", "method.mr")  # they do not act when MR is off


def result_neutral_keys() -> tuple[str, ...]:
    """The keys a sweep leaves out of its job folders' names because they do not change a result."""
    common = yaml.safe_load((CONFIG_DIR / "sweep" / "common.yaml").read_text())
    return tuple(common["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"])


@dataclass
class Group:
    """One condition of one network: its runs, one per seed (``skipped``: further runs of a seed already in)."""

    model: str
    scale: int
    bits: str
    cond: Condition
    setting: dict[str, str]  # the flattened config that defines it (seed and result-neutral keys left out)
    runs: list[Run] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    label: str = ""

    @property
    def table(self) -> tuple[str, int, str]:
        return (self.model, self.scale, self.bits)


def setting_of(config: dict[str, Any], cond: Condition, ignored: Sequence[str]) -> dict[str, str]:
    """The flattened config less ``ignored`` keys (and the MR keys when MR is off), values as text."""
    drop = tuple(ignored) + (MR_KEYS if cond.mode == "off" else ())
    flat = flatten(config)
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in sorted(flat.items())
            if not any(k == d or k.startswith(d + ".") for d in drop)}


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs grouped by setting (everything but the seed), one run per seed; labels told apart where needed."""
    ignored = (*IGNORED_KEYS, *SEED_KEYS, *result_neutral_keys())
    groups: dict[str, Group] = {}
    for run in sorted(runs, key=lambda r: str(r.path)):
        cond = condition_of(run.config)
        setting = setting_of(run.config, cond, ignored)
        key = json.dumps(setting)
        group = groups.setdefault(key, Group(str(config_value_or(run.config, "model.name", "?")),
                                             int(config_value_or(run.config, "model.scale", 0)), cond.bits,
                                             cond, setting))
        seed = config_value_or(run.config, "seed", 0)
        if seed in group.seeds:
            group.skipped.append(str(run.path))
        else:
            group.seeds.append(seed)
            group.runs.append(run)
    out = list(groups.values())
    _label(out)
    return out


def _label(groups: Sequence[Group]) -> None:
    """``Condition.label``, plus the setting keys that differ between groups of one table sharing that label."""
    by_label: dict[tuple, list[Group]] = {}
    for g in groups:
        by_label.setdefault((*g.table, g.cond.label), []).append(g)
    for (*_, label), members in by_label.items():
        keys = sorted({k for g in members for k in g.setting})
        varying = [k for k in keys if len({g.setting.get(k, "<unset>") for g in members}) > 1]
        for g in members:
            extra = ", ".join(f"{k}={g.setting.get(k, '<unset>')}" for k in varying)
            g.label = f"{label} ({extra})" if extra else label


# -- per-run values ----------------------------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    return None if value is None else float(value)  # results.json writes nan/inf as strings


def metric(set_name: str, kind: str) -> Callable[[Run], float | None]:
    """PSNR or SSIM (``kind``) of the run's own test row on ``set_name``."""
    def value(run: Run) -> float | None:
        own = run.results.get("metrics", {}).get(run.results.get("run_name", ""), {})
        return _number(own[set_name][kind]) if set_name in own else None
    return value


def rho(run: Run) -> float | None:
    return _number((run.results.get("mr_balance") or {}).get("rho_mean"))


def mismatch(run: Run) -> float | None:
    """The S10 mismatch of the run's network if ``analyze.after_fit`` ran it on B100."""
    summary = (run.results.get("analysis") or {}).get("mismatch") or {}
    return _number(summary.get("mismatch")) if summary.get("data") == MISMATCH_SET else None


@dataclass
class Stat:
    """mean and sample sd (0 for one value) of the finite values; ``bad``: how many were not finite."""

    mean: float
    sd: float
    n: int
    bad: int = 0

    def text(self, digits: int) -> str:
        if self.n == 0:
            return f"nan (×{self.bad})"
        body = f"{self.mean:.{digits}f}" + (f" ± {self.sd:.{digits}f}" if self.n > 1 else "")
        return body + (f" (+{self.bad} nan)" if self.bad else "")


def summarize(values: Sequence[float | None]) -> Stat | None:
    """None when no run has the value; else the Stat over the runs that have it."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    finite = [v for v in present if math.isfinite(v)]
    mean = statistics.fmean(finite) if finite else math.nan
    sd = statistics.stdev(finite) if len(finite) > 1 else 0.0 if finite else math.nan
    return Stat(mean, sd, len(finite), len(present) - len(finite))


def group_stat(group: Group, value: Callable[[Run], float | None]) -> Stat | None:
    return summarize([value(r) for r in group.runs])


def _cell(stat: Stat | None, digits: int) -> str:
    return "–" if stat is None else stat.text(digits)


# -- reference rows (FP, bicubic) ---------------------------------------------------------------------------------
def load_eval_rows(paths: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """The rows of ``odm-sr-eval`` JSON files ({row: {set: {psnr, ssim}}}), later files winning."""
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        try:
            loaded = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"--fp-eval {path}: no such file") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"--fp-eval {path}: not valid JSON ({err})") from err
        if not isinstance(loaded, dict):
            raise ValueError(f"--fp-eval {path}: expected odm-sr-eval's {{row: {{set: {{psnr, ssim}}}}}}")
        rows.update(loaded)
    return rows


def reference_rows(groups: Sequence[Group], eval_rows: dict[str, dict[str, Any]]
                   ) -> tuple[dict[tuple, dict[str, dict]], list[str]]:
    """Per (model, scale): {'FP': {set: {psnr, ssim}}, 'bicubic': ...} where found, and notes on what is not."""
    refs: dict[tuple, dict[str, dict]] = {}
    notes = []
    for g in groups:
        rows = refs.setdefault((g.model, g.scale), {})
        for run in g.runs:
            metrics = run.results.get("metrics", {})
            for name, row in (("FP", PRETRAINED_ROW), ("bicubic", "bicubic")):
                if row in metrics:
                    rows.setdefault(name, metrics[row])
    for (model, scale), rows in refs.items():
        files = sorted({Path(str(config_value_or(r.config, "model.pretrained", ""))).name for g in groups
                        if (g.model, g.scale) == (model, scale) for r in g.runs} - {""})
        found = next((eval_rows[f"{model} FP ({f})"] for f in files if f"{model} FP ({f})" in eval_rows), None)
        if "FP" not in rows and found is not None:
            rows["FP"] = found
        elif "FP" not in rows:
            notes.append(f"{group_label(model, scale)}: no FP row (no run tested with eval.pretrained_row=true, and "
                         f"no --fp-eval file has a row {' or '.join(repr(f'{model} FP ({f})') for f in files)}; "
                         f"`odm-sr-eval model={model} model.scale={scale} model.pretrained=<file>` writes one)")
    return refs, notes


# -- tables -------------------------------------------------------------------------------------------------------
def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _ablation_only(g: Group) -> bool:
    """ODM's rows a-d (no WCC, or no / naive MR): the ablation table's, not the methods table's."""
    return g.cond.method == "odm" and g.cond.row in ("a", "b", "c", "d")


def _order(g: Group) -> tuple:
    rank = METHOD_ORDER.index(g.cond.method) if g.cond.method in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, g.cond.row or "", g.cond.lambda_m or 0.0, g.label)


def _stats(g: Group) -> dict[str, Stat | None]:
    out = {f"{s} {k}": group_stat(g, metric(s, k)) for s in SETS for k in ("psnr", "ssim")}
    return {**out, "mismatch": group_stat(g, mismatch), "rho": group_stat(g, rho)}


def _reference_cells(row: dict[str, Any]) -> list[str]:
    cells = []
    for s in SETS:
        value = row.get(s)
        cells += [f"{float(value['psnr']):.2f}", f"{float(value['ssim']):.4f}"] if value else ["–", "–"]
    return cells


def table_methods(members: Sequence[Group], refs: dict[str, dict]) -> str:
    head = ["row", *(f"{s} {k}" for s in SETS for k in ("PSNR", "SSIM")), f"mismatch (S10, {MISMATCH_SET})",
            "ρ (mean)", "n"]
    body = [[name, *_reference_cells(refs[name]), "–", "–", "–"] for name in ("FP", "bicubic") if name in refs]
    for g in sorted((g for g in members if not _ablation_only(g)), key=_order):
        st = _stats(g)
        body.append([g.label, *(_cell(st[f"{s} {k}"], 2 if k == "psnr" else 4) for s in SETS
                                for k in ("psnr", "ssim")), _cell(st["mismatch"], 0), _cell(st["rho"], 4),
                     str(len(g.runs))])
    return _table(head, body)


def table_ablation(members: Sequence[Group]) -> str | None:
    """ODM's rows a–e (MR off first, then by λ_M); None when the table has no ablation row but e."""
    rows = sorted((g for g in members if g.cond.method == "odm" and g.cond.row), key=lambda g: (
        g.cond.mode != "off", g.cond.lambda_m or 0.0, g.cond.row or "", g.label))
    if not any(g.cond.row != "e" for g in rows):
        return None
    head = ["row", "MR", "λ_M", *(f"{s} PSNR" for s in SETS), f"mismatch (S10, {MISMATCH_SET})", "ρ (mean)", "n"]
    body = []
    for g in rows:
        st = _stats(g)
        lam = "–" if g.cond.mode == "off" else f"{g.cond.lambda_m:g}"
        extra = g.label[len(g.cond.label):]  # the differing keys, if any
        body.append([f"{g.cond.row}{extra}", g.cond.mode or "", lam, *(_cell(st[f"{s} psnr"], 2) for s in SETS),
                     _cell(st["mismatch"], 0), _cell(st["rho"], 4), str(len(g.runs))])
    return _table(head, body)


def plot_real(tables: dict[tuple, list[Group]], refs: dict[tuple, dict[str, dict]], path: str | Path):
    """PSNR per set, one panel per table, one bar per row (± sd over seeds), FP and bicubic as grey bars.
    Returns the matplotlib Figure (Agg canvas)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.4 * max(1, len(tables))), layout="constrained")
    axes = fig.subplots(max(1, len(tables)), 1, squeeze=False)[:, 0]
    for ax, ((model, scale, bits), members) in zip(axes, tables.items(), strict=False):
        ref = refs.get((model, scale), {})
        bars = [(name, [float(ref[name][s]["psnr"]) if s in ref[name] else math.nan for s in SETS],
                 [0.0] * len(SETS)) for name in ("FP", "bicubic") if name in ref]
        for g in sorted(members, key=_order):
            stats = [group_stat(g, metric(s, "psnr")) for s in SETS]
            bars.append((g.label, [st.mean if st else math.nan for st in stats],
                         [st.sd if st and st.n > 1 else 0.0 for st in stats]))
        width = 0.8 / max(1, len(bars))
        for i, (label, means, sds) in enumerate(bars):
            xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(SETS))]
            grey = {"color": "0.75" if label == "bicubic" else "0.45"} if label in ("FP", "bicubic") else {}
            ax.bar(xs, means, width, yerr=sds, capsize=2, label=label, **grey)
        finite = [v for _, means, _ in bars for v in means if math.isfinite(v)]
        if finite:
            ax.set_ylim(min(finite) - 1.0, max(finite) + 0.5)
        ax.set_xticks(range(len(SETS)), list(SETS))
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"{group_label(model, scale)} {bits.upper()}")
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=120)
    return fig


def _group_json(g: Group) -> dict[str, Any]:
    stats = {k: (vars(v) if v else None) for k, v in _stats(g).items()}
    return {"label": g.label, "method": g.cond.method, "row": g.cond.row, "lambda_m": g.cond.lambda_m,
            "mr_mode": g.cond.mode, "seeds": g.seeds, "runs": [str(r.path) for r in g.runs],
            "skipped_same_seed": g.skipped, "ablation_only": _ablation_only(g), **stats}


def write_real_report(roots: Sequence[str | Path], out: str | Path | None = None,
                      fp_eval: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Write real.{md,json,png} into ``out`` (default: the folder the roots share); returns {'markdown', 'paths'}."""
    roots = [Path(r) for r in roots]
    runs = [run for root in roots for run in load_runs(root)]
    groups = group_runs(runs)
    refs, notes = reference_rows(groups, load_eval_rows(fp_eval))
    tables: dict[tuple, list[Group]] = {}
    for g in sorted(groups, key=lambda g: (g.model, g.scale, -_width(g.bits))):
        tables.setdefault(g.table, []).append(g)
    parts = []
    for (model, scale, bits), members in tables.items():
        title = f"{group_label(model, scale)} {bits.upper()}"
        parts.append(f"## {title}\n\n{table_methods(members, refs.get((model, scale), {}))}")
        ablation = table_ablation(members)
        if ablation:
            parts.append(f"### {title}: ODM ablation (METHODS.md §5.8 rows)\n\n{ablation}")
    skipped = sum(len(g.skipped) for g in groups)
    notes += [f"{skipped} run(s) of a condition and seed already counted were left out (real.json names them)"
              ] if skipped else []
    legend = ("PSNR (dB) / SSIM on Y (MATLAB convention), test sets; mean ± sample sd over n seeds (n = 1: the "
              "value); '+k nan': k seeds diverged (not in the mean). Mismatch: S10 on B100 (odm-sr-analyze "
              "mismatch). ρ = λ_M·w·‖g_M‖/‖g_R‖, run mean (mr_balance.rho_mean).")
    markdown = "\n\n".join([*parts, legend, *(f"Note: {n}" for n in notes)])
    out = Path(out) if out is not None else _common_folder(roots)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"real.{ext}" for ext in ("md", "json", "png")}
    paths["md"].write_text(markdown + "\n")
    write_json(paths["json"], {"roots": [str(r) for r in roots], "notes": notes, "tables": [
        {"model": m, "scale": s, "bits": b, "reference_rows": refs.get((m, s), {}),
         "rows": [_group_json(g) for g in sorted(members, key=_order)]} for (m, s, b), members in tables.items()]})
    plot_real(tables, refs, paths["png"])
    return {"markdown": markdown, "paths": paths, "groups": groups}


def _width(bits: str) -> int:
    """The weight bit-width of a 'w{W}a{A}' / 'fp32' label."""
    return 32 if bits == "fp32" else int(bits[1:].partition("a")[0])


def _common_folder(roots: Sequence[Path]) -> Path:
    folders = [r if r.is_dir() else r.parent for r in roots]
    return Path(os.path.commonpath([str(f.resolve()) for f in folders]))
