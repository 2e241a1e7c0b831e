"""Does ODM's mechanism act? One table per question over the MR sweeps (``conf/sweep/mr_*.yaml``).

``odm-sr-report <sweeps root> --mechanism`` reads every ``results.json`` below the root (``report.load_runs``) and
groups the runs by *condition*: everything that defines the experiment except the seed, read from the resolved
config (method, bits, steps, λ_M, ``mr.mode``/``norm``/``weight_fn``, WCC switches). Runs of one condition with
different seeds are averaged: cells are ``mean ± sd`` (sample standard deviation; ``n`` seeds in the last column);
two runs of one condition and one seed are the same run trained twice and count once.

Per run it uses the test PSNR (MATLAB Y), the run mean of ρ = λ_M·w·‖g_M‖/‖g_R‖ (``mr_balance``), and the S10
mismatch and S9 variances of ``analyze.after_fit`` (``analysis``). λ_M = 0 is MR off (θ.grad = g_R, bit for bit
``mr.mode=off``), so such a run is the no-MR row of its WCC setting.

Questions: (1) does MR act at all (ODM by λ_M and ``mr.norm``), (2) does cooperative beat naive (ablation rows
a–e of METHODS.md §5.8 per λ_M), (3) ranking of methods, (4) effect on the S10 mismatch (ODM runs by mismatch,
with the change against MR off). Plus ``mechanism.png``: PSNR and mismatch against λ_M. No torch import.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from odm_sr.analysis.paper import bits_label, config_value_or
from odm_sr.analysis.report import METHOD_LABELS, Run, load_runs

SETS = ("Set5", "Set14", "B100")
# (wcc.learn_gamma, wcc.stat, MR on) -> row of the ODM ablation (METHODS.md §5.8); naive MR is row d
ROWS = {(False, "max_abs", False): "a", (False, "max_abs", True): "b", (True, "p99_abs", False): "c",
        (True, "p99_abs", True): "e"}
METHOD_LAMBDAS = (1e-5, 1e-3)  # ODM in the ranking: the paper's λ_M and the smallest with ρ >= 0.1 on CPU
PAPER_ROWS = {"a": 29.94, "b": 30.34, "c": 31.12, "d": 30.99, "e": 31.50}  # Set5 dB, EDSR-baseline x4 W2A2


@dataclass
class Condition:
    """One experimental condition and the runs (one per seed) that trained it."""

    method: str
    bits: str
    steps: int
    lambda_m: float | None = None  # None: not ODM (or no MR term in the method)
    mode: str | None = None  # coop | naive | off ('off' also for λ_M = 0)
    norm: str | None = None
    weight_fn: str | None = None
    row: str | None = None  # ablation row a-e (ODM)
    runs: list[Run] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return (self.method, self.bits, self.steps, self.lambda_m, self.mode, self.norm, self.weight_fn, self.row)

    @property
    def label(self) -> str:
        name = METHOD_LABELS.get(self.method, self.method) + (" no-WCC" if self.row in ("a", "b") else "")
        if self.lambda_m is None:
            return name
        if self.mode == "off":
            return f"{name} MR off"
        return f"{name} {self.mode} λ_M={self.lambda_m:g}" + (f" {self.norm}" if self.norm != "l2" else "")


def condition_of(config: dict[str, Any]) -> Condition:
    """The condition of a resolved run config (seed left out)."""
    method = str(config_value_or(config, "method.name", "fp"))
    bits = bits_label(config_value_or(config, "bits", {}))
    steps = int(config_value_or(config, "trainer.max_steps", 0))
    if method not in ("odm", "lsq", "odm_fq"):
        return Condition(method, bits, steps)
    lam = float(config_value_or(config, "method.lambda_m", 0.0))
    mode = str(config_value_or(config, "method.mr.mode", "coop"))
    mode = "off" if lam == 0.0 else mode
    norm = str(config_value_or(config, "method.mr.norm", "l2"))
    weight_fn = str(config_value_or(config, "method.mr.weight_fn", "half_cos")) if mode == "coop" else None
    wcc = (bool(config_value_or(config, "method.wcc.learn_gamma", True)),
           str(config_value_or(config, "method.wcc.stat", "p99_abs")))
    row = "d" if mode == "naive" and wcc == (True, "p99_abs") else ROWS.get((*wcc, mode != "off"))
    if mode == "off":  # λ_M and the norm do not act without MR
        lam, norm = 0.0, None
    return Condition(method, bits, steps, lam, mode, norm, weight_fn, row)


def group_conditions(runs: Sequence[Run]) -> list[Condition]:
    """Runs grouped by condition, one run per seed (a duplicate seed counts once)."""
    groups: dict[tuple, Condition] = {}
    seeds: dict[tuple, set] = {}
    for run in sorted(runs, key=lambda r: str(r.path)):
        cond = condition_of(run.config)
        group = groups.setdefault(cond.key, cond)
        seed = config_value_or(run.config, "seed", 0)
        if seed not in seeds.setdefault(cond.key, set()):
            seeds[cond.key].add(seed)
            group.runs.append(run)
    return list(groups.values())


# -- per-run values ----------------------------------------------------------------------------------------------
def psnr(run: Run, set_name: str) -> float | None:
    own = run.results.get("metrics", {}).get(run.results.get("run_name", ""), {})
    return float(own[set_name]["psnr"]) if set_name in own else None


def rho(run: Run) -> float | None:
    return (run.results.get("mr_balance") or {}).get("rho_mean")


def analysis_value(name: str, key: str) -> Callable[[Run], float | None]:
    return lambda run: ((run.results.get("analysis") or {}).get(name) or {}).get(key)


MISMATCH = analysis_value("mismatch", "mismatch")
VAR_IMAGE = analysis_value("variance", "image_wise")
VAR_CHANNEL = analysis_value("variance", "channel_wise")


def train_minutes(run: Run) -> float | None:
    seconds = run.results.get("train_seconds")
    return seconds / 60 if seconds is not None else None


def stats(cond: Condition, value: Callable[[Run], float | None]) -> tuple[float, float, int] | None:
    """(mean, sample sd (0 for one run), n) of ``value`` over the condition's runs; None without a value."""
    values = [v for v in (value(r) for r in cond.runs) if v is not None and math.isfinite(v)]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def cell(cond: Condition, value: Callable[[Run], float | None], digits: int = 2) -> str:
    s = stats(cond, value)
    if s is None:
        return "–"
    mean, sd, n = s
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _psnr_of(set_name: str) -> Callable[[Run], float | None]:
    return lambda run: psnr(run, set_name)


