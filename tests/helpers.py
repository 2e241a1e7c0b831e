"""Shared test helpers: compose Hydra configs the way the entry points do."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from odm_sr.config import CONFIG_DIR, register_resolvers

register_resolvers()

# A training run small enough for a test: 1-block, 8-feature EDSR, 16-pixel LR patches, 6 steps.
TINY_TRAIN = [
    "model=edsr_small", "model.kwargs.n_resblocks=1", "model.kwargs.n_feats=8", "model.scale=2",
    "data=sample", "data.lr_patch=16", "data.batch_size=2", "data.iters_per_epoch=3",
    "trainer=cpu", "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "callbacks.model_checkpoint.every_n_train_steps=3", "logger=csv",
]


def compose_config(overrides: list[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides; the run's output dir is ``output_dir``."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg
