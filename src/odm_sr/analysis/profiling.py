"""Counting what a training step costs a GPU that a CPU timing hides: aten ops (kernel launches) and host syncs.

``step_profile()`` is a context manager; inside it every aten op that reaches the dispatcher is counted (view ops
apart: they launch no kernel), and so is every *host synchronisation*, i.e. every point where the host must wait
for the device's result:

- ``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` / ``if t:`` on a tensor;
- ``aten.nonzero``, ``aten.masked_select``, ``aten.index`` with a boolean mask, ``aten.unique*``: output sizes that
  depend on the data;
- a copy to the CPU from another device (``aten._to_copy`` / ``aten.copy_``);
- ``Tensor.tolist``, ``Tensor.numpy`` and ``Tensor.cpu`` (on a CPU tensor they dispatch nothing, so they are
  counted at the Python level: on a GPU each is a device-to-host copy).

On the CPU nothing actually waits, but the count is the same one a CUDA run of the same code would stall on,
which is what the tests and ``bench/op_count.py`` use it for (METHODS.md has no say here; GPU readiness).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
             "aten._unique2", "aten.unique_consecutive", "aten.unique_dim")
_PY_SYNCS = ("tolist", "numpy", "cpu")


@dataclass
class StepProfile:
    """What ran inside ``step_profile()``: aten ops by name (views excluded) and host syncs by cause."""

    ops: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())


def _packet(func) -> str:
    return str(func.overloadpacket)  # 'aten.sum' for aten.sum.default / aten.sum.dim_IntList


def _is_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


def _to_host(func, args, kwargs) -> bool:
    packet = _packet(func)
    if packet == "aten._to_copy":
        src, device = args[0], (kwargs or {}).get("device")
        return device is not None and torch.device(device).type == "cpu" and src.device.type != "cpu"
    if packet == "aten.copy_":
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu"
    return False


class _Counter(TorchDispatchMode):
    def __init__(self, profile: StepProfile):
        super().__init__()
        self.profile = profile

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = _packet(func)
        if not func.is_view:
            self.profile.ops[packet] += 1
        if packet in _SYNC_OPS or (packet == "aten.index" and _is_bool_index(args)) or _to_host(func, args, kwargs):
            self.profile.syncs[packet] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def step_profile() -> Iterator[StepProfile]:
    """Count aten ops and host syncs of the code inside (see the module docstring); not re-entrant."""
    profile = StepProfile()
    originals = {name: getattr(torch.Tensor, name) for name in _PY_SYNCS}

    def counting(name: str, original):
        def method(self, *args, **kwargs):
            profile.syncs[f"Tensor.{name}"] += 1
            return original(self, *args, **kwargs)
        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        with _Counter(profile):
            yield profile
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


__all__ = ["StepProfile", "step_profile"]
