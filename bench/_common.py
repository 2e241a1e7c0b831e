"""Shared pieces of the benchmark scripts: config composition, building a method's network from the real
configs, sample batches, and one training step timed the way ``SRLitModule.training_step`` runs it.

Nothing here is imported by the package; the scripts put ``src/`` on ``sys.path`` themselves when odm_sr is
not installed.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
if importlib.util.find_spec("odm_sr") is None:  # not installed and not on PYTHONPATH: use this checkout
    sys.path.insert(0, str(REPO_ROOT / "src"))

import hydra  # noqa: E402
import torch  # noqa: E402

from odm_sr.config import compose_config as compose_cfg  # noqa: E402 - mini_repro imports it from here too

# The two model sizes of the step-time benchmark (brief: EDSR-baseline x4 at batch 4 / LR patch 48; the CPU
# model, EDSR 4 blocks x 32 features, at batch 8 / LR patch 24).
MODELS: dict[str, dict[str, Any]] = {
    "small": {"overrides": ["model=edsr_small"], "batch": 8, "lr_patch": 24},
    "baseline": {"overrides": ["model=edsr_baseline"], "batch": 4, "lr_patch": 48},
}
# Methods at 2 bits with their own losses; ``quant_only`` is ODM without teacher or extra loss (mr.mode=off).
VARIANTS: dict[str, list[str]] = {
    "fp": ["method=fp", "bits=fp32"],
    "pams": ["method=pams", "bits=w2a2"],
    "daq": ["method=daq", "bits=w2a2"],
    "ddtb": ["method=ddtb", "bits=w2a2"],
    "odm": ["method=odm", "bits=w2a2"],
    "lsq": ["method=lsq", "bits=w2a2"],  # ODM with the LSQ weight quantizer (Table S7)
    "quant_only": ["method=odm", "bits=w2a2", "method.mr.mode=off"],
    "teacher": ["method=pams", "bits=w2a2"],  # only PAMS/DDTB's teacher forward up to the SKT feature
}
LATE_STEP = 10**6  # a step index past every stage: PAMS's α tracking epoch, DDTB's calibration and L_reg stages


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_batches(n: int, batch: int, lr_patch: int, scale: int, device: torch.device,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (lr, hr) batches in [0, 255]: aligned random crops of B100 (MATLAB-bicubic LR) when the shared
    data are there, else smooth synthetic images (the step time does not depend on the content)."""
    gen = torch.Generator().manual_seed(seed)
    try:
        from odm_sr.data.patches import PatchDataset
        from odm_sr.data.registry import build_source

        source = build_source("B100", "test", scale, preload=True)
        torch.manual_seed(seed)
        ds = PatchDataset(source, scale, lr_patch, iters_per_epoch=n, batch_size=batch)
        idx = torch.randint(0, len(source), (n * batch,), generator=gen).tolist()
        items = [ds[i] for i in idx]
        lrs = torch.stack([it["lr"] for it in items]).reshape(n, batch, 3, lr_patch, lr_patch)
        hrs = torch.stack([it["hr"] for it in items]).reshape(n, batch, 3, lr_patch * scale, lr_patch * scale)
    except (FileNotFoundError, OSError, ValueError):
        hr_side = lr_patch * scale
        coarse = torch.rand(n * batch, 3, hr_side // 8, hr_side // 8, generator=gen)
        hr = torch.nn.functional.interpolate(coarse, size=(hr_side, hr_side), mode="bicubic").clamp(0, 1)
        lr = torch.nn.functional.avg_pool2d(hr, scale)
        lrs, hrs = lr.reshape(n, batch, 3, lr_patch, lr_patch), hr.reshape(n, batch, 3, hr_side, hr_side)
    return [(lrs[i].to(device) * 255.0, hrs[i].to(device) * 255.0) for i in range(n)]


@dataclass
class StepRunner:
    """A method's network, teacher and optimizer; ``step`` is one ``SRLitModule.training_step`` without
    Lightning: training_losses → (finite check) → method.backward → Adam step → zero_grad."""

    name: str
    net: torch.nn.Module
    method: Any
    teacher: torch.nn.Module | None
    opt: torch.optim.Optimizer
    device: torch.device
    times: dict[str, list[float]] = field(default_factory=lambda: {"forward": [], "backward": [],
                                                                   "optimizer": [], "total": []})

    @classmethod
    def build(cls, name: str, model: str, device: torch.device, extra: list[str] | None = None) -> StepRunner:
        overrides = MODELS[model]["overrides"] + VARIANTS[name] + list(extra or [])
        return cls.from_config(name, compose_cfg(overrides, RESULTS_DIR / "_scratch"), device)

    @classmethod
    def from_config(cls, name: str, cfg: Any, device: torch.device) -> StepRunner:
        """The network, method, teacher and optimizer of a composed training config (``build_network``)."""
        from odm_sr.builders import build_network

        net, method, teacher = build_network(cfg)
        net.to(device).train()
        if teacher is not None:
            teacher.to(device)
        opt = hydra.utils.instantiate(cfg.optim.optimizer)(method.param_groups(net, float(cfg.optim.lr)))
        return cls(name, net, method, teacher, opt, device)

    def prepare(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Calibration (ODM's percentile init), then one step at step 0 per batch: PAMS's α tracking, DDTB's
        calibration epoch (recording only). Timed steps then run at ``LATE_STEP``: α clips, gates are used."""
        self.method.calibrate(self.net, [lr for lr, _ in batches], teacher=self.teacher)
        for lr, hr in batches:
            self.step(lr, hr, step=0, record=False)

    def step(self, lr: torch.Tensor, hr: torch.Tensor, step: int = LATE_STEP, record: bool = True) -> None:
        dev = self.device
        sync(dev)
        t0 = time.perf_counter()
        out = self.method.training_losses(self.net, lr, hr, step, teacher=self.teacher)
        if out is None:  # DDTB calibration step: no optimizer step
            return
        if not torch.isfinite(out.loss.detach()):
            raise RuntimeError(f"{self.name}: non-finite loss")
        sync(dev)
        t1 = time.perf_counter()
        self.method.backward(out, self.net, lambda loss: loss.backward())
        sync(dev)
        t2 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(dev)
        t3 = time.perf_counter()
        if record:
            for key, value in zip(("forward", "backward", "optimizer", "total"),
                                  (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                self.times[key].append(value)


class TeacherRunner(StepRunner):
    """Times only the frozen FP teacher's forward up to the SKT feature (``skt.teacher_feature``), the part
    of a PAMS/DDTB step that no quantizer work can remove."""

    def prepare(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        pass

    def step(self, lr: torch.Tensor, hr: torch.Tensor, step: int = LATE_STEP, record: bool = True) -> None:
        from odm_sr.quant.skt import teacher_feature

        sync(self.device)
        t0 = time.perf_counter()
        teacher_feature(self.teacher, lr)
        sync(self.device)
        if record:
            elapsed = time.perf_counter() - t0
            for key in self.times:
                self.times[key].append(elapsed if key in ("forward", "total") else 0.0)


def median_ms(values: list[float]) -> float:
    return 1000.0 * statistics.median(values) if values else float("nan")


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor() or platform.platform()}
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        info["cpu"] = f"{names[0]} x{len(names)}" if names else None
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
