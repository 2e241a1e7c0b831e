"""Result tables (analysis.report, odm-sr-report) and training time (analysis.timing) on fake results.json files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import compose_config
from omegaconf import OmegaConf

from odm_sr.analysis.paper import PAPER, paper_entry
from odm_sr.analysis.report import build_rows, latex_escape, load_runs, write_report
from odm_sr.analysis.timing import timing_table, training_time
from odm_sr.cli.report import main as report_main

SETS = ["Set5", "Set14", "B100", "Urban100"]
BASE = ["model=edsr_baseline", "model.scale=4", "bits=w2a2", "trainer=cpu", "logger=none"]


def fake_run(run_dir: Path, overrides: list[str], psnr: float, hydra_overrides: list[str] | None = None,
             pretrained_row: bool = False, train_seconds: float = 100.0, steps: int = 50) -> Path:
    """A results.json as train.py writes it, from a really composed config; PSNR psnr + 0.1·k on set k."""
    cfg = OmegaConf.to_container(compose_config(BASE + overrides, run_dir), resolve=True)
    metrics = {"bicubic": {s: {"psnr": 26.0 + k, "ssim": 0.7} for k, s in enumerate(SETS)},
               cfg["run_name"]: {s: {"psnr": psnr + 0.1 * k, "ssim": 0.8712} for k, s in enumerate(SETS)}}
    if pretrained_row:
        metrics["FP (model.pretrained)"] = {s: {"psnr": 32.0, "ssim": 0.89} for s in SETS}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps({
        "run_name": cfg["run_name"], "config": cfg, "train_seconds": train_seconds, "steps": steps,
        "complexity": {}, "metrics": metrics}))
    if hydra_overrides is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in hydra_overrides))
    return run_dir


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory) -> Path:
    """ODM and DAQ runs, plus a Hydra sweep over method.init.j (95, 100) with overrides.yaml."""
    root = tmp_path_factory.mktemp("logs")
    fake_run(root / "odm", ["method=odm"], 31.20, pretrained_row=True, train_seconds=7200.0, steps=60)
    fake_run(root / "daq", ["method=daq"], 30.90, train_seconds=3600.0, steps=40)
    for i, j in enumerate((95, 100)):
        fake_run(root / "sweep" / str(i), ["method=odm", f"method.init.j={j}"], 31.0 + i,
                 hydra_overrides=["method=odm", f"method.init.j={j}", f"hydra.run.dir=x/{i}"])
    return root


def test_markdown_rows_and_paper_numbers(sweep_root, tmp_path):
    report = write_report(sweep_root, tmp_path, SETS)
    md = report["markdown"]
    lines = md.splitlines()
    assert lines[0] == "| run | Set5 | Set14 | B100 | Urban100 |"
    # bicubic and FP once, first; then DAQ before ODM; the ODM rows told apart by method.init.j
    labels = [row.label for row in report["rows"]]
    assert labels[:3] == ["EDSR-baseline x4 bicubic", "EDSR-baseline x4 FP (pretrained)", "EDSR-baseline x4 DAQ W2A2"]
    odm_labels = labels[3:]
    assert len(odm_labels) == 3 and len(set(labels)) == len(labels)
    assert all(label.startswith("EDSR-baseline x4 ODM W2A2 (method.init.j=") for label in odm_labels)
    assert "| EDSR-baseline x4 DAQ W2A2 | 30.90/0.8712 (paper 31.01/0.871) |" in md
    odm_default = next(r for r in report["rows"] if r.label.endswith("j=99.0)"))
    assert odm_default.paper["Set5"] == (31.50, 0.882) and odm_default.paper_source == "main"
    assert "| EDSR-baseline x4 ODM W2A2 (method.init.j=99.0) | 31.20/0.8712 (paper 31.50/0.882) | " \
           "31.30/0.8712 (paper 28.14) | 31.40/0.8712 (paper 27.27) | 31.50/0.8712 (paper 25.17/0.755) |" in md
    assert "| EDSR-baseline x4 FP (pretrained) | 32.00/0.8900 (paper 32.10/0.894) |" in md
    # the S6 rows for j = 95 and j = 100 (PSNR only)
    assert "31.00/0.8712 (paper 31.51)" in md and "32.00/0.8712 (paper 29.63)" in md
    assert "| EDSR-baseline x4 bicubic | 26.00/0.7000 | 27.00/0.7000 |" in md


def test_sweep_labels_from_hydra_overrides(sweep_root):
    rows = build_rows(load_runs(sweep_root / "sweep"))
    assert [r.label for r in rows] == ["EDSR-baseline x4 bicubic", "EDSR-baseline x4 ODM W2A2 (method.init.j=95)",
                                       "EDSR-baseline x4 ODM W2A2 (method.init.j=100)"]
    assert rows[1].overrides == {"method.init.j": "95"}


def test_an_override_one_run_lacks_reads_its_config(tmp_path):
    fake_run(tmp_path / "a", ["method=odm"], 31.0, hydra_overrides=["method=odm"])
    fake_run(tmp_path / "b", ["method=odm", "method.init.j=95"], 31.0,
             hydra_overrides=["method=odm", "method.init.j=95"])
    labels = [r.label for r in build_rows(load_runs(tmp_path))]
    assert labels[1:] == [f"EDSR-baseline x4 ODM W2A2 (method.init.j={j})" for j in ("95", "99.0")]


def test_identical_runs_get_their_folder_in_the_label(tmp_path):
    for name in ("a", "b"):
        fake_run(tmp_path / name, ["method=odm"], 31.0)
    labels = [r.label for r in build_rows(load_runs(tmp_path))]
    assert labels[1:] == ["EDSR-baseline x4 ODM W2A2 [a]", "EDSR-baseline x4 ODM W2A2 [b]"]


def test_latex_json_png_written(sweep_root, tmp_path):
    paths = write_report(sweep_root, tmp_path, SETS)["paths"]
    tex = paths["tex"].read_text()
    assert tex.startswith(r"\begin{tabular}{lcccc}") and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"EDSR-baseline x4 DAQ W2A2 & 30.90/0.8712 {\scriptsize (31.01/0.871)} & " in tex
    assert r"(method.init.j=95)" in tex
    data = json.loads(paths["json"].read_text())
    assert data["sets"] == SETS and len(data["rows"]) == 6
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert latex_escape("a_b & 5%") == r"a\_b \& 5\%"


def test_sets_default_to_those_found(sweep_root):
    report = write_report(sweep_root / "sweep" / "0")
    assert report["sets"] == SETS and (sweep_root / "sweep" / "0" / "report.md").is_file()


def test_empty_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no results.json found"):
        write_report(tmp_path)
    with pytest.raises(SystemExit, match="odm-sr-report: error: .*no results.json found"):
        report_main([str(tmp_path)])


def test_cli_prints_markdown(sweep_root, tmp_path, capsys):
    report_main([str(sweep_root / "daq"), "--out", str(tmp_path), "--sets", "Set5", "Urban100"])
    out = capsys.readouterr().out
    assert "| run | Set5 | Urban100 |" in out and "30.90/0.8712 (paper 31.01/0.871)" in out
    assert (tmp_path / "report.png").is_file()


def test_paper_lookup():
    assert paper_entry("edsr_baseline", 4, "odm", "w2a2").sets["Set5"] == (31.50, 0.882)
    assert paper_entry("edsr_baseline", 4, "pams", "w4a4").sets == {"Set5": (31.59, 0.885), "Set14": (28.20, None),
                                                                   "Urban100": (25.32, 0.762)}
    assert paper_entry("rdn", 2, "ddtb", "w3a3").sets["Urban100"] == (31.10, 0.920)
    assert paper_entry("edsr_baseline", 4, "odm", "w3a3") is None
    cfg = OmegaConf.to_container(compose_config(BASE + ["method=odm"], Path("/tmp/x")), resolve=True)
    assert paper_entry("edsr_baseline", 4, "odm", "w2a2", cfg).source == "main"
    cfg["trainer"]["max_steps"] = 300_000
    assert paper_entry("edsr_baseline", 4, "odm", "w2a2", cfg).sets["Set5"] == (31.56, 0.884)  # S2
    cfg["trainer"]["max_steps"], cfg["method"]["init"]["j"] = 60_000, 90.0
    assert paper_entry("edsr_baseline", 4, "odm", "w2a2", cfg) is None  # no paper row for j = 90
    cfg["method"]["init"]["j"], cfg["method"]["mr"]["mode"] = 99.0, "naive"
    assert paper_entry("edsr_baseline", 4, "odm", "w2a2", cfg).source == "ablation"
    cfg["model"]["kwargs"] = {"n_resblocks": 4}
    assert paper_entry("edsr_baseline", 4, "odm", "w2a2", cfg) is None  # a resized backbone
    assert all(set(e.sets) <= {"Set5", "Set14", "B100", "Urban100"} and e.sets for e in PAPER)


def test_table_s4_shows_our_fqsr_and_odm_fq_runs_beside_the_papers(tmp_path):
    for method in ("fqsr", "odm_fq"):
        fake_run(tmp_path / method, [f"method={method}", "bits=w4a4"], 30.5 if method == "fqsr" else 31.5)
    md = write_report(tmp_path, tmp_path / "out", SETS)["markdown"]
    assert "| EDSR-baseline x4 FQSR W4A4 SC8 | 30.50/0.8712 (paper 30.93/0.870) |" in md
    assert "| EDSR-baseline x4 ODM-FQ W4A4 SC8 | 31.50/0.8712 (paper 31.99/0.890) |" in md
    assert md.index("FQSR W4A4") < md.index("ODM-FQ W4A4")  # the paper's order
    assert "30.80/0.8712 (paper 24.93/0.744)" in md  # Urban100


def test_training_time(sweep_root):
    timing = training_time([sweep_root / "odm", sweep_root / "daq"])
    odm = next(r for r in timing["runs"] if r["method"] == "odm")
    assert odm["seconds_per_iter"] == pytest.approx(120.0) and odm["hours"] == pytest.approx(2.0)
    assert odm["paper_hours"] == 2.4 and odm["accelerator"] == "cpu"
    assert timing["methods"]["daq"]["seconds_per_iter"] == pytest.approx(90.0)
    assert "| EDSR-baseline x4 DAQ W2A2 | cpu x1 | 40 | 3600.0 | 1.000 | 90.0000 | 3.7 |" in timing_table(timing)


def test_an_exact_reconstruction_inf_psnr_is_valid_json_and_reported(tmp_path):
    from odm_sr.files import write_json

    run = fake_run(tmp_path / "perfect", ["method=odm"], float("inf"))
    write_json(run / "results.json", json.loads((run / "results.json").read_text()))  # as train.py writes it
    assert "Infinity" not in (run / "results.json").read_text()
    report = write_report(tmp_path, tmp_path / "out", SETS)
    assert "inf/0.8712" in report["markdown"]
    json.loads(report["paths"]["json"].read_text())  # strict
    assert "Infinity" not in report["paths"]["json"].read_text() and report["paths"]["png"].is_file()
