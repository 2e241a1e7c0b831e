"""The real-network report (analysis.real, odm-sr-report --real) on fake results.json files of really composed
real_* configs; every number checked against a mean / sample sd computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import compose_config
from omegaconf import OmegaConf

from odm_sr.analysis.real import group_runs, summarize, write_real_report
from odm_sr.analysis.report import load_runs
from odm_sr.report_cli import main as report_main

SWEEP = ["+sweep=real_methods", "logger=none"]
IMDN2 = "experiment=real_imdn_x4_w2a2_"


def fake(root: Path, name: str, overrides: list[str], set5: float, rho: float | None = None,
         mismatch: float | None = None, fp_row: bool = False, mismatch_data: str = "B100") -> None:
    """A results.json as train.py writes it: Set14 = Set5 − 3, B100 = Set5 − 4, SSIM = Set5 / 40."""
    run = root / name
    cfg = OmegaConf.to_container(compose_config([*SWEEP, *overrides], run), resolve=True)
    own = {s: {"psnr": str(set5 - d) if set5 != set5 else set5 - d, "ssim": set5 / 40}
           for s, d in (("Set5", 0.0), ("Set14", 3.0), ("B100", 4.0))}
    metrics = {"bicubic": {s: {"psnr": 28.42 - d, "ssim": 0.81} for s, d in (("Set5", 0), ("Set14", 2.4), ("B100", 3))},
               cfg["run_name"]: own}
    if fp_row:
        metrics["FP (model.pretrained)"] = {s: {"psnr": 32.21, "ssim": 0.8948} for s in ("Set5", "Set14", "B100")}
    results = {"run_name": cfg["run_name"], "config": cfg, "train_seconds": 700.0, "steps": 1000,
               "metrics": metrics, "mr_balance": {"rho_mean": rho, "steps": 1000 if rho is not None else 0}}
    if mismatch is not None:
        results["analysis"] = {"mismatch": {"data": mismatch_data, "mismatch": mismatch, "var_mean": 0.1,
                                            "var_std": 0.2}}
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> list[Path]:
    logs = tmp_path_factory.mktemp("sweeps")
    methods, seed1, ablation = logs / "real_methods", logs / "real_methods_seed1", logs / "real_odm_ablation"
    fake(methods, "odm", [IMDN2 + "odm"], 29.00, 0.002, 300.0, fp_row=True)
    fake(seed1, "odm", [IMDN2 + "odm", "seed=1", "sweep_name=real_methods_seed1"], 29.30, 0.004, 360.0)
    fake(methods, "pams", [IMDN2 + "pams"], float("nan"))  # diverged: results.json holds "nan"
    fake(seed1, "pams", [IMDN2 + "pams", "seed=1", "sweep_name=real_methods_seed1"], 25.00)
    fake(methods, "daq", [IMDN2 + "daq"], 27.50, mismatch=500.0, mismatch_data="Set5")  # not B100: no cell
    fake(methods, "odm4", ["experiment=real_imdn_x4_w4a4_odm"], 31.40, 0.003, 100.0)
    fake(methods, "pan_daq", ["experiment=real_pan_x4_w2a2_daq"], 26.00)
    for lam in ("1e-5", "1e-3"):  # row c at both λ_M: MR off, so the same condition (the second counts once)
        fake(ablation, f"c_{lam}", [IMDN2 + "odm", "+ablation=c", f"method.lambda_m={lam}"], 28.80, None, 310.0)
        fake(ablation, f"d_{lam}", [IMDN2 + "odm", "+ablation=d", f"method.lambda_m={lam}"], 28.60, 0.5, 320.0)
    fake(ablation, "e_1e-3", [IMDN2 + "odm", "+ablation=e", "method.lambda_m=1e-3"], 29.50, 0.1, 200.0)
    fake(ablation, "e_1e-5", [IMDN2 + "odm", "+ablation=e"], 29.10, 0.002, 300.0)  # = real_methods' ODM seed 0
    (logs / "eval").mkdir()
    (logs / "eval" / "eval.json").write_text(json.dumps({
        "bicubic": {}, "pan FP (PANx4_DF2K.pth)": {"Set5": {"psnr": 32.13, "ssim": 0.8948}}}))
    return [methods, seed1, ablation]


def _row(md: str, label: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]  # the cells after the label


def test_summarize_by_hand():
    stat = summarize([29.0, 29.3, float("nan"), None])
    assert stat.n == 2 and stat.bad == 1 and stat.mean == pytest.approx(29.15)
    assert stat.sd == pytest.approx(0.212132, abs=1e-6)  # sqrt(((0.15)^2 * 2) / 1)
    assert stat.text(2) == "29.15 ± 0.21 (+1 nan)"
    assert summarize([None]) is None and summarize([float("nan")]).text(2) == "nan (×1)"


def test_groups_merge_seeds_across_sweeps_and_count_a_seed_once(roots):
    groups = {(g.model, g.bits, g.label): g for g in group_runs([r for root in roots for r in load_runs(root)])}
    odm = groups[("imdn", "w2a2", "ODM coop λ_M=1e-05")]
    assert odm.seeds == [0, 1] and len(odm.skipped) == 1  # the ablation's row e at 1e-5 is real_methods' seed 0
    assert "real_odm_ablation" in odm.skipped[0] or "real_odm_ablation" in str(odm.runs[0].path)
    off = groups[("imdn", "w2a2", "ODM MR off")]
    assert off.cond.row == "c" and len(off.runs) == 1 and len(off.skipped) == 1  # λ_M does not act without MR
    assert groups[("imdn", "w4a4", "ODM coop λ_M=1e-05")].seeds == [0]
    assert ("pan", "w2a2", "DAQ") in groups


def test_method_table_by_hand(roots, tmp_path):
    report = write_real_report(roots, tmp_path, [roots[0].parent / "eval" / "eval.json"])
    md = report["markdown"]
    imdn2 = md.split("## IMDN x4 W2A2\n")[1].split("##")[0]
    assert _row(imdn2, "FP")[:2] == ["32.21", "0.8948"] and _row(imdn2, "bicubic")[:3] == ["28.42", "0.8100", "26.02"]
    # ODM: Set5 29.00 / 29.30 -> 29.15 ± 0.21; SSIM 0.725 / 0.7325 -> 0.7288 ± 0.0053; B100 25.15; mismatch
    # 300 / 360 -> 330 ± 42; ρ 0.002 / 0.004 -> 0.0030 ± 0.0014; 2 seeds
    assert _row(imdn2, "ODM coop λ_M=1e-05") == ["29.15 ± 0.21", "0.7288 ± 0.0053", "26.15 ± 0.21",
                                                  "0.7288 ± 0.0053", "25.15 ± 0.21", "0.7288 ± 0.0053",
                                                  "330 ± 42", "0.0030 ± 0.0014", "2"]
    pams = _row(imdn2, "PAMS")
    assert pams[0] == "25.00 (+1 nan)" and pams[-3:] == ["–", "–", "2"]
    assert _row(imdn2, "DAQ")[-3:] == ["–", "–", "1"]  # its mismatch ran on Set5, not B100
    assert "MR off" not in imdn2.split("###")[0]  # rows a-d: the ablation table's
    labels = [line.split("|")[1].strip() for line in imdn2.split("###")[0].splitlines() if line.startswith("| ")]
    assert labels[1:] == ["FP", "bicubic", "PAMS", "DAQ", "ODM coop λ_M=1e-05", "ODM coop λ_M=0.001"]
    assert md.index("## IMDN x4 W4A4") < md.index("## IMDN x4 W2A2") < md.index("## PAN x4 W2A2")
    pan = md.split("## PAN x4 W2A2\n")[1]
    assert _row(pan, "FP")[:3] == ["32.13", "0.8948", "–"]  # from --fp-eval's row of the file the runs start from


def test_ablation_table_by_hand(roots, tmp_path):
    md = write_real_report(roots, tmp_path)["markdown"]
    ablation = md.split("### IMDN x4 W2A2: ODM ablation (METHODS.md §5.8 rows)\n")[1].split("##")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in ablation.splitlines()[2:]
            if line.startswith("| ")]
    assert [r[:3] for r in rows] == [["c", "off", "–"], ["d", "naive", "1e-05"], ["e", "coop", "1e-05"],
                                     ["d", "naive", "0.001"], ["e", "coop", "0.001"]]
    assert rows[0][3:] == ["28.80", "25.80", "24.80", "310", "–", "1"]
    assert rows[2][3] == "29.15 ± 0.21" and rows[4][3:] == ["29.50", "26.50", "25.50", "200", "0.1000", "1"]
    # without --fp-eval PAN has no FP row, and the note says how to get one
    assert "PAN x4: no FP row" in md and "odm-sr-eval model=pan model.scale=4" in md


def test_files_and_cli(roots, tmp_path, capsys):
    report_main([*(str(r) for r in roots), "--real", "--out", str(tmp_path)])
    assert "## IMDN x4 W2A2" in capsys.readouterr().out
    data = json.loads((tmp_path / "real.json").read_text())
    odm = next(r for t in data["tables"] if (t["model"], t["bits"]) == ("imdn", "w2a2") for r in t["rows"]
               if r["label"] == "ODM coop λ_M=1e-05")
    assert odm["Set5 psnr"]["mean"] == pytest.approx(29.15) and odm["Set5 psnr"]["n"] == 2 and odm["seeds"] == [0, 1]
    assert (tmp_path / "real.png").stat().st_size > 0 and (tmp_path / "real.md").is_file()
    # the roots' common folder is the default output
    write_real_report(roots[:2])
    assert (roots[0].parent / "real.md").is_file()


def test_cli_errors(roots, tmp_path, capsys):
    with pytest.raises(SystemExit):
        report_main([str(roots[0]), str(roots[1])])
    assert "2 roots given; only --real reads several" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--fp-eval .*missing.json: no such file"):
        report_main([str(roots[0]), "--real", "--out", str(tmp_path), "--fp-eval", str(tmp_path / "missing.json")])
