"""Training: ``train(cfg)`` trains (or resumes) a composed config, tests it and prints the PSNR/SSIM table; a plain
function that tests call with a composed config and ``odm-sr-train`` (``odm_sr.cli.train``) calls. It
checks the config's plain values (``check_values``), then builds every object once, top-down: method (with its
bits), network, data, callbacks, loggers, trainer; checks that need a built object run on that object.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from .analysis import summarize
from .builders import (
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_network,
    pretrained_network,
    selected_checkpoint,
)
from .checks import check_choice, check_choices, check_number, check_range
from .config import drop_retired_keys, register_resolvers, reject_unknown_keys
from .evaluation import (
    EVAL_PAD_MODES,
    bicubic_upscale,
    eval_gray_mode,
    eval_upscale,
    evaluate_sets,
    metrics_table,
    rows_as_json,
    warn_if_tiled_dynamic,
)
from .files import write_json
from .lit_module import SRLitModule
from .precision import apply_precision
from .quant import QuantMethod, build_method
from .resume import AtomicCheckpointIO, CurrentOptimSettingsOnResume, check_resume_checkpoint
from .run_guard import SigtermStop, check_same_result_config, check_same_run, run_folder_lock

register_resolvers()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume) and test; returns the results dict also written to ``<output_dir>/results.json``."""
    check_values(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)  # the run's one conversion: every object gets plain values
    method = check_method(build_method(plain["method"], plain["bits"]))  # once; it checks its options as built
    apply_precision(cfg)  # fp32 only, TF32 per ``tf32``
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("skip_done", False) and (out_dir / "results.json").is_file():
        done = json.loads((out_dir / "results.json").read_text())
        check_same_result_config(current_keys(done.get("config", {})), plain, out_dir)
        print(f"skipping {out_dir}: results.json exists with the same config (skip_done=true)")
        return done
    # one writer per run folder; SIGTERM exits 143 naming the last checkpoint (not 0 with no results.json)
    with run_folder_lock(out_dir), SigtermStop(out_dir / "checkpoints" / "last.ckpt") as sigterm:
        return _train(cfg, out_dir, sigterm, method, plain)


def current_keys(stored: dict) -> dict:
    """The config of an earlier run's results.json with retired keys dropped and moved ``_target_`` values renamed
    (``config.drop_retired_keys``), so that ``skip_done`` compares it with today's spelling."""
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        return stored
    return OmegaConf.to_container(drop_retired_keys(OmegaConf.create(stored)))


