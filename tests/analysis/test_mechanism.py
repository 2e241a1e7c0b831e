"""The MR-mechanism report (analysis.mechanism, odm-sr-report --mechanism) on fake results.json files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import compose_config
from omegaconf import OmegaConf

from odm_sr.analysis.mechanism import condition_of, group_conditions, write_mechanism_report
from odm_sr.analysis.report import load_runs
from odm_sr.cli.report import main as report_main

ODM = "experiment=mini_long_edsr_x4_w2a2_odm"


def fake(root: Path, name: str, overrides: list[str], set5: float, rho: float | None = None,
         mismatch: float | None = None) -> None:
    """A results.json as train.py writes it (really composed config); B100 = Set5 − 3, Set14 = Set5 − 2."""
    run = root / name
    cfg = OmegaConf.to_container(compose_config(["logger=none", *overrides], run), resolve=True)
    metrics = {cfg["run_name"]: {s: {"psnr": set5 - d, "ssim": 0.8} for s, d in
                                 (("Set5", 0.0), ("Set14", 2.0), ("B100", 3.0))}}
    results = {"run_name": cfg["run_name"], "config": cfg, "train_seconds": 360.0, "steps": 3000,
               "metrics": metrics, "mr_balance": {"rho_mean": rho, "steps": 3000 if rho is not None else 0}}
    if mismatch is not None:
        results["analysis"] = {"mismatch": {"data": "B100", "mismatch": mismatch, "var_mean": 0.4, "var_std": 8.0},
                               "variance": {"data": "B100", "image_wise": 28.0, "channel_wise": 37.0}}
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweeps")
    fake(root, "mr_scale/l0", [ODM, "method.lambda_m=0"], 29.00, 0.0, 5000)
    fake(root, "mr_scale/l0_seed1", [ODM, "method.lambda_m=0", "seed=1"], 29.10, 0.0, 5200)
    fake(root, "mr_scale/l1e-5", [ODM], 29.05, 0.003, 4900)
    fake(root, "mr_ablation_e", [ODM, "+ablation=e"], 29.05, 0.003, 4900)  # the same run trained twice
    fake(root, "mr_scale/l1e-3", [ODM, "method.lambda_m=1e-3"], 29.20, 0.3, 4000)
    fake(root, "mr_ablation/d", [ODM, "+ablation=d"], 28.90, 0.005, 4950)
    fake(root, "mr_ablation/a", [ODM, "+ablation=a"], 28.50, None, 6000)
    fake(root, "mr_norm/mse", [ODM, "+mr_norm_scale=mse_1e-2"], 29.15, 0.2, 4500)
    fake(root, "mr_methods/pams", ["experiment=mini_long_edsr_x4_w2a2_pams"], 28.70, None, 7000)
    fake(root, "mr_methods/daq", ["experiment=mini_long_edsr_x4_w2a2_daq"], 29.12, None, 6500)
    return root


def test_conditions_group_seeds_and_map_rows(root):
    conds = {c.label: c for c in group_conditions(load_runs(root))}
    off = conds["ODM MR off"]
    assert off.row == "c" and len(off.runs) == 2  # λ_M = 0 is MR off; two seeds
    assert len(conds["ODM coop λ_M=1e-05"].runs) == 1  # +ablation=e is the default ODM: counted once
    assert conds["ODM coop λ_M=1e-05"].row == "e" and conds["ODM naive λ_M=1e-05"].row == "d"
    assert conds["ODM MR off"].key != conds["ODM coop λ_M=0.01 mse"].key
    assert condition_of(load_runs(root / "mr_ablation" / "a")[0].config).row == "a"
    assert conds["PAMS"].lambda_m is None


def test_tables_by_hand(root, tmp_path):
    report = write_mechanism_report(root, tmp_path)
    md = report["markdown"]
    sections = md.split("## ")[1:]
    assert len(sections) == 4
    scale, ablation, methods, mismatch = sections
    # MR off: two seeds 29.00 / 29.10 -> 29.050 ± 0.071 (sample sd 0.0707); B100 = Set5 − 3
    assert "| ODM MR off | 0.0000 ± 0.0000 | 29.050 ± 0.071 | 27.050 ± 0.071 | 26.050 ± 0.071 | 5100 ± 141 |" in scale
    assert scale.index("MR off") < scale.index("λ_M=1e-05") < scale.index("λ_M=0.001") < scale.index("mse")
    assert "| a | – | off | 28.500 |" in ablation and "| d | 1e-05 | naive | 28.900 |" in ablation
    assert "30.99 |" in ablation  # the paper's row d beside ours
    ranked = [line.split(" | ")[0].lstrip("| ") for line in methods.splitlines()[4:] if line.startswith("|")]
    assert ranked == ["ODM coop λ_M=0.001", "DAQ", "ODM coop λ_M=1e-05", "PAMS"]
    # mismatch table: sorted by mismatch, change against MR off (5100)
    assert "| ODM coop λ_M=0.001 | e | 4000 | -21.6 % | 26.20 | +0.150 |" in mismatch
    for ext in ("md", "json", "png"):
        assert report["paths"][ext].is_file()


def test_cli_flag(root, tmp_path, capsys):
    report_main([str(root), "--mechanism", "--out", str(tmp_path)])
    assert "Does MR act at all?" in capsys.readouterr().out and (tmp_path / "mechanism.png").is_file()