# -- tables -----------------------------------------------------------------------------------------------------
def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _odm(conds: Sequence[Condition]) -> list[Condition]:
    return [c for c in conds if c.lambda_m is not None]


def _lambda_order(c: Condition) -> tuple:
    return (c.norm or "", c.lambda_m or 0.0)


def table_mr_scale(conds: Sequence[Condition]) -> str:
    """(1) ODM (WCC, cooperative half-cos) by norm and λ_M, with MR off first: ρ, PSNR, S10 mismatch, S9."""
    rows = [c for c in _odm(conds) if c.row in ("c", "e") and c.weight_fn in (None, "half_cos")]
    rows.sort(key=lambda c: (c.mode != "off", _lambda_order(c)))
    head = ["run", "ρ (mean)", *SETS, "mismatch (S10)", "Var img / ch (S9)", "n"]
    body = [[c.label, cell(c, rho, 4), *(cell(c, _psnr_of(s), 3) for s in SETS), cell(c, MISMATCH, 0),
             f"{cell(c, VAR_IMAGE, 1)} / {cell(c, VAR_CHANNEL, 1)}", str(len(c.runs))] for c in rows]
    return _table(head, body)


def table_ablation(conds: Sequence[Condition]) -> str:
    """(2) Rows a–e per λ_M (rows a, c have no MR and appear once), the paper's Set5 beside them."""
    rows = [c for c in _odm(conds) if c.row and c.norm in (None, "l2") and c.weight_fn in (None, "half_cos")]
    rows.sort(key=lambda c: (c.lambda_m or 0.0, c.row or ""))
    head = ["row", "λ_M", "MR", *SETS, "mismatch (S10)", "paper Set5 (λ_M=1e-5)", "n"]
    body = [[c.row or "", f"{c.lambda_m:g}" if c.mode != "off" else "–", c.mode or "",
             *(cell(c, _psnr_of(s), 3) for s in SETS), cell(c, MISMATCH, 0), f"{PAPER_ROWS[c.row]:.2f}",
             str(len(c.runs))] for c in rows if c.row]
    return _table(head, body)


def table_methods(conds: Sequence[Condition]) -> str:
    """(3) Every method at the longest budget found (ODM at ``METHOD_LAMBDAS``), best Set5 first."""
    longest = max((c.steps for c in conds), default=0)
    rows = [c for c in conds if c.steps == longest and c.method != "fp" and
            (c.lambda_m is None or (c.row == "e" and c.lambda_m in METHOD_LAMBDAS and c.norm == "l2"
                                    and c.weight_fn == "half_cos"))]
    rows.sort(key=lambda c: -(stats(c, _psnr_of("Set5")) or (0.0,))[0])
    head = ["method", *SETS, "mismatch (S10)", "train min", "n"]
    body = [[c.label, *(cell(c, _psnr_of(s), 3) for s in SETS), cell(c, MISMATCH, 0), cell(c, train_minutes, 1),
             str(len(c.runs))] for c in rows]
    return _table(head, body)


