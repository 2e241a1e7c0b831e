"""Every config key is read: a leaf key under method / model / data / optim / trainer of any experiment config that
no code reads (a dead key, or one with a single legal value) fails here.

- ``method.*``: the method is built with its options in an access-tracking dict and runs what the trainer runs
  (quantize, calibrate, param_groups, training steps) on a tiny network of every backbone family its YAML has a
  placement key for; every leaf it holds must have been read.
- ``model``, ``data``, ``optim.optimizer``, ``optim.scheduler``, ``trainer``: built with
  ``hydra.utils.instantiate``, so each key must be a named parameter of its ``_target_`` (the keys the
  trainer strips, ``LIT_TRAINER_KEYS``, read by ``train.build_module``); ``optim``'s own keys must be
  interpolated by the optimizer or scheduler node or read by ``SRLitModule`` (``optim_cfg``).
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from helpers import compose_config, composed_experiment
from hydra.utils import get_object
from omegaconf import OmegaConf

import odm_sr.quant.base as quant_base
from odm_sr.builders import build_network
from odm_sr.config import CONFIG_DIR
from odm_sr.lit_module import SRLitModule
from odm_sr.train import LIT_TRAINER_KEYS, build_module

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
GROUPS = ("method", "model", "data", "optim", "trainer")
TINY_MODELS = {  # the same tiny networks as tests/quant/test_all_combinations.py
    "edsr": ["model=edsr_baseline", "+model.kwargs.n_resblocks=2", "+model.kwargs.n_feats=8"],
    "rdn": ["model=rdn", "+model.kwargs.D=2", "+model.kwargs.C=2", "+model.kwargs.G=8", "+model.kwargs.G0=8"],
    "hat": ["model=hat_s", "+model.kwargs.embed_dim=12", "+model.kwargs.depths=[1]", "+model.kwargs.num_heads=[2]",
            "+model.kwargs.window_size=4", "+model.kwargs.img_size=16", "+model.kwargs.compress_ratio=3",
            "+model.kwargs.squeeze_factor=3"],
}


def leaves(node, prefix: str = "") -> set[str]:
    """Dotted paths of the leaves of a container (an empty mapping is a leaf)."""
    if isinstance(node, dict) and node:
        return set().union(*(leaves(v, f"{prefix}{k}.") for k, v in node.items()))
    return {prefix[:-1]}


@functools.cache
def experiment(name: str) -> dict:
    cfg = composed_experiment(name)
    return {group: OmegaConf.to_container(cfg[group], resolve=False) for group in GROUPS}


class TrackedDict(dict):
    """A dict that records the dotted path of every key read (``[]``, ``get``; iteration reads every key), nested
    dicts tracked too."""

    def __init__(self, data: dict, reads: set[str], prefix: str = ""):
        super().__init__({k: TrackedDict(v, reads, f"{prefix}{k}.") if isinstance(v, dict) else v
                          for k, v in data.items()})
        self.reads, self.prefix = reads, prefix

    def __getitem__(self, key):
        self.reads.add(f"{self.prefix}{key}")
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.reads.add(f"{self.prefix}{key}")
        return super().get(key, default)

    def _all(self) -> None:  # iterating over the items reads them all (a copy with dict() goes through here too)
        self.reads.update(f"{self.prefix}{k}" for k in super().keys())

    def __iter__(self):
        self._all()
        return super().__iter__()

    def items(self):
        self._all()
        return super().items()

    def values(self):
        self._all()
        return super().values()


def method_reads(method: str, family: str, monkeypatch, tmp_path) -> set[str]:
    """Dotted method keys read while ``method`` is built and trains two steps on a tiny ``family`` network."""
    reads: set[str] = set()
    options = quant_base.method_options
    monkeypatch.setattr(quant_base, "method_options", lambda *a, **k: TrackedDict(options(*a, **k), reads))
    overrides = [*TINY_MODELS[family], "model.scale=2", f"method={method}", "data.iters_per_epoch=1",
                 "bits=fp32" if method == "fp" else ("bits=w4a4" if method == "odm_fq" else "bits=w2a2")]
    if method in ("odm", "lsq", "odm_fq"):
        overrides.append("method.init.num_batches=2")
    cfg = compose_config(overrides, tmp_path)
    torch.manual_seed(0)
    net, runner, teacher = build_network(cfg)
    lr, hr = torch.rand(2, 3, 8, 8) * net.pixel_range, torch.rand(2, 3, 16, 16) * net.pixel_range
    runner.calibrate(net, [lr, lr], teacher=teacher)
    opt = torch.optim.Adam(runner.param_groups(net, 1e-4))
    net.train()
    for step in range(2):  # DDTB's step 0 is its calibration epoch
        out = runner.training_losses(net, lr, hr, step, teacher=teacher)
        if out is not None:
            runner.backward(out, net, lambda loss: loss.backward())
            opt.step()
            opt.zero_grad(set_to_none=True)
    runner.log_stats(net)
    return reads


def method_families(method_cfg: dict) -> list[str]:
    """The families whose placement key the method's YAML holds (EDSR for a method without placement)."""
    placement = method_cfg.get("placement") or {}
    families = [f for f in ("edsr", "rdn") if f in placement]
    families += ["hat"] * ("hat_quantize_cab" in placement)
    return families or ["edsr"]


