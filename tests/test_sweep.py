"""Every sweep (conf/sweep) composes and expands to its jobs with Hydra's own sweeper logic; one real multirun
end to end, re-run to check that finished jobs are skipped."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import check_config, compose_config
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from odm_sr.config import CONFIG_DIR

SWEEP_DIR = CONFIG_DIR / "sweep"
SWEEPS = sorted(p.stem for p in SWEEP_DIR.glob("*.yaml") if p.stem != "common")
ODM_EXPERIMENT = "mini_edsr_x4_w2a2_odm"
LONG_ODM = "mini_long_edsr_x4_w2a2_odm"
# sweep -> (experiment it is used with, number of jobs)
EXPECTED = {
    "ablation_j": (ODM_EXPERIMENT, 3),
    "ablation_lambda_m": (ODM_EXPERIMENT, 3),
    "ablation_lr": (ODM_EXPERIMENT, 3),
    "coop_formulation": (ODM_EXPERIMENT, 5),
    "wcc_vs_lsq": (ODM_EXPERIMENT, 2),
    "ablation_components": (ODM_EXPERIMENT, 5),
    "methods": ("base/mini", 8),
    "seeds": (ODM_EXPERIMENT, 3),
    "main_table": (None, 8),
    "mini_table": (None, 8),
    "mr_scale": (LONG_ODM, 6),
    "mr_norm": (LONG_ODM, 4),
    "mr_ablation": (LONG_ODM, 3),
    "mr_ablation_strong": (LONG_ODM, 2),
    "mr_methods": (None, 3),
    "real_methods": (None, 14),
    "real_odm_ablation": (None, 2),
    "real_odm_ablation_rho": (None, 2),
    "real_methods_seed1": (None, 5),
    "srresnet_methods": (None, 6),
}
# sweeps that write into another sweep's folder (a second seed beside the first)
SWEEP_NAME = {"real_methods_seed1": "real_methods"}
# sweeps whose jobs pick config-group options: every job is composed and validated
SELECTS_GROUPS = {"coop_formulation", "ablation_components", "wcc_vs_lsq", "methods", "main_table", "mini_table",
                  "mr_norm", "mr_ablation", "mr_ablation_strong", "mr_methods", "real_methods", "real_odm_ablation",
                  "real_odm_ablation_rho", "real_methods_seed1", "srresnet_methods"}


def _overrides(name: str) -> list[str]:
    experiment = EXPECTED[name][0]
    return [f"+sweep={name}"] + ([f"experiment={experiment}"] if experiment else [])


def _jobs(name: str, extra: tuple[str, ...] = ()) -> tuple[DictConfig, list[list[str]]]:
    """The sweep's composed config and its jobs' overrides, expanded as Hydra's BasicSweeper does."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=_overrides(name) + list(extra), return_hydra_config=True)
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    parsed = OverridesParser.create().parse_overrides(params + _overrides(name) + list(extra))
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return cfg, [job for batch in batches for job in batch]


def test_every_sweep_is_covered():
    assert set(SWEEPS) == set(EXPECTED)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_composes_and_expands(name, tmp_path):
    cfg, jobs = _jobs(name)
    assert len(jobs) == EXPECTED[name][1]
    assert len({tuple(sorted(job)) for job in jobs}) == len(jobs)
    assert cfg.sweep_name == SWEEP_NAME.get(name, name) and cfg.skip_done and cfg.auto_resume
    assert cfg.hydra.sweep.dir == f"{cfg.paths.log_dir}/sweeps/{SWEEP_NAME.get(name, name)}"
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.override_dirname}"
    for job in jobs if name in SELECTS_GROUPS else jobs[:1]:
        check_config(compose_config(job, tmp_path))


