"""Config plumbing, the lowest layer above ``checks`` (imports nothing else of odm_sr): where ``conf/`` is, the
``repo_root`` / ``unique_dir`` resolvers, composition outside a Hydra run (``compose_config``, a method's
composed defaults ``method_defaults``, ``merge_config``), the ``instantiate`` wrapper, the retired keys of older
run configs and the unknown-key check of the groups read key by key."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

SOURCE_ROOT = Path(__file__).resolve().parents[2]
# a source checkout (editable install) uses its conf/ and is the root of the default paths; an installed wheel
# uses the conf/ packaged inside odm_sr and the current folder as that root
IN_CHECKOUT = (SOURCE_ROOT / "pyproject.toml").is_file() and (SOURCE_ROOT / "conf" / "train.yaml").is_file()
CONFIG_DIR = Path(os.environ.get("ODM_SR_CONF") or (SOURCE_ROOT if IN_CHECKOUT else Path(__file__).parent) / "conf")


def repo_root() -> Path:
    """The source checkout, or (an installed wheel) the current folder: the root of data, logs, checkpoints."""
    return SOURCE_ROOT if IN_CHECKOUT else Path.cwd()


def register_resolvers() -> None:
    """``${repo_root:}`` → ``repo_root()`` (configs build every default path from it);
    ``${unique_dir:<path>}`` → a new folder claimed for this run (``claim_unique_dir``)."""
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(repo_root()))
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
    cfg = _compose(config_name, list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (odm-sr-eval): its search path is conf/
        return compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@functools.cache
def _composed_method(name: str) -> dict:
    return OmegaConf.to_container(_compose("train", [f"method={name}"]).method, resolve=True)  # type: ignore


def method_defaults(name: str) -> dict:
    """``method=<name>`` as a run composes it (its ``defaults`` list merged, its ``${data.*}`` resolved against
    the default data group): the defaults of a method config that was not composed (an older run's stored
    config, a test's few options), for ``merge_config``. A fresh copy per call."""
    return copy.deepcopy(_composed_method(str(name)))


def merge_config(defaults: dict, cfg: Any, extra_keys: tuple[str, ...] = (), _prefix: str = "") -> dict:
    """``defaults`` recursively updated by ``cfg`` (a mapping; nested dicts as in the YAML).

    A key absent from ``defaults`` raises ValueError (a typo must not silently fall back to a default), except
    top-level ``extra_keys``, which pass through unchecked.
    """
    user = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in defaults.items()}
    for key, value in user.items():
        if key not in defaults:
            if not _prefix and key in extra_keys:
                merged[key] = value
                continue
            known = ", ".join(sorted(defaults))
            raise ValueError(f"unknown method config key '{_prefix}{key}'; known: {known}")
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"method config {_prefix}{key} must be a mapping, got {value!r}")
            merged[key] = merge_config(defaults[key], value, _prefix=f"{_prefix}{key}.")
        else:
            merged[key] = value
    return merged


def complete_method(method_cfg: Any) -> dict:
    """A method config (``method.*``) as a plain dict, merged over the defaults of ``method=<its name>``
    (``merge_config``: an unknown key raises ValueError) where ``conf/method/<name>.yaml`` exists: an older run's
    stored config gets the keys added since. ``calibration_batches``: a key of older ODM run configs."""
    name = method_cfg.get("name")
    if not (CONFIG_DIR / "method" / f"{name}.yaml").is_file():
        return OmegaConf.to_container(method_cfg, resolve=True) if isinstance(method_cfg, DictConfig) \
            else dict(method_cfg)
    return merge_config(method_defaults(name), method_cfg, extra_keys=("calibration_batches",))


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
# The model's builder moved from the builders layer into models/ (so that the config never climbs back up to it)
MODEL_TARGET = "odm_sr.models.build.backbone"
MOVED_MODEL_TARGETS = ("odm_sr.builders.backbone",)


def drop_retired_keys(cfg: DictConfig) -> DictConfig:
    """``cfg`` without ``RETIRED_KEYS`` and with ``RENAMED_KEYS`` renamed (in place), with the model's
    ``_target_`` an older config lacks or names at its old place, so that an older checkpoint's config still
    builds."""
    if cfg.model.get("_target_", MOVED_MODEL_TARGETS[0]) in MOVED_MODEL_TARGETS:
        with open_dict(cfg.model):
            cfg.model._target_ = MODEL_TARGET
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


@functools.cache
def known_keys(group: str) -> frozenset[str]:
    """Every key that some ``conf/<group>/*.yaml`` (for ``eval``: ``conf/{train,eval}.yaml``) defines (read once
    per process: the package's own config files)."""
    if group == "eval":
        return frozenset(k for name in ("train", "eval") for k in OmegaConf.load(CONFIG_DIR / f"{name}.yaml").eval)
    return frozenset(k for path in (CONFIG_DIR / group).glob("*.yaml") for k in OmegaConf.load(path)
                     if k != "defaults")


def reject_unknown_keys(cfg: DictConfig) -> None:
    """A key no YAML of its group defines is a typo (``+data.batchsize=1``) that nothing would read; in
    ``method``, a key the composed ``method=<method.name>`` lacks (``+method.quirks.typo=true``)."""
    if cfg.get("method") is not None:
        complete_method(cfg.method)
    for group in CHECKED_GROUPS:
        node = cfg.get(group)
        if node is None:
            continue
        unknown = sorted(set(node) - known_keys(group))
        if unknown:
            raise ValueError(f"unknown config key(s) {[f'{group}.{k}' for k in unknown]}: nothing reads them; "
                             f"known keys of {group}: {sorted(known_keys(group))}")


register_resolvers()