def _train(cfg: DictConfig, out_dir: Path, sigterm: SigtermStop, method: QuantMethod,
           plain: dict[str, Any]) -> dict[str, Any]:
    """``train`` inside the run folder's lock with the method built once and the config's plain values,
    ``sigterm`` checked after the fit and after the test."""
    resume = resume_path(cfg, out_dir)
    warn_random_start(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    lit, datamodule = build_module(cfg, method, plain)
    net = lit.net
    if resume is not None:
        check_same_run(current_keys(check_resume_checkpoint(resume, lit)), plain, resume)
    out_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [*build_callbacks(cfg), CurrentOptimSettingsOnResume()]
    trainer: L.Trainer = hydra.utils.instantiate(lightning_trainer_config(plain["trainer"]),
                                                 logger=build_loggers(cfg) or False, callbacks=callbacks,
                                                 plugins=[AtomicCheckpointIO()],
                                                 **trainer_overrides(cfg.trainer, method))
    trainer.fit(lit, datamodule=datamodule, ckpt_path=resume)
    sigterm.check()  # a SIGTERM during the last step, which Lightning finishes
    train_seconds = lit.train_seconds  # S12: training incl. calibration, the whole run (resumes included)
    complexity = summarize(net, method.name, method.bits, lr_hw=(64, 64))
    for logger in trainer.loggers:
        logger.log_metrics({**complexity, "time/train_seconds": train_seconds}, step=lit.global_step_count)
    results: dict[str, Any] = {"run_name": cfg.run_name, "config": plain,
                               "train_seconds": train_seconds, "validation_seconds": lit.validation_seconds,
                               "device": device_name(), "steps": lit.global_step_count,
                               "mr_balance": {"rho_mean": lit.balance_mean, "steps": lit.balance_steps},
                               "complexity": complexity, "metrics": {}}
    if cfg.get("test_after_fit", True):
        results["test_checkpoint"] = selected = selected_checkpoint(trainer)  # eval.select_best_on: best.ckpt
        results["metrics"] = test_rows(cfg, trainer, lit, datamodule, selected["path"])
        sigterm.check()
    if trainer.is_global_zero and cfg.get("analyze") and cfg.analyze.after_fit:
        tested = (results.get("test_checkpoint") or {}).get("path")  # eval.select_best_on: best.ckpt
        results["analysis"] = analyses_after_fit(out_dir, list(cfg.analyze.after_fit), str(cfg.analyze.data),
                                                 str(cfg.paths.data_root), tested)
    if trainer.is_global_zero:
        # atomic: an interrupted write must not leave a results.json that skip_done would take for a finished run
        write_json(out_dir / "results.json", results)
    finish_loggers(trainer)
    return results


def test_rows(cfg: DictConfig, trainer: L.Trainer, lit: SRLitModule, datamodule, ckpt_path: str | None) -> dict:
    """The test table as results.json holds it: the run's own row (``ckpt_path``: the selected weights) and, on
    rank 0, the bicubic and FP (``model.pretrained``) reference rows; printed on rank 0."""
    own = test_metrics(trainer, lit, datamodule, list(cfg.data.test), ckpt_path)  # every rank (a collective)
    rows = {}
    if trainer.is_global_zero:  # the reference rows once, not on every DDP rank
        gray = eval_gray_mode(lit.net, cfg.eval.get("gray_mode", "official"))  # the reference rows as the run's
        if cfg.eval.get("bicubic_row", True):
            rows["bicubic"] = evaluate_sets(bicubic_upscale(int(cfg.model.scale)), datamodule, gray)
        if cfg.eval.get("pretrained_row", False) and cfg.model.get("pretrained"):
            fp_net = pretrained_network(cfg.model).eval()
            rows["FP (model.pretrained)"] = evaluate_sets(eval_upscale(fp_net, cfg.eval), datamodule, gray)
    rows[cfg.run_name] = own
    if trainer.is_global_zero:
        print("\n" + metrics_table(rows, list(cfg.data.test)) + "\n")
    return rows_as_json(rows)


def analyses_after_fit(out_dir: Path, names: list[str], data: str, data_root: str,
                       ckpt: str | Path | None = None) -> dict[str, Any]:
    """Run ``odm-sr-analyze <name> --ckpt <ckpt> --data <data>`` for each name (its table printed, its JSON in
    ``<run>/analysis/``) and return the headline numbers of each for results.json. ``ckpt``: the weights the test
    rows come from (``eval.select_best_on``'s best.ckpt), else ``<run>/checkpoints/last.ckpt``."""
    from .cli.analyze import analysis_summary
    from .cli.analyze import main as analyze

    ckpt = Path(ckpt) if ckpt else out_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: analyze.after_fit needs the run's last checkpoint (callbacks."
                                f"model_checkpoint.save_last)")
    summary = {}
    for name in names:
        analyze([name, "--ckpt", str(ckpt), "--data", data, "--data-root", data_root])
        summary[name] = analysis_summary(name, out_dir / "analysis" / f"{name}.json")
    return summary


def check_values(cfg: DictConfig) -> None:
    """Before any object is built: the plain values of ``cfg`` that nothing's constructor checks (one clear error
    each); the method checks its own options as it is built, and the backbone it gets."""
    check_choice(cfg.model, "scale", (2, 3, 4), "model.")
    for key in ("batch_size", "lr_patch", "iters_per_epoch"):
        check_number(cfg.data, key, "data.", positive=True, integer=True)
    check_number(cfg.optim, "lr", "optim.", positive=True)
    check_number(cfg, "seed", integer=True, hint="seed_everything takes 0 ... 2**32 - 1")
    check_range(cfg, "seed", 0, 2**32 - 1)
    from .cli.analyze import AFTER_FIT

    check_choices({"after_fit": (cfg.get("analyze") or {}).get("after_fit") or []}, "after_fit", AFTER_FIT,
                  "analyze.")
    check_choice({"pad_mode": cfg.get("eval", {}).get("pad_mode", "official")}, "pad_mode", EVAL_PAD_MODES, "eval.")
    check_trainer(cfg.trainer)
    reject_unknown_keys(cfg)