def test_tracked_dict_records_nested_reads():
    reads: set[str] = set()
    d = TrackedDict({"a": 1, "b": {"c": 2, "d": 3}}, reads)
    assert d["a"] == 1 and d["b"].get("c") == 2 and reads == {"a", "b", "b.c"}
    assert dict(d["b"].items()) == {"c": 2, "d": 3} and reads == {"a", "b", "b.c", "b.d"}
    assert leaves({"a": 1, "b": {"c": 2, "d": {}}}) == {"a", "b.c", "b.d"}


@pytest.mark.parametrize("method", sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml")))
def test_every_method_key_is_read(method, monkeypatch, tmp_path):
    used = {experiment(e)["method"]["name"]: experiment(e)["method"] for e in EXPERIMENTS}
    cfg = compose_config([f"method={method}"], tmp_path).method
    defined = leaves(used.get(method) or OmegaConf.to_container(cfg, resolve=False)) | leaves(
        OmegaConf.to_container(cfg, resolve=False))
    defined -= {"_target_"}  # read by hydra.utils.instantiate (build_method)
    own = OmegaConf.load(CONFIG_DIR / "method" / f"{method}.yaml")
    for parent in [p for p in own.pop("defaults", []) if p != "_self_"]:  # odm_fq, lsq: odm + their own keys
        inherited = leaves(OmegaConf.to_container(compose_config([f"method={parent}"], tmp_path).method))
        defined -= inherited - leaves(OmegaConf.to_container(own))  # checked with the parent (its own test)
    reads: set[str] = set()
    for family in method_families(OmegaConf.to_container(cfg, resolve=False)):
        if method == "odm_fq" and family != "edsr":
            continue  # ODM-FQ is EDSR only
        reads |= method_reads(method, family, monkeypatch, tmp_path / family)
    assert sorted(defined - reads) == []


def constructor_parameters(target: str) -> set[str]:
    params = inspect.signature(get_object(target)).parameters.values()
    assert not any(p.kind is p.VAR_KEYWORD for p in params), f"{target} takes **kwargs: any key would pass"
    return {p.name for p in params}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_instantiated_key_is_an_argument(name):
    groups = experiment(name)
    for group in ("model", "data"):
        node = groups[group]
        assert set(node) - {"_target_"} <= constructor_parameters(node["_target_"]), group
    trainer = groups["trainer"]
    read_by_build_module = inspect.getsource(build_module)  # SRLitModule's compile_backend argument
    assert all(f'cfg.trainer.get("{key}"' in read_by_build_module for key in LIT_TRAINER_KEYS)
    assert set(trainer) - {"_target_", *LIT_TRAINER_KEYS} <= constructor_parameters(trainer["_target_"])
    optim = groups["optim"]
    interpolated = set()
    for part in ("optimizer", "scheduler"):
        node = optim[part]
        params = inspect.signature(get_object(node["_target_"])).parameters
        assert set(node) - {"_target_", "_partial_"} <= set(params), part
        interpolated |= {v[len("${.."):-1] for v in node.values() if isinstance(v, str) and v.startswith("${..")}
    source = inspect.getsource(SRLitModule)  # what SRLitModule reads of optim itself
    read_by_lit = {key for key in optim if f'cfg["{key}"]' in source or f'optim_cfg.get("{key}"' in source}
    assert read_by_lit >= {"lr", "grad_clip"}
    assert set(optim) - {"optimizer", "scheduler"} <= interpolated | read_by_lit

