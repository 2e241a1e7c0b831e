"""Config plumbing: where ``conf/`` is, the ``repo_root`` resolver, composition outside a Hydra run, and
up-front validation."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from .checks import check_choice, check_choices, check_number, check_range

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
    check_choice(cfg.model, "scale", (2, 3, 4), "model.")
    method = build_method(cfg.method, cfg.bits)  # validates the method's own options
    method.check_backbone(SimpleNamespace(name=str(cfg.model.name)))
    for key in ("batch_size", "lr_patch", "iters_per_epoch"):
        check_number(cfg.data, key, "data.", positive=True, integer=True)
    check_number(cfg.optim, "lr", "optim.", positive=True)
    check_number(cfg, "seed", integer=True, hint="seed_everything takes 0 ... 2**32 - 1")
    check_range(cfg, "seed", 0, 2**32 - 1)
    from .analysis.cli import AFTER_FIT

    check_choices({"after_fit": (cfg.get("analyze") or {}).get("after_fit") or []}, "after_fit", AFTER_FIT,
                  "analyze.")
    check_choice({"pad_mode": cfg.get("eval", {}).get("pad_mode", "official")}, "pad_mode", EVAL_PAD_MODES, "eval.")
    if method.name == "fp" and (method.bits.w, method.bits.a) != (32, 32):
        raise ValueError(f"method=fp with bits=w{method.bits.w}a{method.bits.a}: full-precision training "
                         f"quantizes nothing, so the run would be mislabelled; use bits=fp32, or a QAT method "
                         f"(method=odm|pams|daq|ddtb|...) for w{method.bits.w}a{method.bits.a}")
    validate_trainer(cfg.trainer)
    reject_unknown_keys(cfg)


def validate_trainer(trainer: DictConfig) -> None:
    """``max_steps`` and ``val_check_interval`` values that would train forever, write results for an untrained
    network, or crash inside Lightning."""
    steps = {"max_steps": trainer.get("max_steps", -1), "val_check_interval": trainer.get("val_check_interval")}
    if steps["max_steps"] != -1 or int(trainer.get("max_epochs", -1) or -1) <= 0:
        check_number(steps, "max_steps", "trainer.", positive=True,
                     hint="optimizer steps; -1 (unbounded) only together with a positive trainer.max_epochs")
    if steps["val_check_interval"] is not None:
        check_number(steps, "val_check_interval", "trainer.", positive=True,
                     hint="a number of steps, or a fraction of an epoch in (0, 1]")


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
# a single legal value (its value is now fixed; the YAML of its method says so) or one no code read.
RETIRED_KEYS = ("method.placement.transformer_same_layers", "optim.name",
                "method.quantize_bias", "method.init.interp", "method.mr.params", "method.placement.quant_attn_matmul",
                "method.stats_scope", "method.gate_pool", "method.skt.feature", "method.fq.quantize_outputs")
# Keys renamed since: old dotted key -> its new name (in the same node)
RENAMED_KEYS = {"method.target": "_target_"}


def drop_retired_keys(cfg: DictConfig) -> DictConfig:
    """``cfg`` without ``RETIRED_KEYS`` and with ``RENAMED_KEYS`` renamed (in place), with the model's
    ``_target_`` an older config lacks, so that an older checkpoint's config still builds."""
    if "_target_" not in cfg.model:
        with open_dict(cfg.model):
            cfg.model._target_ = "odm_sr.builders.backbone"
    for dotted, new in [*RENAMED_KEYS.items(), *((key, None) for key in RETIRED_KEYS)]:  # None: dropped
        parent, _, key = dotted.rpartition(".")
        node = OmegaConf.select(cfg, parent)
        if isinstance(node, DictConfig) and key in node:
            with open_dict(node):
                value = node.pop(key)
                if new is not None:
                    node[new] = value
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