def check_method(method: QuantMethod) -> QuantMethod:
    """The built method: ``method=fp`` with quantized bits would be a mislabelled run."""
    if method.name == "fp" and (method.bits.w, method.bits.a) != (32, 32):
        raise ValueError(f"method=fp with bits=w{method.bits.w}a{method.bits.a}: full-precision training "
                         f"quantizes nothing, so the run would be mislabelled; use bits=fp32, or a QAT method "
                         f"(method=odm|pams|daq|ddtb|...) for w{method.bits.w}a{method.bits.a}")
    return method


def check_trainer(trainer: DictConfig) -> None:
    """``max_steps`` and ``val_check_interval`` values that would train forever, write results for an untrained
    network, or crash inside Lightning."""
    steps = {"max_steps": trainer.get("max_steps", -1), "val_check_interval": trainer.get("val_check_interval")}
    if steps["max_steps"] != -1 or int(trainer.get("max_epochs", -1) or -1) <= 0:
        check_number(steps, "max_steps", "trainer.", positive=True,
                     hint="optimizer steps; -1 (unbounded) only together with a positive trainer.max_epochs")
    if steps["val_check_interval"] is not None:
        check_number(steps, "val_check_interval", "trainer.", positive=True,
                     hint="a number of steps, or a fraction of an epoch in (0, 1]")


def build_module(cfg: DictConfig, method: QuantMethod | None = None,
                 plain: dict | None = None) -> tuple[SRLitModule, Any]:
    """The LightningModule (network quantized by ``method``, built from ``cfg`` when None) and the data module of
    ``cfg``; every val/test image is opened here, so that a broken one fails now and not after hours of training.
    ``plain``: ``cfg`` as plain values (resolved), converted here when None."""
    plain = OmegaConf.to_container(cfg, resolve=True) if plain is None else plain
    net, method, teacher = build_network(cfg, method)
    datamodule = build_datamodule(cfg)
    datamodule.check_eval_sets()
    warn_if_tiled_dynamic(method, cfg.eval.get("tile"), "eval.tile")
    lit = SRLitModule(net, method, plain["optim"], teacher=teacher, eval_cfg=plain["eval"],
                      calibration_batches=method.calibration_batches, hparams={"cfg": plain},
                      compile_backend=str(cfg.trainer.get("compile_backend", "inductor"))
                      if cfg.trainer.get("compile", False) else None)
    return lit, datamodule


def resume_path(cfg: DictConfig, out_dir: Path) -> str | None:
    """The checkpoint to continue from: ``resume``, else (``auto_resume=true``) the folder's own ``last.ckpt``.
    A fresh run (neither) refuses a folder that holds another run's checkpoint or results, which it would
    otherwise mix with its own (an old ``last.ckpt`` beside a new ``results.json``)."""
    resume = cfg.get("resume")
    last = out_dir / "checkpoints" / "last.ckpt"
    if resume is None and cfg.get("auto_resume", False) and last.is_file():
        print(f"resuming the interrupted run from {last} (auto_resume=true)")
        return str(last)
    if resume is None and not cfg.get("auto_resume", False):
        found = sorted(str(p.relative_to(out_dir)) for p in [*out_dir.glob("checkpoints/*.ckpt"),
                                                              *out_dir.glob("results.json")])
        if found:
            raise FileExistsError(
                f"run folder {out_dir} already holds another run ({', '.join(found[:3])}); a fresh run would mix "
                f"its files with that one. Continue it with resume={last} (or auto_resume=true), or start "
                f"elsewhere (hydra.run.dir=<new folder>; the default timestamped folders are always new).")
    return resume


LIT_TRAINER_KEYS = ("compile", "compile_backend")  # trainer.* keys read by SRLitModule, not by L.Trainer


