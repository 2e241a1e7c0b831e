"""`odm-sr-train`: compose a config with Hydra, train, test, print the PSNR/SSIM table.

``train(cfg)`` is a plain function that tests call with a composed config; ``main`` is the thin Hydra entry.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from .config import CONFIG_DIR, register_resolvers, validate_config
from .data import SRDataModule
from .evaluation import bicubic_upscale, evaluate_sets
from .lit_module import SRLitModule, metrics_table
from .models import build_model, load_pretrained
from .quant import build_method
from .quant.base import frozen_copy

register_resolvers()


def build_network(cfg: DictConfig):
    """Backbone (+ FP weights) → teacher copy if the method needs one → quantized network."""
    model_cfg = cfg.model
    kwargs = OmegaConf.to_container(model_cfg.get("kwargs") or {})
    net = build_model(model_cfg.name, int(model_cfg.scale), **kwargs)
    method = build_method(cfg.method, cfg.bits)
    method.check_backbone(net)
    pretrained = model_cfg.get("pretrained")
    if pretrained:
        path = Path(str(pretrained))
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained={path}: no such checkpoint file (train the FP model first, "
                                    f"or point model.pretrained at an official .pt/.pth)")
        load_pretrained(net, path)
    teacher = frozen_copy(net) if method.needs_teacher else None
    if pretrained and not getattr(method, "init_from_fp", True):
        # PAMS as released: only the teacher gets the FP weights, the student starts from scratch
        net = build_model(model_cfg.name, int(model_cfg.scale), **kwargs)
    net = method.quantize(net)
    return net, method, teacher


def build_datamodule(cfg: DictConfig) -> SRDataModule:
    d = cfg.data
    return SRDataModule(train=d.train, val=list(d.val), test=list(d.test), scale=int(cfg.model.scale),
                        lr_patch=int(d.lr_patch), batch_size=int(d.batch_size),
                        iters_per_epoch=int(d.iters_per_epoch), num_workers=int(d.num_workers),
                        data_root=str(d.data_root), seed=int(cfg.seed))


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for _, lg in (cfg.get("logger") or {}).items():
        if isinstance(lg, DictConfig) and "_target_" in lg:
            loggers.append(hydra.utils.instantiate(lg))
    return loggers


def build_callbacks(cfg: DictConfig) -> list:
    return [hydra.utils.instantiate(cb) for _, cb in (cfg.get("callbacks") or {}).items()
            if isinstance(cb, DictConfig) and "_target_" in cb]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume) and test; returns the results dict also written to ``<output_dir>/results.json``."""
    validate_config(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net, method, teacher = build_network(cfg)
    datamodule = build_datamodule(cfg)
    lit = SRLitModule(net, method, OmegaConf.to_container(cfg.optim), teacher=teacher,
                      eval_cfg=OmegaConf.to_container(cfg.eval),
                      calibration_batches=int(getattr(method, "calibration_batches", 0) or 0),
                      hparams={"cfg": OmegaConf.to_container(cfg, resolve=True)})
    lit.set_names = {"val": list(cfg.data.val), "test": list(cfg.data.test)}
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=build_loggers(cfg) or False,
                                                 callbacks=build_callbacks(cfg))
    start = time.perf_counter()
    trainer.fit(lit, datamodule=datamodule, ckpt_path=cfg.get("resume"))
    train_seconds = time.perf_counter() - start
    results: dict[str, Any] = {"run_name": cfg.run_name, "config": OmegaConf.to_container(cfg, resolve=True),
                               "train_seconds": train_seconds, "steps": lit.global_step_count, "metrics": {}}
    if cfg.get("test_after_fit", True):
        rows = {cfg.run_name: test_metrics(trainer, lit, datamodule, list(cfg.data.test))}
        if cfg.eval.get("bicubic_row", True):
            rows = {"bicubic": evaluate_sets(bicubic_upscale(int(cfg.model.scale)), datamodule), **rows}
        results["metrics"] = {row: {s: {"psnr": v[0], "ssim": v[1]} for s, v in per.items()}
                              for row, per in rows.items()}
        print("\n" + metrics_table(rows, list(cfg.data.test)) + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def test_metrics(trainer: L.Trainer, lit: SRLitModule, datamodule, set_names: list[str]) -> dict:
    lit.last_metrics = {}
    trainer.test(lit, datamodule=datamodule, verbose=False)
    return {s: (lit.last_metrics[f"test/{s}/psnr"], lit.last_metrics[f"test/{s}/ssim"]) for s in set_names}


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.set_float32_matmul_precision("high")
    train(cfg)


if __name__ == "__main__":
    main()