def test_sweep_values():
    _, jobs = _jobs("ablation_components")
    assert [job[0] for job in jobs] == [f"+ablation={row}" for row in "abcde"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        row_a = compose("train", overrides=[f"experiment={ODM_EXPERIMENT}", "+ablation=a"]).method
        off = compose("train", overrides=[f"experiment={ODM_EXPERIMENT}", "+ablation=mr_off"]).method
    assert (row_a.wcc.learn_gamma, row_a.wcc.stat, row_a.mr.mode) == (False, "max_abs", "off")
    assert off.mr.mode == "off"  # a string, not YAML's boolean off
    _, jobs = _jobs("methods")
    assert {tuple(sorted(o for o in job if o.startswith(("method=", "bits=")))) for job in jobs} == {
        tuple(sorted([f"method={m}", f"bits={b}"])) for m in ("pams", "daq", "ddtb", "odm") for b in ("w2a2", "w4a4")}
    _, jobs = _jobs("ablation_j")
    assert [job[0] for job in jobs] == ["method.init.j=100", "method.init.j=99", "method.init.j=95"]


def _method(job: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=job)


def test_mr_sweep_values():
    """The MR sweeps set what their comments say (issue: does ODM's mechanism act?)."""
    _, jobs = _jobs("mr_scale")
    assert [float(job[0].split("=")[1]) for job in jobs] == [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2]
    _, jobs = _jobs("mr_norm")
    got = {(c.method.mr.norm, c.method.lambda_m) for c in map(_method, jobs)}
    assert got == {("l2sq", 1e-7), ("l2sq", 1e-6), ("mse", 1e-2), ("mse", 1e-1)}
    _, jobs = _jobs("mr_ablation_strong")
    strong = [_method(job).method for job in jobs]
    assert [(m.mr.mode, m.wcc.learn_gamma, m.lambda_m) for m in strong] == [("coop", False, 1e-3),
                                                                             ("naive", True, 1e-3)]
    _, jobs = _jobs("mr_methods")
    cfgs = [_method(job) for job in jobs]
    assert [c.method.name for c in cfgs] == ["pams", "daq", "ddtb"]
    assert all(c.trainer.max_steps == 3000 and c.data.iters_per_epoch == 300 and (c.bits.w, c.bits.a) == (2, 2)
               and list(c.analyze.after_fit) == ["mismatch", "variance"] for c in cfgs)


def test_real_sweep_values():
    """The real-network sweeps (issue: real trained networks): one budget for every method, from the official
    weights; the ablation rows at the paper's and at the rho-matched lambda_M."""
    cfgs = [_method(job) for job in _jobs("real_methods")[1]]
    got = {(c.model.name, f"w{c.bits.w}a{c.bits.a}", c.method.name) for c in cfgs}
    assert got == {("imdn", b, m) for b in ("w2a2", "w4a4") for m in ("pams", "daq", "ddtb", "odm", "lsq")} | {
        ("pan", "w2a2", m) for m in ("pams", "daq", "ddtb", "odm")}
    assert all(c.trainer.max_steps == 1000 and c.data.iters_per_epoch == 100 and c.model.scale == 4
               and c.model.pretrained.endswith(("/imdn/IMDN_x4.pth", "/pan/PANx4_DF2K.pth")) for c in cfgs)
    rows = [_method(job).method for name in ("real_odm_ablation", "real_odm_ablation_rho") for job in _jobs(name)[1]]
    assert [(m.mr.mode, m.lambda_m) for m in rows] == [("off", 1e-5), ("naive", 1e-5), ("naive", 5e-7),
                                                       ("coop", 5e-7)]


def test_the_second_seed_sweep_is_the_imdn_w2a2_rows_of_real_methods_at_seed_1():
    def experiments(jobs: list[list[str]]) -> set[str]:
        return {j for job in jobs for j in job if j.startswith("experiment=")}

    second = _jobs("real_methods_seed1")[1]
    assert all("seed=1" in job for job in second) and len(second) == 5
    assert experiments(second) == {e for e in experiments(_jobs("real_methods")[1]) if "real_imdn_x4_w2a2_" in e}


def test_command_line_overrides_reach_every_job():
    _, jobs = _jobs("seeds", ("trainer.max_steps=5",))
    assert all("trainer.max_steps=5" in job for job in jobs)


def test_wandb_group_is_the_sweep_name(tmp_path):
    cfg = compose_config(["+sweep=ablation_j", f"experiment={ODM_EXPERIMENT}", "logger=wandb"], tmp_path)
    assert cfg.logger.wandb.group == "ablation_j"
    assert compose_config(["logger=wandb"], tmp_path).logger.wandb.group == "train"  # task_name outside a sweep


@pytest.mark.slow
def test_multirun_end_to_end_then_skips_finished_jobs(tmp_path):
    """`odm-sr-train -m +sweep=ablation_j` on a tiny budget: 3 job dirs with results.json; the same command again
    skips all three."""
    from odm_sr.train import train

    fp_dir = tmp_path / "fp"
    tiny_model = ["model.kwargs.n_resblocks=1", "model.kwargs.n_feats=8"]
    train(compose_config(["model=edsr_small", *tiny_model, "model.scale=4", "data=sample", "data.lr_patch=12",
                          "data.batch_size=2", "trainer=cpu", "trainer.max_steps=2", "trainer.val_check_interval=2",
                          "trainer.enable_progress_bar=false", "callbacks.model_checkpoint.every_n_train_steps=2",
                          "logger=csv", "test_after_fit=false"], fp_dir))
    ckpt = fp_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    log_dir = tmp_path / "logs"
    command = [sys.executable, "-m", "odm_sr.cli.train", "-m", "+sweep=ablation_j", f"experiment={ODM_EXPERIMENT}",
               *tiny_model, "data=sample", "data.lr_patch=12", "data.batch_size=2", "trainer.max_steps=2",
               "method.init.num_batches=1", "logger=csv", f"paths.log_dir={log_dir}", f"model.pretrained={ckpt}",
               "eval.bicubic_row=false", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
               "test_after_fit=false"]  # the sweep mechanics are under test here; test_train.py covers the test sets
    env = {**os.environ, "WANDB_MODE": "disabled"}

    def run() -> str:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    run()
    sweep_dir = log_dir / "sweeps" / "ablation_j"
    job_dirs = sorted(p.parent for p in sweep_dir.glob("*/results.json"))
    assert len(job_dirs) == 3
    assert sorted(d.name.split("method.init.j=")[1].split(",")[0] for d in job_dirs) == ["100", "95", "99"]
    assert all(f"experiment={ODM_EXPERIMENT}" in d.name and str(tmp_path) not in d.name for d in job_dirs)
    mtimes = {d: (d / "results.json").stat().st_mtime_ns for d in job_dirs}
    out = run()
    assert out.count("skipping") == 3, out[-3000:]
    assert {d: (d / "results.json").stat().st_mtime_ns for d in job_dirs} == mtimes


def test_every_key_left_out_of_job_folder_names_but_model_pretrained_is_one_that_keeps_the_result():
    """The job folder name leaves out model.pretrained, so skip_done must compare it (issue 22, item 8)."""
    from odm_sr.run_guard import _changes_result

    left_out = OmegaConf.load(SWEEP_DIR / "common.yaml").hydra.job.config.override_dirname.exclude_keys
    assert [k for k in left_out if _changes_result(k)] == ["model.pretrained"]


def test_a_finished_job_is_skipped_only_with_the_same_result_config(tmp_path, capsys):
    """A sweep rerun with another model.pretrained must not keep the old model's numbers (issue 22, item 8)."""
    from odm_sr.train import train

    tiny = ["model.kwargs.n_resblocks=1", "model.kwargs.n_feats=8", "model.scale=2", "data=sample",
            "data.lr_patch=12", "data.batch_size=2", "trainer=cpu", "trainer.max_steps=2",
            "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "logger=csv",
            "callbacks.model_checkpoint.every_n_train_steps=2", "test_after_fit=false"]
    train(compose_config(tiny, tmp_path / "fp"))
    fp_a = tmp_path / "fp" / "checkpoints" / "last.ckpt"
    fp_b = tmp_path / "other_fp.ckpt"
    fp_b.write_bytes(fp_a.read_bytes())
    job = tmp_path / "job"
    sweep = tiny + ["method=pams", "bits=w4a4", "skip_done=true", "auto_resume=true"]
    first = train(compose_config(sweep + [f"model.pretrained={fp_a}"], job))
    capsys.readouterr()
    again = train(compose_config(sweep + [f"model.pretrained={fp_a}", "trainer.enable_progress_bar=true",
                                          "logger=none", "eval.bicubic_row=false"], job))
    assert again == first and "skipping" in capsys.readouterr().out  # only keys that keep the result differ
    for override, key in ((f"model.pretrained={fp_b}", "model.pretrained"), ("seed=1", r"data\.seed"),
                          ("trainer.max_steps=4", "trainer.max_steps")):
        with pytest.raises(ValueError, match=rf"skip_done: {job}/results.json was made with {key}=.*, the new "
                                             rf"config has {key}="):
            train(compose_config(sweep + [f"model.pretrained={fp_a}", override], job))


def test_a_job_finished_before_the_model_builder_moved_is_still_skipped(tmp_path, capsys):
    """results.json of a run made when conf/model named odm_sr.builders.backbone: skip_done compares it in
    today's spelling (config.drop_retired_keys), so the sweep does not refuse a job that has not changed."""
    import json

    from odm_sr.train import train

    tiny = ["model.kwargs.n_resblocks=1", "model.kwargs.n_feats=8", "model.scale=2", "data=sample",
            "data.lr_patch=12", "data.batch_size=2", "trainer=cpu", "trainer.max_steps=2",
            "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "logger=csv",
            "callbacks.model_checkpoint.every_n_train_steps=2", "test_after_fit=false", "skip_done=true"]
    first = train(compose_config(tiny, tmp_path))
    results = tmp_path / "results.json"
    stored = json.loads(results.read_text())
    assert stored["config"]["model"]["_target_"] == "odm_sr.models.build.backbone"
    stored["config"]["model"]["_target_"] = "odm_sr.builders.backbone"
    results.write_text(json.dumps(stored))
    capsys.readouterr()
    again = train(compose_config(tiny, tmp_path))
    assert "skipping" in capsys.readouterr().out and again["config"]["model"] == {
        **first["config"]["model"], "_target_": "odm_sr.builders.backbone"}
