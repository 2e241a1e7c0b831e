"""Every experiment config composes and carries its paper recipe; launchers and the DDP trainer compose."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from helpers import check_config, compose_config, composed_experiment, method_config
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from odm_sr.builders import build_datamodule, build_network, pretrained_network
from odm_sr.config import CONFIG_DIR
from odm_sr.data import SRDataModule
from odm_sr.models.base import SRModel
from odm_sr.quant.layers import quantized_layers

EXPERIMENT_DIR = CONFIG_DIR / "experiment"
# every option of the experiment group, shared bases (base/...) included
EXPERIMENTS = sorted(p.relative_to(EXPERIMENT_DIR).with_suffix("").as_posix() for p in EXPERIMENT_DIR.rglob("*.yaml"))
PAPER = [e for e in EXPERIMENTS if e.startswith("paper_")]
MINI_QAT = [e for e in EXPERIMENTS if e.startswith("mini_edsr") and not e.endswith("_fp")]
MINI_LONG = [e for e in EXPERIMENTS if e.startswith("mini_long_")]

# official FP checkpoint file per (model, scale) (METHODS.md §2.1)
CHECKPOINTS = {
    ("edsr_baseline", 4): "edsr_baseline_x4-6b446fab.pt", ("edsr_baseline", 2): "edsr_baseline_x2-1bc95232.pt",
    ("edsr", 4): "edsr_x4-4f62e9ef.pt", ("rdn", 4): "rdn_baseline_x4.pt", ("rdn", 2): "rdn_baseline_x2.pt",
    ("swinir_light", 4): "002_lightweightSR_DIV2K_s64w8_SwinIR-S_x4.pth",
    ("swinir_light", 2): "002_lightweightSR_DIV2K_s64w8_SwinIR-S_x2.pth", ("hat_s", 4): "HAT-S_SRx4.pth",
    ("srresnet", 4): "srresnet_x4.pt",  # the DAQ release's FP SRResNet (base/paper_srresnet_x4.yaml)
}
# (max_steps, milestones, batch) of each method's released schedule (METHODS.md §4, §5.6); 1 epoch = 1000 steps
SCHEDULES = {
    "pams": (30000, [10000, 20000], 16),
    "daq": (60000, [30000], 16),
    # DDTB: the release's 60 epochs include its calibration epoch (no optimizer steps): 59000 optimizer steps
    "ddtb": (59000, [10000, 20000, 30000, 40000, 50000, 60000], 16),
    "odm": (60000, [15000, 30000, 45000], 8),
    "lsq": (60000, [15000, 30000, 45000], 8),  # ODM's recipe (Table S7's variant)
    "quantsr": (60000, [15000, 30000, 45000], 8),  # no released recipe: ODM's [decision]
}


def _compose(name: str, tmp_path: Path, *extra: str):
    return compose_config([f"experiment={name}", *extra], tmp_path)


def _paper_name(model: str, scale: int, method: str) -> str:
    return f"paper_{model}_x{scale}_{method}"


def test_the_paper_and_mini_experiments_exist():
    released = ("pams", "daq", "ddtb", "odm")
    expected = {_paper_name(m, s, q) for m in ("edsr_baseline", "rdn", "swinir_light") for s in (4, 2)
                for q in released}
    expected |= {f"paper_edsr_baseline_x4_300k_{q}" for q in released}  # S2
    expected |= {"paper_edsr_x4_daq", "paper_edsr_x4_odm"}  # S3
    expected |= {f"paper_edsr_baseline_x{s}_{m}" for s in (4, 2) for m in ("fq_odm", "fqsr")}  # S4
    expected |= {f"paper_hat_s_x4_{q}" for q in released}  # S5
    expected |= {f"paper_srresnet_x4_{q}" for q in SCHEDULES}  # the main paper's SRResNet comparison
    expected |= {f"mini_edsr_x4_w{b}a{b}_{q}" for b in (2, 4) for q in released} | {"mini_edsr_x4_fp"}
    assert expected <= set(EXPERIMENTS), sorted(expected - set(EXPERIMENTS))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(name):
    """As ``train`` does, without training: compose → check the plain values → build the method, the network it
    quantizes and the data module. The network gets random weights: the FP weights ``model.pretrained`` names
    (the official files of paper_*/real_*, or the run of the FP stage) need not be here; their strict loading is
    tested in tests/models."""
    # the base/paper* fragments set bits=w2a2 and no method: alone they would be an FP run labelled w2a2 (refused)
    cfg = copy.deepcopy(composed_experiment(name, *(["method=odm"] if name.startswith("base/paper") else [])))
    method = check_config(cfg)
    OmegaConf.to_container(cfg.optim, resolve=True)
    cfg.model.pretrained = None
    torch.manual_seed(0)
    net, built, teacher = build_network(cfg, method)
    assert built is method and isinstance(net, SRModel) and net.scale == cfg.model.scale
    assert (teacher is not None) == method.needs_teacher
    assert method.bits.is_float or quantized_layers(net), "nothing was quantized"
    datamodule = build_datamodule(cfg)
    assert isinstance(datamodule, SRDataModule) and datamodule.test_set_names == list(cfg.data.test)


@pytest.mark.parametrize("name", [e for e in PAPER if not e.endswith("_fp")])
def test_paper_experiment_recipe(name):
    cfg = composed_experiment(name)
    model, scale, method = str(cfg.model.name), int(cfg.model.scale), str(cfg.method.name)
    assert cfg.data.train == "div2k" and list(cfg.data.test) == ["Set5", "Set14", "B100", "Urban100"]
    assert cfg.trainer.accelerator == "gpu" and cfg.data.iters_per_epoch == 1000
    assert Path(cfg.model.pretrained).name == CHECKPOINTS[(model, scale)]
    assert Path(cfg.model.pretrained).parent == Path(cfg.paths.ckpt_dir)
    assert float(cfg.optim.lr) == (5e-5 if name == "paper_edsr_x4_daq" else 1e-4)
    if method == "fqsr":  # S4: FQSR's released recipe, W/A 4 bits, outputs and adds 8 bits, cosine to 0
        assert dict(cfg.bits) == {"w": 4, "a": 4, "sc": 8}
        assert (cfg.trainer.max_steps, cfg.data.batch_size, cfg.data.lr_patch) == (300000, 16, 48)
        optim = OmegaConf.to_container(cfg.optim, resolve=True)
        assert optim["scheduler"]["_target_"] == "torch.optim.lr_scheduler.CosineAnnealingLR"
        assert (optim["scheduler"]["T_max"], optim["eta_min"]) == (300000, 0.0) and "milestones" not in optim
        assert (cfg.method.stable, cfg.method.quant_loss_weight, cfg.method.prelu) == (20, 0.3, False)
        return
    if "_fq_" in name:  # S4: ODM-FQ at W/A 4 bits, skip connections 8 bits
        assert method == "odm_fq" and cfg.method.fq.enabled and dict(cfg.bits) == {"w": 4, "a": 4, "sc": 8}
    else:
        assert dict(cfg.bits) == {"w": 2, "a": 2, "sc": 8}
    steps, milestones, batch = SCHEDULES["odm" if method == "odm_fq" else method]
    if "_300k_" in name or name == "paper_edsr_x4_odm":  # S2, S3: 300K iterations
        # DDTB: 300K iterations, its calibration epoch included, as the release counts its epochs
        assert cfg.trainer.max_steps == (299000 if method == "ddtb" else 300000)
        stretched = {"pams": [100000, 200000], "daq": [150000], "odm": [75000, 150000, 225000],
                     "ddtb": [50000, 100000, 150000, 200000, 250000, 300000]}
        assert list(cfg.optim.milestones) == stretched[method]
    elif name == "paper_edsr_x4_daq":  # DAQ's released EDSR-full script
        assert (cfg.trainer.max_steps, list(cfg.optim.milestones), cfg.data.batch_size) == (300000, [150000], 4)
    else:
        assert (cfg.trainer.max_steps, list(cfg.optim.milestones)) == (steps, milestones)
    if name != "paper_edsr_x4_daq":
        assert cfg.data.batch_size == batch
    rdn_baseline = model == "rdn" and method in ("pams", "daq", "ddtb")
    assert cfg.data.lr_patch == ({4: 24, 2: 32}[scale] if rdn_baseline else 48)  # HR 96 / 64 on RDN, else LR 48
    if method.startswith("odm"):
        assert cfg.method.lambda_m == (1e-6 if model == "rdn" else 1e-5)
        assert cfg.method.init.num_batches == 100


@pytest.mark.parametrize(("name", "iterations"), [("paper_edsr_baseline_x4_ddtb", 60000),
                                                  ("paper_rdn_x2_ddtb", 60000),
                                                  ("paper_edsr_baseline_x4_300k_ddtb", 300000)])
def test_ddtb_epochs_include_the_calibration_epoch(name, iterations):
    """zysxmu/DDTB runs `--epochs 60` with epoch 0 as the calibration epoch: calibration iterations plus optimizer
    steps make 60 epochs (300K iterations for the S2 variant), not 60 epochs after calibration."""
    cfg = composed_experiment(name)
    calibration = int(cfg.method.stages.calib_epochs) * int(cfg.method.iters_per_epoch)
    assert calibration == 1000 and cfg.trainer.max_steps + calibration == iterations


def test_odm_paper_recipe_values():
    cfg = composed_experiment("paper_edsr_baseline_x4_odm")
    assert list(cfg.optim.milestones) == [15000, 30000, 45000]
    assert cfg.trainer.max_steps == 60000 and cfg.data.batch_size == 8 and cfg.optim.lr == 1e-4
    assert composed_experiment("paper_edsr_baseline_x4_pams").trainer.max_steps == 30000
    assert composed_experiment("paper_rdn_x4_odm").method.lambda_m == 1e-6
    assert composed_experiment("paper_edsr_baseline_x4_fq_odm").bits.sc == 8


def test_user_picks_the_bit_width(tmp_path):
    cfg = _compose("paper_swinir_light_x2_odm", tmp_path, "bits=w3a3")
    assert (cfg.bits.w, cfg.bits.a) == (3, 3)


@pytest.mark.parametrize("scale", [4, 2])
def test_rdn_fp_experiment_trains_ddtbs_baseline(scale):
    cfg = composed_experiment(f"paper_rdn_x{scale}_fp")
    assert cfg.method.name == "fp" and cfg.model.pretrained is None and cfg.bits.w == 32
    assert (cfg.trainer.max_steps, list(cfg.optim.milestones), cfg.data.batch_size) == (300000, [200000], 16)
    assert cfg.data.lr_patch == {4: 48, 2: 32}[scale]


@pytest.mark.parametrize("name", MINI_QAT)
def test_mini_experiment_is_cpu_sized(name):
    cfg = composed_experiment(name)
    bits = int(name.split("_w")[1][0])
    assert (cfg.bits.w, cfg.bits.a) == (bits, bits) and cfg.method.name == name.split(f"_w{bits}a{bits}_")[1]
    assert cfg.model.name == "edsr" and cfg.model.kwargs.n_resblocks == 4 and cfg.model.scale == 4
    assert cfg.data.train == "sr291" and list(cfg.data.val) == ["Set5"]
    assert list(cfg.data.test) == ["Set5", "Set14", "B100"]
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.max_steps == 300
    assert (cfg.data.lr_patch, cfg.data.batch_size, cfg.data.iters_per_epoch) == (16, 8, 30)
    assert cfg.model.pretrained == f"{cfg.paths.log_dir}/mini/fp/checkpoints/last.ckpt"
    if cfg.method.name.startswith("odm"):
        assert cfg.method.init.num_batches == 20
    if cfg.method.name in ("pams", "ddtb"):
        assert cfg.method.iters_per_epoch == 30  # PAMS's alpha epoch / DDTB's calibration epoch: 30 steps
    if cfg.method.name in ("odm_fq", "fqsr"):  # the CPU-sized Table S4 pair: same budget, each its own schedule
        assert cfg.bits.sc == 8 and (cfg.method.name == "fqsr" or cfg.method.fq.enabled)
        schedule = OmegaConf.to_container(cfg.optim, resolve=True)
        assert (schedule["scheduler"]["T_max"] == 300) if cfg.method.name == "fqsr" else schedule["milestones"]


@pytest.mark.parametrize("name", MINI_LONG)
def test_mini_long_experiment_is_the_mini_setup_ten_times_longer(name):
    cfg, mini = composed_experiment(name), composed_experiment(name.replace("mini_long_", "mini_"))
    assert cfg.method.name == mini.method.name and (cfg.bits.w, cfg.bits.a) == (2, 2)
    assert cfg.model == mini.model and (cfg.data.lr_patch, cfg.data.batch_size) == (16, 8)
    assert (cfg.trainer.max_steps, cfg.data.iters_per_epoch) == (3000, 300)
    assert list(cfg.optim.milestones) == [10 * m for m in mini.optim.milestones]
    assert list(cfg.analyze.after_fit) == ["mismatch", "variance"] and cfg.analyze.data == "B100"
    if cfg.method.name == "odm":
        assert cfg.method.init.num_batches == 100
    if cfg.method.name in ("pams", "ddtb"):
        assert cfg.method.iters_per_epoch == 300


def test_mini_fp_writes_where_the_mini_experiments_look():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        fp = compose("train", overrides=["experiment=mini_edsr_x4_fp"], return_hydra_config=True)
        odm = compose("train", overrides=["experiment=mini_edsr_x4_w2a2_odm"], return_hydra_config=True)
    assert fp.method.name == "fp" and fp.model.pretrained is None and fp.trainer.max_steps == 2000
    assert odm.model.pretrained == f"{fp.hydra.run.dir}/checkpoints/last.ckpt"
    assert odm.hydra.run.dir == f"{odm.paths.log_dir}/mini/w2a2_odm"


@pytest.mark.parametrize("name", [e for e in PAPER if not e.endswith("_fp")])
def test_missing_checkpoint_is_named(name, tmp_path):
    cfg = composed_experiment(name).copy()
    cfg.paths.ckpt_dir = str(tmp_path / "empty")  # model.pretrained interpolates it
    with pytest.raises(FileNotFoundError, match=Path(cfg.model.pretrained).name.replace(".", r"\.")):
        pretrained_network(cfg.model)


def test_building_a_paper_experiment_without_its_checkpoint_fails_naming_it(tmp_path):
    cfg = _compose("paper_edsr_baseline_x4_odm", tmp_path, f"paths.ckpt_dir={tmp_path}")
    with pytest.raises(FileNotFoundError, match=r"edsr_baseline_x4-6b446fab\.pt"):
        build_network(cfg)


def test_ckpt_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ODM_SR_CKPT", str(tmp_path / "ckpts"))
    cfg = _compose("paper_hat_s_x4_odm", tmp_path)
    assert cfg.model.pretrained == str(tmp_path / "ckpts" / "HAT-S_SRx4.pth")


def test_experiment_sets_top_level_keys(tmp_path):
    assert _compose("paper_edsr_baseline_x4_odm", tmp_path).task_name == "paper"
    main_odm = compose_config(["experiment=main_odm"], tmp_path)
    assert main_odm.task_name == "main" and main_odm.eval.pretrained_row is True


# -- launchers and the DDP trainer ------------------------------------------------------------------------------
def _hydra_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_composes(monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    for var in ("ODM_SR_SLURM_PARTITION", "ODM_SR_GPUS", "ODM_SR_SLURM_TIMEOUT_MIN"):
        monkeypatch.delenv(var, raising=False)
    launcher = OmegaConf.to_container(_hydra_cfg("hydra/launcher=slurm", "+sweep=ablation_j").hydra.launcher,
                                      resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["partition"] is None and launcher["gpus_per_node"] == 1 and launcher["tasks_per_node"] == 1
    assert isinstance(launcher["timeout_min"], int) and launcher["max_num_timeout"] > 0
    assert launcher["name"] == "odm-sr-ablation_j"
    monkeypatch.setenv("ODM_SR_SLURM_PARTITION", "gpu-long")
    monkeypatch.setenv("ODM_SR_GPUS", "4")
    launcher = OmegaConf.to_container(_hydra_cfg("hydra/launcher=slurm").hydra.launcher, resolve=True)
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == ("gpu-long", 4, 4)


def test_joblib_launcher_composes(monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    monkeypatch.delenv("ODM_SR_JOBS", raising=False)
    launcher = OmegaConf.to_container(_hydra_cfg("hydra/launcher=local_parallel").hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert launcher["n_jobs"] == 2


def test_ddp_trainer_composes_and_instantiates(tmp_path, monkeypatch):
    import hydra
    from lightning.pytorch.strategies import DDPStrategy

    monkeypatch.delenv("ODM_SR_GPUS", raising=False)
    cfg = compose_config(["experiment=paper_edsr_baseline_x4_odm", "trainer=ddp"], tmp_path)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2 and cfg.trainer.accelerator == "gpu"
    assert cfg.trainer.use_distributed_sampler and not cfg.trainer.sync_batchnorm
    from odm_sr.train import lightning_trainer_config  # trainer.* less the LightningModule's keys (compile), as train()

    trainer = hydra.utils.instantiate(lightning_trainer_config(cfg.trainer), accelerator="cpu",
                                      logger=False)  # no GPU needed to build it
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2


def test_an_older_checkpoint_config_with_retired_keys_still_loads(tmp_path):
    """Runs saved before ``method.placement.transformer_same_layers`` (one legal value) and ``optim.name`` (read by
    nothing) were removed hold them in their hyper-parameters: ``load_trained`` drops them and builds the net."""
    import torch

    from odm_sr.trained import load_trained

    cfg = compose_config(["model=edsr_small", "model.kwargs.n_resblocks=1", "model.kwargs.n_feats=8",
                          "model.scale=2", "method=pams", "bits=w2a2"], tmp_path)
    torch.manual_seed(0)
    net, _, _ = build_network(cfg)
    old = OmegaConf.to_container(cfg, resolve=True)
    old["method"]["placement"]["transformer_same_layers"] = True
    old["optim"]["name"] = "adam"
    with pytest.raises(ValueError, match="unknown method config key 'placement.transformer_same_layers'"):
        method_config("pams", old["method"])  # the key is gone from conf/method/pams.yaml
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": old}}, tmp_path / "old.ckpt")
    loaded, _, loaded_cfg = load_trained(tmp_path / "old.ckpt")
    assert "transformer_same_layers" not in loaded_cfg.method.placement and "name" not in loaded_cfg.optim
    tensors = {k: v for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    assert tensors and all(torch.equal(loaded.state_dict()[k], v) for k, v in tensors.items())


# method: {dotted key under method: the single value older runs stored}; each key had one legal value
SINGLE_VALUE_KEYS = {
    "odm": {"quantize_bias": False, "init.interp": "linear", "mr.params": "conv_linear_wb",
            "placement.quant_attn_matmul": False, "fq.quantize_outputs": False},
    "daq": {"stats_scope": "image", "placement.quant_attn_matmul": False},
    "ddtb": {"gate_pool": "image", "skt.feature": "pre_reconstruction", "placement.quant_attn_matmul": False},
    "pams": {"skt.feature": "pre_reconstruction", "placement.quant_attn_matmul": False},
}


@pytest.mark.parametrize("method", list(SINGLE_VALUE_KEYS))
def test_an_older_checkpoint_with_single_value_keys_and_method_target_still_loads(method, tmp_path):
    """Runs saved before the single-value keys were removed and before ``method.target`` became ``_target_``
    hold them in their hyper-parameters: each is now an unknown key, and ``load_trained`` drops / renames them and
    builds the same net."""
    import torch

    from odm_sr.trained import load_trained

    cfg = compose_config(["model=edsr_small", "model.kwargs.n_resblocks=1", "model.kwargs.n_feats=8",
                          "model.scale=2", f"method={method}", "bits=w2a2"], tmp_path)
    torch.manual_seed(0)
    net, _, _ = build_network(cfg)
    old = OmegaConf.to_container(cfg, resolve=True)
    for dotted, value in SINGLE_VALUE_KEYS[method].items():
        *parents, key = dotted.split(".")
        node = old["method"]
        for parent in parents:
            node = node[parent]
        node[key] = value
        alone = OmegaConf.to_container(cfg.method, resolve=True)
        alone_node = alone
        for parent in parents:
            alone_node = alone_node[parent]
        alone_node[key] = value
        with pytest.raises(ValueError, match=f"unknown method config key '{re.escape(dotted)}'; known: "):
            method_config(method, alone)
    with pytest.raises(ValueError, match="unknown method config key 'target'; known: "):
        method_config(method, {**OmegaConf.to_container(cfg.method, resolve=True), "target": cfg.method._target_})
    old["method"]["target"] = old["method"].pop("_target_")
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": old}}, tmp_path / "old.ckpt")
    loaded, _, loaded_cfg = load_trained(tmp_path / "old.ckpt")
    stored = OmegaConf.to_container(loaded_cfg.method, resolve=True)
    assert stored == OmegaConf.to_container(cfg.method, resolve=True)  # every old key gone, _target_ back
    tensors = {k: v for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    assert tensors and all(torch.equal(loaded.state_dict()[k], v) for k, v in tensors.items())
