"""What a careless or unlucky user hits (issue 13): resume with new settings, shared run folders, trainer values,
late data errors, mislabelled or random starts, WANDB_MODE, unknown keys, unreadable resume checkpoints."""

from __future__ import annotations

import csv
import json
import re
import socket

import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN, compose_config, last_checkpoint
from PIL import Image

from odm_sr.lit_module import NonFiniteLossError
from odm_sr.train import train

QUIET = TINY_TRAIN + ["eval.bicubic_row=false"]


# -- 1. resume applies the current optim settings -----------------------------------------------------------------
def test_resume_applies_the_new_lr_milestones_and_gamma(tmp_path):
    first = QUIET + ["trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=2", "optim.lr=1e-3",
                     "optim.milestones=[3]", "optim.gamma=0.1"]
    train(compose_config(first, tmp_path))
    assert last_checkpoint(tmp_path)["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    resumed = train(compose_config(QUIET + [
        "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2", "optim.lr=2e-6",
        "optim.milestones=[5]", "optim.gamma=0.5", "optim.betas=[0.5,0.9]",
        f"resume={tmp_path / 'checkpoints' / 'last.ckpt'}"], tmp_path))
    ckpt = last_checkpoint(tmp_path)
    group, sched = ckpt["optimizer_states"][0]["param_groups"][0], ckpt["lr_schedulers"][0]
    assert ckpt["global_step"] == 6
    assert group["lr"] == pytest.approx(1e-6)  # 2e-6, halved once at the new milestone 5 (step 6 > 5)
    assert tuple(group["betas"]) == (0.5, 0.9)
    assert sched["base_lrs"] == [pytest.approx(2e-6)] and sched["gamma"] == 0.5
    assert resumed["config"]["optim"]["lr"] == 2e-6  # results.json records what ran
    with open(tmp_path / "csv" / "version_1" / "metrics.csv") as f:  # the resumed run's log
        lrs = [float(row["lr/net"]) for row in csv.DictReader(f) if row.get("lr/net")]
    assert lrs and max(lrs) <= 2e-6 * (1 + 1e-6)  # no step of the resumed run used the old lr


def test_after_a_divergence_the_advice_of_the_message_works(tmp_path, monkeypatch):
    """A run diverges (weights grow past a limit with lr=1; the poisoned loss stands for what a too-high lr does to
    a real one); resuming exactly as the message says, with a lower optim.lr, finishes."""
    from odm_sr.quant.base import FullPrecision

    real = FullPrecision.training_losses

    def diverging(self, model, lr, hr, step, teacher=None):
        out = real(self, model, lr, hr, step, teacher)
        if max(float(p.detach().abs().max()) for p in model.parameters() if p.requires_grad) > 3.5:
            out.terms["rec"] = out.terms["rec"] * float("nan")
        return out

    monkeypatch.setattr(FullPrecision, "training_losses", diverging)
    base = QUIET + ["callbacks.model_checkpoint.every_n_train_steps=3", "test_after_fit=false"]
    with pytest.raises(NonFiniteLossError, match="at step 4") as err:
        train(compose_config(base + ["optim.lr=1"], tmp_path))  # |w| grows ~1 per step: step 4 passes 3.5
    advice = re.search(r"(resume=\S+) (optim\.lr=\S+)", str(err.value))
    assert advice, str(err.value)
    assert advice.group(1) == f"resume={tmp_path / 'checkpoints' / 'last.ckpt'}"
    results = train(compose_config(base + [advice.group(1), advice.group(2)], tmp_path))
    assert results["steps"] == 6 and results["config"]["optim"]["lr"] == pytest.approx(0.1)


# -- 2. run folders -----------------------------------------------------------------------------------------------
def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    from omegaconf import OmegaConf

    from odm_sr.config import CONFIG_DIR

    run_dir = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "hydra" / "default.yaml"))["run"]["dir"]
    assert run_dir.startswith("${unique_dir:")
    stamp = str(tmp_path / "runs" / "2026-01-01_00-00-00")
    dirs = [OmegaConf.create({"d": "${unique_dir:" + stamp + "}"}).d for _ in range(3)]
    assert dirs == [stamp, stamp + "_1", stamp + "_2"]
    assert all((tmp_path / "runs" / d).is_dir() for d in dirs)


def test_a_fresh_run_refuses_a_folder_holding_another_run(tmp_path):
    short = QUIET + ["trainer.max_steps=3", "test_after_fit=false"]
    train(compose_config(short, tmp_path))
    before = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds another run .*checkpoints/last\.ckpt.*resume="):
        train(compose_config(short + ["seed=1"], tmp_path))
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == before
    resumed = train(compose_config(short + ["trainer.max_steps=6", "auto_resume=true"], tmp_path))
    assert resumed["steps"] == 6


