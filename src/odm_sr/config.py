"""Config plumbing: where ``conf/`` is, the ``repo_root`` resolver, composition outside a Hydra run, and
up-front validation."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from omegaconf import DictConfig, OmegaConf, open_dict

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = Path(os.environ.get("ODM_SR_CONF", REPO_ROOT / "conf"))


def register_resolvers() -> None:
    """``${repo_root:}`` → the repository root (configs build every default path from it)."""
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))


def compose_config(overrides: list[str], output_dir: Path | str, config_name: str = "train") -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides`` outside a Hydra run (tests, bench scripts), with
    ``paths.output_dir`` (the run folder Hydra would set) = ``output_dir``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def validate_config(cfg: DictConfig) -> None:
    """Fail before any work starts on values no method can use (one clear error each)."""
    from .evaluation import EVAL_PAD_MODES
    from .quant import build_method, make_bits

    make_bits(cfg.bits)
    scale = int(cfg.model.scale)
    if scale not in (2, 3, 4):
        raise ValueError(f"model.scale={scale}: expected 2, 3 or 4")
    method = build_method(cfg.method, cfg.bits)  # validates the method's own options
    method.check_backbone(SimpleNamespace(name=str(cfg.model.name)))
    for key in ("batch_size", "lr_patch", "iters_per_epoch"):
        if int(cfg.data[key]) <= 0:
            raise ValueError(f"data.{key}={cfg.data[key]}: expected a positive integer")
    if float(cfg.optim.lr) <= 0:
        raise ValueError(f"optim.lr={cfg.optim.lr}: expected a positive learning rate")
    after_fit = list((cfg.get("analyze") or {}).get("after_fit") or [])
    from .analysis.cli import AFTER_FIT

    unknown = [name for name in after_fit if name not in AFTER_FIT]
    if unknown:
        raise ValueError(f"analyze.after_fit={after_fit}: {unknown} not in {AFTER_FIT}")
    pad_mode = cfg.get("eval", {}).get("pad_mode", "official")
    if pad_mode not in EVAL_PAD_MODES:
        raise ValueError(f"eval.pad_mode={pad_mode!r}: expected one of {EVAL_PAD_MODES}")


register_resolvers()