def lightning_trainer_config(trainer_cfg: DictConfig | dict) -> dict[str, Any]:
    """``trainer.*`` (resolved) less the keys that are the LightningModule's (``LIT_TRAINER_KEYS``)."""
    resolved = OmegaConf.to_container(trainer_cfg, resolve=True) if isinstance(trainer_cfg, DictConfig) \
        else trainer_cfg
    return {k: v for k, v in resolved.items() if k not in LIT_TRAINER_KEYS}


def trainer_overrides(trainer_cfg: Any, method: Any) -> dict[str, Any]:
    """Trainer arguments derived from ``trainer.*`` and the method: ``benchmark`` (cuDNN autotuning, i.e.
    ``torch.backends.cudnn.benchmark``, which Lightning sets from it) true unless ``trainer.deterministic`` or
    set explicitly; ``strategy`` as ``ddp_strategy`` says."""
    benchmark = trainer_cfg.get("benchmark")
    out = {"benchmark": not trainer_cfg.get("deterministic", False) if benchmark is None else bool(benchmark)}
    if "strategy" in trainer_cfg:
        out["strategy"] = ddp_strategy(trainer_cfg.strategy, method)
    return out


def ddp_strategy(strategy: Any, method: Any) -> Any:
    """``trainer.strategy`` for ``method``: a DDP strategy name (``ddp``, ``ddp_fork``, ...) becomes its
    ``*_find_unused_parameters_true`` variant where the method leaves parameters out of some steps' graphs on
    purpose (``QuantMethod.ddp_unused_parameters``: PAMS's α while it tracks, DDTB's unused gates), which DDP
    otherwise stops on. DDP then leaves the gradients of parameters no rank used at None, as a single process does
    (a ``0 * param`` term would give Adam zero gradients and change its state, hence the numbers). Lightning's
    ``DDPStrategy`` docs: https://lightning.ai/docs/pytorch/stable/api/lightning.pytorch.strategies.DDPStrategy.html
    """
    from lightning.pytorch.strategies import StrategyRegistry

    if not (isinstance(strategy, str) and method.ddp_unused_parameters):
        return strategy
    if strategy.endswith("_find_unused_parameters_false"):
        raise ValueError(f"trainer.strategy={strategy}: method={method.name} leaves parameters out of some steps "
                         f"(e.g. PAMS's alpha while it tracks, DDTB's unused gates), which DDP needs "
                         f"find_unused_parameters for; use trainer.strategy={strategy.removesuffix('_false')}_true")
    found = f"{strategy}_find_unused_parameters_true"
    return found if found in StrategyRegistry else strategy


def warn_random_start(cfg: DictConfig) -> None:
    """Quantization-aware training normally starts from FP weights; say loudly when it does not."""
    if cfg.method.name != "fp" and not cfg.model.get("pretrained"):
        warnings.warn(f"method={cfg.method.name} starts from RANDOM weights: model.pretrained is not set. "
                      f"QAT is meant to start from a trained FP model (model.pretrained=<fp .ckpt/.pt>); "
                      f"ignore this only if a random start is what you want.", UserWarning, stacklevel=2)


def device_name() -> str:
    """The accelerator the run used (S12 reports the GPU), or the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def finish_loggers(trainer: L.Trainer) -> None:
    """Close wandb runs so their offline directories are complete (summary, config) for `wandb sync`."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def test_metrics(trainer: L.Trainer, lit: SRLitModule, datamodule, set_names: list[str],
                 ckpt_path: str | None = None) -> dict:
    """{set: (PSNR, SSIM)} of ``trainer.test``. Under DDP they are merged over all ranks (``SRLitModule._flush``).
    ``lit.last_metrics`` holds them in float64 where this process ran the test; under the fork/spawn launchers
    it did not, and the trainer's callback metrics (float32, copied back from rank 0) are read instead."""
    trainer.test(lit, datamodule=datamodule, verbose=False, ckpt_path=ckpt_path)  # None: the weights in memory
    metrics = lit.last_metrics or trainer.callback_metrics
    missing = [s for s in set_names if f"test/{s}/psnr" not in metrics]
    if missing:
        raise RuntimeError(f"trainer.test logged no metrics for {missing} (got {sorted(metrics)})")
    return {s: (float(metrics[f"test/{s}/psnr"]), float(metrics[f"test/{s}/ssim"])) for s in set_names}
