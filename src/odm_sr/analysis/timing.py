"""S12: training time per method from ``results.json`` files (METHODS.md §7, ``analysis.timing``).

``train_seconds`` is the wall-clock of ``trainer.fit`` as ``train.py`` records it; ``steps`` the optimizer steps.
Seconds per iteration = train_seconds / steps, so a method's calibration or init time (DDTB's calibration
epoch, ODM's percentile init) is spread over its steps (``analysis.timing.scope=train_incl_calibration``).
No torch import.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from odm_sr.analysis.paper import S12_GPU, S12_HOURS, config_value_or, s12_reference
from odm_sr.analysis.report import METHOD_ORDER, base_label, load_runs, run_key


def training_time(results_dirs: str | Path | Iterable[str | Path]) -> dict[str, Any]:
    """Per run and per method: wall-clock, steps and seconds per iteration, with the paper's hours (S12; per run
    only for EDSR-baseline ×4, per method always).

    ``results_dirs``: a run or sweep folder (searched recursively for results.json), or several. Returns
    {'runs': [{run, label, method, model, bits, steps, train_seconds, hours, seconds_per_iter, accelerator,
    devices, paper_hours}], 'methods': {method: {runs, train_seconds, hours, seconds_per_iter, paper_hours}},
    'paper_gpu'}; per-method values are means over its runs.
    """
    dirs = [results_dirs] if isinstance(results_dirs, (str, Path)) else list(results_dirs)
    runs = [run for d in dirs for run in load_runs(d)]
    rows = []
    for run in runs:
        model, scale, method, bits = run_key(run.config)
        seconds = run.results.get("train_seconds")
        steps = int(run.results.get("steps") or 0)
        rows.append({"run": str(run.path), "label": base_label(run.config), "method": method,
                     "model": f"{model} x{scale}", "bits": bits, "steps": steps, "train_seconds": seconds,
                     "hours": seconds / 3600.0 if seconds is not None else None,
                     "seconds_per_iter": seconds / steps if seconds is not None and steps else None,
                     "accelerator": config_value_or(run.config, "trainer.accelerator", None),
                     "devices": config_value_or(run.config, "trainer.devices", None),
                     "paper_hours": s12_reference(model, scale, method)})
    rows.sort(key=lambda r: (METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else len(METHOD_ORDER),
                             r["label"], r["run"]))
    methods: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        methods[method] = {"runs": len(mine), "paper_hours": S12_HOURS.get(method),
                           **{k: _mean(r[k] for r in mine) for k in ("train_seconds", "hours", "seconds_per_iter")}}
    return {"runs": rows, "methods": methods, "paper_gpu": S12_GPU}


def _mean(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "–"


def timing_table(timing: dict[str, Any]) -> str:
    """Markdown: one row per run, then the paper's hours per method."""
    lines = ["| run | device | steps | wall-clock (s) | hours | s/iter | paper (h) |", "|---" * 7 + "|"]
    for r in timing["runs"]:
        device = f"{r['accelerator']} x{r['devices']}" if r["accelerator"] else "–"
        lines.append(f"| {r['label']} | {device} | {r['steps']} | {_fmt(r['train_seconds'], '.1f')} | "
                     f"{_fmt(r['hours'], '.3f')} | {_fmt(r['seconds_per_iter'], '.4f')} | "
                     f"{_fmt(r['paper_hours'], '.1f')} |")
    return "\n".join(lines) + f"\n\nPaper (S12): EDSR, one {timing['paper_gpu']}, each method's own schedule."