def table_mismatch(conds: Sequence[Condition]) -> str:
    """(4) ODM runs by S10 mismatch, with the change of mismatch and B100 PSNR against MR off."""
    odm = [c for c in _odm(conds) if stats(c, MISMATCH)]
    off = next((c for c in odm if c.row == "c"), None)
    base_m = stats(off, MISMATCH)[0] if off else None
    base_p = (stats(off, _psnr_of("B100")) or (None,))[0] if off else None
    odm.sort(key=lambda c: stats(c, MISMATCH)[0])
    head = ["run", "row", "mismatch (S10)", "Δ mismatch vs MR off", "B100", "Δ B100 vs MR off", "ρ (mean)"]
    body = []
    for c in odm:
        m, p = stats(c, MISMATCH)[0], (stats(c, _psnr_of("B100")) or (None,))[0]
        dm = f"{100 * (m - base_m) / base_m:+.1f} %" if base_m else "–"
        dp = f"{p - base_p:+.3f}" if p is not None and base_p is not None else "–"
        body.append([c.label, c.row or "", f"{m:.0f}", dm, f"{p:.2f}" if p is not None else "–", dp,
                     cell(c, rho, 4)])
    return _table(head, body)


QUESTIONS = (("Does MR act at all? (ODM with WCC, by λ_M and mr.norm)", table_mr_scale),
             ("Does cooperative beat naive? (ablation rows of METHODS.md §5.8)", table_ablation),
             ("Ranking of methods", table_methods),
             ("Effect on the S10 mismatch (B100)", table_mismatch))


def plot_mechanism(conds: Sequence[Condition], path: str | Path):
    """PSNR (Set5, Set14, B100; relative to MR off where there is such a run) and S10 mismatch against λ_M for
    ODM with WCC and cooperative MR (l2); MR off at the left edge. Returns the matplotlib Figure (Agg canvas)."""
    from matplotlib.figure import Figure

    rows = sorted((c for c in _odm(conds) if c.row in ("c", "e") and c.norm in (None, "l2")
                   and c.weight_fn in (None, "half_cos")), key=lambda c: c.lambda_m or 0.0)
    positive = [c.lambda_m for c in rows if c.lambda_m]
    off_x = min(positive) / 10 if positive else 1e-7
    xs = [c.lambda_m or off_x for c in rows]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_p, ax_m = fig.subplots(1, 2)
    off = next((c for c in rows if c.mode == "off"), None)
    for set_name in SETS:  # PSNR relative to MR off (the sets lie dB apart; the effects are hundredths)
        base = (stats(off, _psnr_of(set_name)) or (0.0,))[0] if off else 0.0
        means = [stats(c, _psnr_of(set_name)) for c in rows]
        ax_p.errorbar(xs, [m[0] - base if m else math.nan for m in means], yerr=[m[1] if m else 0 for m in means],
                      marker="o", capsize=3, label=set_name)
    mism = [stats(c, MISMATCH) for c in rows]
    ax_m.errorbar(xs, [m[0] if m else math.nan for m in mism], yerr=[m[1] if m else 0 for m in mism],
                  marker="o", capsize=3, color="tab:red")
    ylabel_p = "PSNR − PSNR(MR off) (dB)" if off else "PSNR (dB)"
    for ax, ylabel in ((ax_p, ylabel_p), (ax_m, "S10 mismatch (B100)")):
        ax.set_xscale("log")
        ax.set_xlabel(f"λ_M (MR off drawn at {off_x:g})")
        ax.set_ylabel(ylabel)
    ax_p.legend()
    fig.savefig(path, dpi=120)
    return fig


def write_mechanism_report(root: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write mechanism.{md,json,png} into ``out`` (default ``root``); returns {'markdown', 'paths'}."""
    conds = group_conditions(load_runs(root))
    parts = [f"## {title}\n\n{fn(conds)}" for title, fn in QUESTIONS]
    note = ("PSNR in dB (MATLAB Y, test sets); ρ = λ_M·w·‖g_M‖/‖g_R‖ averaged over the run's steps; mismatch and "
            "variances from odm-sr-analyze on B100; mean ± sample sd over seeds where n > 1.")
    markdown = "\n\n".join(parts) + "\n\n" + note
    out = Path(out) if out is not None else Path(root)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "mechanism.md", "json": out / "mechanism.json", "png": out / "mechanism.png"}
    paths["md"].write_text(markdown + "\n")
    paths["json"].write_text(json.dumps([{"label": c.label, "key": list(c.key), "runs": [str(r.path) for r in c.runs],
                                          "rho": stats(c, rho), "mismatch": stats(c, MISMATCH),
                                          **{s: stats(c, _psnr_of(s)) for s in SETS}} for c in conds], indent=2))
    plot_mechanism(conds, paths["png"])
    return {"markdown": markdown, "paths": paths}
