"""Config plumbing: where ``conf/`` is, the ``repo_root`` resolver, composition outside a Hydra run, and
up-front validation."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = Path(os.environ.get("ODM_SR_CONF", REPO_ROOT / "conf"))


def register_resolvers() -> None:
    """``${repo_root:}`` → the repository root (configs build every default path from it);
    ``${unique_dir:<path>}`` → a new folder claimed for this run (``claim_unique_dir``)."""
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))
    if not OmegaConf.has_resolver("unique_dir"):
        # cached: Hydra reads hydra.run.dir more than once, and every read must give the folder claimed first
        OmegaConf.register_new_resolver("unique_dir", claim_unique_dir, use_cache=True)


def claim_unique_dir(path: str) -> str:
    """``path``, or ``path_1``, ``path_2``, ... : the first that did not exist, created here with ``os.mkdir``
    (atomic: of two runs started in the same second, each gets its own folder)."""
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        candidate = base if n == 0 else base.with_name(f"{base.name}_{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return str(candidate)
    raise RuntimeError(f"{path}: 10000 run folders of that name exist already; clean up {base.parent}")


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
    if method.name == "fp" and (method.bits.w, method.bits.a) != (32, 32):
        raise ValueError(f"method=fp with bits=w{method.bits.w}a{method.bits.a}: full-precision training "
                         f"quantizes nothing, so the run would be mislabelled; use bits=fp32, or a QAT method "
                         f"(method=odm|pams|daq|ddtb|...) for w{method.bits.w}a{method.bits.a}")
    validate_trainer(cfg.trainer)
    reject_unknown_keys(cfg)


def validate_trainer(trainer: DictConfig) -> None:
    """``max_steps`` and ``val_check_interval`` values that would train forever, write results for an untrained
    network, or crash inside Lightning."""
    max_steps, max_epochs = int(trainer.get("max_steps", -1)), int(trainer.get("max_epochs", -1) or -1)
    if max_steps == 0 or max_steps < -1 or (max_steps == -1 and max_epochs <= 0):
        raise ValueError(f"trainer.max_steps={max_steps}: expected a positive number of optimizer steps "
                         f"(-1, unbounded, only together with a positive trainer.max_epochs)")
    interval = trainer.get("val_check_interval")
    if interval is not None and not float(interval) > 0:
        raise ValueError(f"trainer.val_check_interval={interval}: expected a positive number of steps "
                         f"(or a fraction of an epoch in (0, 1])")


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising the target's own error (a ValueError naming the bad key, a
    FileNotFoundError naming the missing file) instead of Hydra's wrapper around it."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, Exception) and not isinstance(cause, (ImportError, AttributeError)):
            raise cause from None
        raise


# Keys that configs of older runs (checkpoint hyper-parameters) hold and that nothing reads any more: a key with
# a single legal value (the transformer placement) or one no code read.
RETIRED_KEYS = ("method.placement.transformer_same_layers", "optim.name")


def drop_retired_keys(cfg: DictConfig) -> DictConfig:
    """``cfg`` without ``RETIRED_KEYS`` (in place), with the model's ``_target_`` an older config lacks, so that an
    older checkpoint's config still builds."""
    if "_target_" not in cfg.model:
        with open_dict(cfg.model):
            cfg.model._target_ = "odm_sr.builders.backbone"
    for dotted in RETIRED_KEYS:
        parent, _, key = dotted.rpartition(".")
        node = OmegaConf.select(cfg, parent)
        if isinstance(node, DictConfig) and key in node:
            with open_dict(node):
                del node[key]
    return cfg


# Groups read key by key by odm_sr (not instantiated, where the constructor would reject a typo). Their keys are
# those of the group's YAML files; train.yaml / eval.yaml hold the `eval` section.
CHECKED_GROUPS = ("model", "data", "optim", "bits", "paths", "eval")


def known_keys(group: str) -> set[str]:
    """Every key that some ``conf/<group>/*.yaml`` (for ``eval``: ``conf/{train,eval}.yaml``) defines."""
    if group == "eval":
        return {k for name in ("train", "eval") for k in OmegaConf.load(CONFIG_DIR / f"{name}.yaml").eval}
    return {k for path in (CONFIG_DIR / group).glob("*.yaml") for k in OmegaConf.load(path) if k != "defaults"}


def reject_unknown_keys(cfg: DictConfig) -> None:
    """A key no YAML of its group defines is a typo (``+data.batchsize=1``) that nothing would read."""
    for group in CHECKED_GROUPS:
        node = cfg.get(group)
        if node is None:
            continue
        unknown = sorted(set(node) - known_keys(group))
        if unknown:
            raise ValueError(f"unknown config key(s) {[f'{group}.{k}' for k in unknown]}: nothing reads them; "
                             f"known keys of {group}: {sorted(known_keys(group))}")


register_resolvers()
