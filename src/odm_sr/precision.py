"""Numerical precision of a run: fp32 throughout (METHODS.md §5.6 trains in fp32).

One switch, ``tf32`` (default false), sets both TF32 paths of an Ampere/Hopper GPU: cuBLAS matmuls
(``torch.backends.cuda.matmul.allow_tf32``, i.e. ``set_float32_matmul_precision``) and cuDNN convolutions
(``torch.backends.cudnn.allow_tf32``, which PyTorch leaves *on* by default). Training, evaluation and upscaling
all call ``set_tf32`` so that they compute alike. ``trainer.precision`` must be 32: the manual optimisation step
(two autograd passes in ODM's cooperative update) has no gradient scaler, so 16-mixed would fail mid-run and
bf16-mixed would silently train in bf16; both are rejected before any work.
"""

from __future__ import annotations

from typing import Any

import torch

FP32_PRECISIONS = ("32", "32-true")


def set_tf32(enabled: bool) -> None:
    """TF32 on (``enabled``) or off for both cuBLAS matmuls and cuDNN convolutions; a no-op on the CPU."""
    enabled = bool(enabled)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def check_precision(precision: Any) -> None:
    """Raise unless ``trainer.precision`` is fp32 (32, "32" or "32-true")."""
    if str(precision) not in FP32_PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r}: expected 32 (or '32-true'). Mixed precision is not "
                         "supported: the manual optimisation step has no gradient scaler (METHODS.md §5.6, §5.7 "
                         "train in fp32); use tf32=true for faster fp32 matmuls on Ampere/Hopper GPUs instead")


def apply_precision(cfg: Any) -> None:
    """Check ``trainer.precision`` (if the config has a trainer) and apply ``tf32`` (default false)."""
    trainer = cfg.get("trainer") or {}
    check_precision(trainer.get("precision", 32))
    set_tf32(bool(cfg.get("tf32", False)))


__all__ = ["FP32_PRECISIONS", "apply_precision", "check_precision", "set_tf32"]