# -- 5. trainer values --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "message"), [
    ("trainer.max_steps=-1", r"trainer\.max_steps=-1: expected a positive number"),
    ("trainer.max_steps=0", r"trainer\.max_steps=0: expected a positive number"),
    ("trainer.val_check_interval=0", r"trainer\.val_check_interval=0: expected a positive"),
])
def test_trainer_values_that_cannot_work_fail_before_any_work(override, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train(compose_config(TINY_TRAIN + [override], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# -- 6. broken val/test images fail before training ---------------------------------------------------------------
def _benchmark(root, name: str, scale: int = 2, broken: str | None = None) -> None:
    rng = np.random.default_rng(0)
    (root / "benchmark" / name / "HR").mkdir(parents=True)
    (root / "benchmark" / name / "LR_bicubic" / f"X{scale}").mkdir(parents=True)
    for stem in ("a", "b"):
        hr = root / "benchmark" / name / "HR" / f"{stem}.png"
        lr = root / "benchmark" / name / "LR_bicubic" / f"X{scale}" / f"{stem}x{scale}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(hr)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(lr)
        if broken == stem:
            lr.write_bytes(lr.read_bytes()[: len(lr.read_bytes()) // 2])  # header intact, data truncated


@pytest.mark.parametrize("where", ["data.val", "data.test"])
def test_a_truncated_val_or_test_image_fails_before_training(where, tmp_path):
    _benchmark(tmp_path / "data", "Set5")
    _benchmark(tmp_path / "data", "Set14", broken="b")
    sets = {"data.val": "[Set5]", "data.test": "[Set5]", where: "[Set14]"}
    overrides = TINY_TRAIN + [f"data.data_root={tmp_path / 'data'}"] + [f"{k}={v}" for k, v in sets.items()]
    with pytest.raises(ValueError, match=r"cannot read .*Set14/LR_bicubic/X2/bx2\.png"):
        train(compose_config(overrides, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()  # no training step ran


# -- 7. mislabelled or random starts ------------------------------------------------------------------------------
def test_fp_with_quantized_bits_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"method=fp with bits=w2a2: .*use bits=fp32"):
        train(compose_config(TINY_TRAIN + ["method=fp", "bits=w2a2"], tmp_path / "run"))


def test_qat_without_pretrained_weights_warns_naming_the_key(tmp_path):
    overrides = QUIET + ["method=daq", "bits=w4a4", "trainer.max_steps=1", "test_after_fit=false"]
    with pytest.warns(UserWarning, match=r"method=daq starts from RANDOM weights: model\.pretrained is not set"):
        train(compose_config(overrides, tmp_path))


# -- 8. WANDB_MODE ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "offline"), [(None, True), ("disabled", False), ("online", False)])
def test_wandb_mode_from_the_environment_wins_over_the_offline_default(mode, offline, tmp_path, monkeypatch):
    from odm_sr.builders import build_loggers

    if mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", mode)
    with socket.create_server(("127.0.0.1", 0)) as server:  # online probes the server: a local one that answers
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        (logger,) = build_loggers(compose_config(["logger=wandb"], tmp_path))
    assert logger._offline is offline  # the run itself starts only on first use


def test_wandb_online_without_a_server_logs_offline_at_once_with_a_warning(tmp_path, monkeypatch):
    """No network must not cost wandb's 90 s init timeout and then the run (issue 22, item 16); the server is a
    closed local port, so nothing leaves the machine."""
    import time

    import wandb

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [o for o in QUIET if not o.startswith("logger=")] + ["logger=wandb", "trainer.max_steps=1",
                                                                    "test_after_fit=false"]
    start = time.monotonic()
    try:
        with pytest.warns(UserWarning, match=r"wandb online: http://127\.0\.0\.1:9 is unreachable .*logging "
                                             r"offline instead"):
            train(compose_config(overrides, tmp_path))
    finally:
        wandb.teardown()
    assert time.monotonic() - start < 60
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 1  # the run is kept, to sync later


def test_wandb_mode_disabled_writes_no_offline_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "disabled")
    overrides = [o for o in QUIET if not o.startswith("logger=")] + ["logger=wandb", "trainer.max_steps=1",
                                                                    "test_after_fit=false"]
    try:
        train(compose_config(overrides, tmp_path))
    finally:
        wandb.teardown()  # wandb keeps the mode of its first set-up in the process: let later tests set theirs
    assert not list(tmp_path.glob("wandb/offline-run-*"))


# -- non-finite numbers and seeds (issue 22, items 7 and 15) -------------------------------------------------------
@pytest.mark.parametrize(("override", "message"), [
    ("method.lambda_m=inf", r"lambda_m=inf: expected"), ("method.lambda_m=nan", r"lambda_m=nan: expected"),
    ("optim.lr=nan", r"optim\.lr=nan: expected a positive number"), ("optim.lr=inf", r"optim\.lr=inf: "),
    ("seed=-1", r"seed=-1: expected a non-negative integer"), ("seed=4294967296", r"seed=4294967296: expected"),
])
def test_non_finite_numbers_and_bad_seeds_fail_before_any_work_naming_the_key(override, message, tmp_path):
    overrides = QUIET + ["method=odm", "bits=w4a4", override]
    with pytest.raises(ValueError, match=message):
        train(compose_config(overrides, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_divergence_before_the_first_checkpoint_advises_no_resume(tmp_path, monkeypatch):
    """A non-finite loss at the first step: no checkpoint exists, so the message must not advise resuming from one."""
    from odm_sr.quant.base import FullPrecision

    real = FullPrecision.training_losses

    def poisoned(self, model, lr, hr, step, teacher=None):
        out = real(self, model, lr, hr, step, teacher)
        out.terms["rec"] = out.terms["rec"] * float("nan")
        return out

    monkeypatch.setattr(FullPrecision, "training_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"at step 0 .*No checkpoint was written before it: start the run "
                                                 r"again with a lower learning rate, optim\.lr=1e-05") as err:
        train(compose_config(QUIET + ["test_after_fit=false"], tmp_path))
    assert "resume=" not in str(err.value)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


# -- 10. unknown keys ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["+data.batchsize=1", "+optim.learning_rate=1", "+eval.tiles=64",
                                      "+model.n_feats=8", "+bits.weights=2"])
def test_unknown_keys_added_with_plus_are_refused(override, tmp_path):
    key = override[1:].split("=")[0]
    with pytest.raises(ValueError, match=rf"unknown config key\(s\) \['{re.escape(key)}'\]"):
        train(compose_config(TINY_TRAIN + [override], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["+eval.tiles=64", "+data.batchsize=1", "+model.n_feats=8"])
def test_odm_sr_eval_refuses_unknown_keys_as_training_does(override, tmp_path):
    """issue 22, item 13: odm-sr-eval ignored them silently."""
    from odm_sr.eval import evaluate

    extra = ["model=edsr_small"] if override.startswith("+model.") else []
    key = override[1:].split("=")[0]
    with pytest.raises(ValueError, match=rf"unknown config key\(s\) \['{re.escape(key)}'\]: nothing reads them"):
        evaluate(compose_config(["scale=2", *extra, override], tmp_path, "eval"))


# -- 12. resume= errors name the file -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("short")
    train(compose_config(QUIET + ["trainer.max_steps=2", "test_after_fit=false"], out))
    return out / "checkpoints" / "last.ckpt"


def _resume_error(tmp_path, target, extra=()) -> str:
    with pytest.raises((ValueError, OSError)) as err:
        train(compose_config(QUIET + [f"resume={target}", *extra], tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    return str(err.value)


def test_resume_from_a_directory_says_so(tmp_path, short_run):
    assert re.search(rf"{re.escape(str(short_run.parent))}: is a directory", _resume_error(tmp_path, short_run.parent))


def test_resume_from_a_truncated_file_names_it(tmp_path, short_run):
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(short_run.read_bytes()[:5000])
    assert re.search(rf"{re.escape(str(bad))}: cannot be read as a torch checkpoint", _resume_error(tmp_path, bad))


def test_resume_from_an_official_state_dict_points_to_model_pretrained(tmp_path, short_run):
    official = tmp_path / "official.pt"
    torch.save({k[4:]: v for k, v in last_checkpoint(short_run.parent.parent)["state_dict"].items()
                if k.startswith("net.")}, official)
    message = _resume_error(tmp_path, official)
    assert f"resume {official}: not an odm-sr training checkpoint" in message and "model.pretrained" in message


def test_resume_with_another_architecture_names_the_mismatch(tmp_path, short_run):
    message = _resume_error(tmp_path, short_run, ["model.kwargs.n_feats=16"])
    assert f"resume={short_run}: does not match the network of the current config" in message
    assert re.search(r"shape mismatch for net\.head\.0\.weight: checkpoint \(8, 3, 3, 3\), model \(16, 3, 3, 3\)",
                     message)


def test_results_json_is_strict_json(tmp_path):
    from odm_sr.files import write_json

    write_json(tmp_path / "r.json", {"psnr": float("inf"), "nested": [float("nan"), 1.5]})
    text = (tmp_path / "r.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    data = json.loads(text)
    assert float(data["psnr"]) == float("inf") and data["nested"][1] == 1.5


# -- 11. tiling and per-image statistics --------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "warns"), [("daq", True), ("ddtb", True), ("odm", False), ("pams", False)])
def test_tiling_a_method_with_per_image_statistics_warns(method, warns, recwarn):
    from odm_sr.evaluation import warn_if_tiled_dynamic
    from odm_sr.quant import build_method

    cfg = compose_config([f"method={method}", "bits=w4a4"], "unused")
    warn_if_tiled_dynamic(build_method(cfg.method, cfg.bits), 64, "--tile")
    warn_if_tiled_dynamic(build_method(cfg.method, cfg.bits), None, "--tile")
    messages = [str(w.message) for w in recwarn.list if "whole-image" in str(w.message)]
    assert messages == ([f"--tile=64: method '{method}' quantizes activations with statistics of the whole "
                         f"input, so a tiled result differs from the whole-image one (not only round-off); "
                         f"leave --tile unset for reported numbers."] if warns else [])
