"""Follow the config through one training run: which files of ``odm_sr`` receive it, and how often it climbs back
up the layers (issue "Build once", its last measure).

How it counts. The run is ``train(cfg)`` of a composed experiment (default ``main_odm`` for 2 steps, its test on
Set5 included), under ``sys.setprofile``. A call *carries the config* when one of its arguments is an OmegaConf
node or a plain container that ``OmegaConf.to_container`` returned during the run (or a dict/list inside one). For
each such call into a function of ``src/odm_sr`` the script records the callee's module and the module of the
nearest ``odm_sr`` frame below it (its caller). It prints
- the files visited: the distinct modules that received the config;
- the climbs back up: calls from a module to one in a higher layer (``tests/test_imports.py``'s ``LAYERS``, lowest
  first), e.g. config -> quant in the code before the issue. A ``_target_`` that ``config.instantiate`` builds
  counts as called by the module that called ``instantiate`` (Hydra's instantiation is the one door down);
- the conversions: how many times ``OmegaConf.to_container`` ran.
The path the config takes (caller -> callee, first occurrence of each edge) is printed in call order.

    python bench/cfg_trace.py [--experiment main_odm] [override ...]

The figures before the issue: ``PYTHONPATH=<checkout of 842ce58>/src python bench/cfg_trace.py`` (this script,
that code). Needs the shared data (the mini EDSR experiments train on it); the main_odm experiment needs the main_fp
checkpoint (``make train`` writes it) unless ``model.pretrained`` is overridden; by default the script trains
``main_fp`` for 2 steps first and starts from that.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

from _common import REPO_ROOT, compose_cfg  # noqa: F401 - puts src/ on sys.path where odm_sr is not installed
from omegaconf import DictConfig, ListConfig, OmegaConf

FEW_STEPS = ["trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.model_checkpoint.every_n_train_steps=2",
             "data.batch_size=2", "data.lr_patch=16", "trainer.enable_progress_bar=false", "logger=csv",
             "skip_done=false", "auto_resume=false"]
SRC = str(Path(importlib.util.find_spec("odm_sr").origin).parent)  # the odm_sr that runs (PYTHONPATH may pick it)
# Modules of the code before issue "Build once" (run it with PYTHONPATH=<old checkout>/src) -> today's equivalent
OLD_NAMES = {"odm_sr.checkpoint": "odm_sr.trained", "odm_sr.trainer_checkpoint": "odm_sr.resume",
             "odm_sr.complexity_cli": "odm_sr.cli", "odm_sr.export_cli": "odm_sr.cli",
             "odm_sr.report_cli": "odm_sr.cli"}


def layers():
    spec = importlib.util.spec_from_file_location("test_imports", REPO_ROOT / "tests" / "test_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda name: module.layer(OLD_NAMES.get(name, name))


def module_of(filename: str) -> str | None:
    if not filename.startswith(SRC):
        return None
    parts = list(Path(filename).relative_to(Path(SRC).parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class Tracer:
    def __init__(self) -> None:
        self.tracked: set[int] = set()
        self.alive: list = []  # the tracked containers, kept alive so that no other object takes their id
        self.conversions = 0
        self.edges: list[tuple[str, str]] = []

    def track(self, value) -> None:
        if isinstance(value, (dict, list)):
            self.tracked.add(id(value))
            self.alive.append(value)
            for item in value.values() if isinstance(value, dict) else value:
                self.track(item)

    def carries(self, value) -> bool:
        return isinstance(value, (DictConfig, ListConfig)) or id(value) in self.tracked

    def __call__(self, frame, event, arg) -> None:
        if event != "call":
            return
        callee = module_of(frame.f_code.co_filename)
        if callee is None:
            return
        code = frame.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        if not any(self.carries(frame.f_locals.get(name)) for name in names):
            return
        caller, back = None, frame.f_back
        while back is not None and caller is None:
            caller = module_of(back.f_code.co_filename)
            if caller == "odm_sr.config" and back.f_code.co_name == "instantiate":
                caller = None  # a `_target_` built through config.instantiate: the caller is who asked for it
            back = back.f_back
        self.edges.append((caller or "<outside>", callee))


def run(experiment: str, overrides: list[str], out: Path, tracer: Tracer | None):
    from odm_sr.train import train
    cfg = compose_cfg([f"experiment={experiment}", *FEW_STEPS, *overrides], out)
    if tracer is None:
        return train(cfg)
    convert = OmegaConf.to_container

    def counted(*args, **kwargs):
        tracer.conversions += 1
        result = convert(*args, **kwargs)
        tracer.track(result)
        return result

    OmegaConf.to_container = counted
    sys.setprofile(tracer)
    try:
        return train(cfg)
    finally:
        sys.setprofile(None)
        OmegaConf.to_container = convert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="main_odm")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    layer = layers()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = list(args.overrides)
        if args.experiment == "main_odm" and not any(o.startswith("model.pretrained=") for o in overrides):
            run("main_fp", ["test_after_fit=false"], Path(tmp) / "fp", None)
            overrides.append(f"model.pretrained={Path(tmp) / 'fp' / 'checkpoints' / 'last.ckpt'}")
        tracer = Tracer()
        run(args.experiment, overrides, Path(tmp) / "run", tracer)
    seen, order = set(), []
    for edge in tracer.edges:
        if edge not in seen:
            seen.add(edge)
            order.append(edge)
    inside = [(a, b) for a, b in tracer.edges if a != "<outside>"]
    climbs = [(a, b) for a, b in inside if layer(b) > layer(a)]
    files = sorted({b for _, b in tracer.edges})
    print(f"experiment={args.experiment}: {len(tracer.edges)} calls carried the config")
    print(f"files visited: {len(files)}: {', '.join(files)}")
    print(f"climbs back up (calls into a higher layer): {len(climbs)}, distinct edges "
          f"{sorted(set(climbs)) or 'none'}")
    print(f"OmegaConf.to_container calls: {tracer.conversions}")
    print("path (first occurrence of each caller -> callee):")
    for a, b in order:
        print(f"  {a} -> {b}")


if __name__ == "__main__":
    main()
