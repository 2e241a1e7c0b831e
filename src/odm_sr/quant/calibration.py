"""Percentile calibration of static activation ranges (METHODS.md §5.2).

For each quantized layer whose input quantizer has a settable range (a ``set_range(lower, upper)`` method, as
``OdmActQuantizer``), the range becomes

    l_a = (1/K) Σ_k P_{100−j}(X_k),    u_a = (1/K) Σ_k P_j(X_k)

over K batches, each percentile taken over the whole batch tensor X_k (``torch.quantile`` linear
interpolation, ``functional.percentile``); j = 100 means min/max. X_k is the layer's input, recorded by a
forward pre-hook on the layer (so it is the tensor the input quantizer would see).

Sources (``init.source``):
- ``fp``: one forward per batch with every quantizer of every quantized layer off (weights too): the FP model.
- ``sequential``: layers are calibrated one at a time in forward order (the order of their first call in an FP
  pass). For layer i, the layers already calibrated run fully quantized (input and weight), the others run FP,
  and every forward stops at layer i's input. So l_i, u_i see the quantization error of all upstream layers
  with their final ranges. Cost: L passes over the K cached batches (each stopped early).

Under DDP each rank draws its own share of batch k; every percentile is taken over the ranks' shares gathered
(``gather_cat``), so each rank gets exactly the single-process result on the union batches (percentiles are not
linear: a mean of per-rank percentiles would differ). Every rank must run the same number of batches of the same
shape (the training sampler's equal split guarantees it); unequal shapes raise.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .distributed import gather_cat
from .functional import percentile
from .layers import QuantMixin
from .quantizer import Quantizer

SOURCES = ("fp", "sequential")


class StopForward(Exception):
    """Raised by a forward pre-hook to end a forward early, once the module of interest has seen its input
    (calibration of one layer; the SKT teacher's feature)."""


def range_quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantized layers whose ``act_quant`` is calibrated (``Quantizer.calibrates_range``: ``set_range``), by
    name, in module order."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, QuantMixin) and isinstance(m.act_quant, Quantizer) and m.act_quant.calibrates_range}


def batch_range(x: Tensor, j: float) -> Tensor:
    """(P_{100−j}(X), P_j(X)) over the whole tensor, as a float64 pair; j = 100 gives (min, max)."""
    if j >= 100:
        return torch.stack([x.detach().amin(), x.detach().amax()]).double()
    return percentile(x, (100.0 - j, j)).double()


def _as_lr(batch) -> Tensor:
    """An LR tensor from a tensor, an (lr, ...) tuple, or a dict with key ``lr``."""
    if isinstance(batch, dict):
        return batch["lr"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside the block; each module's own flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def quantizers_off(layers: Iterable[nn.Module]) -> Iterator[None]:
    """The given quantized layers run as their float op (act_quant and weight_quant detached temporarily)."""
    saved = [(layer, layer.act_quant, layer.weight_quant) for layer in layers]
    for layer, _, _ in saved:
        layer.act_quant = None
        layer.weight_quant = None
    try:
        yield
    finally:
        for layer, act, weight in saved:
            layer.act_quant = act
            layer.weight_quant = weight


@contextlib.contextmanager
def _recording(layers: dict[str, nn.Module], j: float, sums: dict[str, Tensor],
               stop_at: str | None = None) -> Iterator[None]:
    """Pre-hooks adding each layer's batch range to ``sums``; at ``stop_at`` the forward is aborted."""
    def make_hook(name: str):
        def hook(_module, inputs):
            sums[name][:2] += batch_range(gather_cat(inputs[0]), j).to(sums[name].device)  # DDP: union batch
            sums[name][2] += 1
            if name == stop_at:
                raise StopForward
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _device(model: nn.Module) -> torch.device:
    return next(itertools.chain(model.parameters(), model.buffers()), torch.zeros(())).device


def _forward(model: nn.Module, x: Tensor) -> None:
    try:
        model(x)
    except StopForward:
        pass


def forward_order(model: nn.Module, x: Tensor, layers: dict[str, nn.Module]) -> list[str]:
    """Names of ``layers`` in the order of their first call in an FP forward of ``x``."""
    order: list[str] = []
    handles = [layer.register_forward_pre_hook(lambda *_, n=name: order.append(n) if n not in order else None)
               for name, layer in layers.items()]
    all_quantized = [m for m in model.modules() if isinstance(m, QuantMixin)]
    try:
        with quantizers_off(all_quantized):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return order + [n for n in layers if n not in order]  # layers the forward never reached keep module order


@torch.no_grad()
def calibrate_activation_ranges(model: nn.Module, batches: Iterable, j: float = 99.0, num_batches: int = 100,
                                source: str = "fp", progress: bool = True) -> dict[str, tuple[float, float]]:
    """Set every range quantizer's (l_a, u_a) to the mean over ``num_batches`` batches of (P_{100−j}, P_j)
    of its input (METHODS.md §5.2; module docstring for the sources). Returns {layer name: (l_a, u_a)}.

    ``batches`` yields LR tensors (or (lr, ...) tuples / {'lr': ...} dicts) in the model's pixel range; fewer
    than ``num_batches`` is fine (K is what was seen). The model runs in eval mode under ``no_grad`` and gets
    its train/eval flags back.
    """
    if source not in SOURCES:
        raise ValueError(f"init.source={source!r}: expected one of {SOURCES}")
    if not 50.0 < float(j) <= 100.0:
        raise ValueError(f"init.j={j}: expected 50 < j <= 100")
    layers = range_quantized_layers(model)
    if not layers:
        return {}
    device = _device(model)
    sums = {name: torch.zeros(3, dtype=torch.float64, device=device) for name in layers}  # Σ l, Σ u, count
    stream = (_as_lr(b).to(device) for b in itertools.islice(batches, int(num_batches)))
    disable = None if progress else True  # None: tqdm shows the bar only on a TTY
    with eval_mode(model):
        if source == "fp":
            count = _calibrate_fp(model, stream, layers, j, sums, num_batches, disable)
        else:
            count = _calibrate_sequential(model, list(stream), layers, j, sums, disable)
    if count == 0:
        raise ValueError("calibration got no batches")
    ranges = {}
    for name, layer in layers.items():
        lower, upper, seen = sums[name].tolist()
        if seen == 0:
            warnings.warn(f"calibration: layer {name} never ran; its range is left as it was", stacklevel=2)
            continue
        ranges[name] = (lower / seen, upper / seen)
        layer.act_quant.set_range(*ranges[name])
    return ranges


def _calibrate_fp(model, stream, layers, j, sums, num_batches, disable) -> int:
    all_quantized = [m for m in model.modules() if isinstance(m, QuantMixin)]
    count = 0
    with quantizers_off(all_quantized), _recording(layers, j, sums):
        for x in tqdm(stream, total=int(num_batches), desc="calibrate (fp)", disable=disable, leave=False):
            model(x)
            count += 1
    return count


def _calibrate_sequential(model, cached: list[Tensor], layers, j, sums, disable) -> int:
    if not cached:
        return 0
    order = forward_order(model, cached[0], layers)
    bar = tqdm(total=len(order) * len(cached), desc="calibrate (sequential)", disable=disable, leave=False)
    for i, name in enumerate(order):
        # not yet calibrated: FP; calibrated (and layers without a range quantizer): quantized
        with quantizers_off([layers[n] for n in order[i:]]), _recording({name: layers[name]}, j, sums, name):
            for x in cached:
                _forward(model, x)
                bar.update()
        lower, upper, seen = sums[name].tolist()
        if seen:
            layers[name].act_quant.set_range(lower / seen, upper / seen)
    bar.close()
    return len(cached)
