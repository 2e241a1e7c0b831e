"""A config read from a file (a checkpoint's ``hyper_parameters.cfg``, the header of an ``.odmq``) is data.

``stored_config`` is the one door through which every reader turns such a config into a ``DictConfig`` that
``hydra.utils.instantiate`` may see. It refuses, naming the file and the key path:

- any value that is not plain data (str, int, float, bool, None, lists and string-keyed mappings of them);
- any ``${...}`` that calls a resolver (``${oc.env:...}``, ``${unique_dir:...}``, ...): odm-sr-train stores its
  config resolved, so a stored config holds at most references to its own keys (``${..lr}``), resolved here;
- any Hydra key (``_target_``, ``_partial_``, ``_args_``, ``_recursive_``, ``_convert_``) whose key path and value
  are not those of a YAML file of the package's own ``conf/`` (the backbone builder at ``model``, a method class of
  ``conf/method/*.yaml`` at ``method``, the optimizer/scheduler classes at ``optim.optimizer``/``optim.scheduler``,
  ...): a ``_target_`` in a nested node or a list, or ``builtins.open`` at ``model``, is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import CONFIG_DIR, drop_retired_keys

HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
# ${model.scale}, ${..lr}: a reference to another key of the same config (no resolver, nothing nested)
_INTERPOLATION = re.compile(r"\$\{")
_KEY_REFERENCE = re.compile(r"\$\{\.*[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*\}")
_PLAIN = (str, int, float, bool, type(None))


class StoredConfigError(ValueError):
    """A stored config that is not plain data of odm-sr's own classes (the message names the file and key)."""


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(key path, key, value) of every entry of nested dicts and lists (list keys are indices)."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        dotted = f"{path}.{key}" if path else str(key)
        yield dotted, key, value
        if isinstance(value, (dict, list, tuple)):
            yield from _walk(value, dotted)


@lru_cache(maxsize=1)
def package_hydra_keys() -> dict[tuple[str, str], tuple]:
    """{(node path, Hydra key): the values the package's ``conf/`` YAML files give it there}, e.g.
    ``("method", "_target_"): ("odm_sr.quant.odm.ODM", ...)``. A file's node path is its group folder
    (``conf/optim/adam.yaml`` → ``optim``) unless its ``# @package`` line says otherwise."""
    allowed: dict[tuple[str, str], set] = {}
    for file in sorted(CONFIG_DIR.rglob("*.yaml")):
        text = file.read_text()
        if not any(key in text for key in HYDRA_KEYS):
            continue
        package = re.search(r"^# @package (\S+)", text, re.MULTILINE)
        prefix = package.group(1) if package else ".".join(file.relative_to(CONFIG_DIR).parent.parts)
        prefix = "" if prefix == "_global_" else prefix
        content = OmegaConf.to_container(OmegaConf.load(file), resolve=False)
        for path, key, value in _walk(content or {}, prefix):
            if key in HYDRA_KEYS:
                allowed.setdefault((path.rpartition(".")[0], key), set()).add(value)
    return {k: tuple(sorted(v, key=str)) for k, v in allowed.items()}


def _check_data(raw: dict, source: str) -> None:
    for path, key, value in _walk(raw):
        if not isinstance(key, (str, int)) or not isinstance(value, (*_PLAIN, dict, list, tuple)):
            raise StoredConfigError(f"{source}: stored config key {path!r} holds a {type(value).__name__}; a "
                                    f"stored config holds plain values only")
        if isinstance(value, str) and _INTERPOLATION.search(_KEY_REFERENCE.sub("", value)):
            raise StoredConfigError(f"{source}: stored config key {path!r} = {value!r} calls a resolver; a stored "
                                    f"config is data (odm-sr-train stores it resolved), refused")


def _check_hydra_keys(cfg: dict, source: str) -> None:
    allowed = package_hydra_keys()
    for path, key, value in _walk(cfg):
        if key in HYDRA_KEYS and value not in allowed.get((path.rpartition(".")[0], key), ()):
            there = allowed.get((path.rpartition(".")[0], key))
            raise StoredConfigError(
                f"{source}: stored config key {path!r} = {value!r} is not one of odm-sr's own classes/settings at "
                f"that key ({'allowed: ' + ', '.join(map(str, there)) if there else 'none is allowed there'}); "
                f"a config read from a file is data, nothing is built from it")


def stored_config(raw: Any, source: str | Path) -> DictConfig:
    """The checked ``DictConfig`` of a config read from ``source`` (see the module docstring), older keys renamed
    or dropped (``config.drop_retired_keys``) and references to its own keys resolved."""
    source = str(source)
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise StoredConfigError(f"{source}: the stored config is not an odm-sr training config (expected a "
                                f"mapping with a 'model' node, got {type(raw).__name__})")
    _check_data(raw, source)
    try:
        cfg = OmegaConf.to_container(drop_retired_keys(OmegaConf.create(raw)), resolve=True)
    except OmegaConfBaseException as err:
        raise StoredConfigError(f"{source}: the stored config does not resolve: {err}".splitlines()[0]) from None
    _check_hydra_keys(cfg, source)
    return OmegaConf.create(cfg)
