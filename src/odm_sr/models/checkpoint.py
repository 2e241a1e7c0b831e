"""Load FP weights (official checkpoints or our own) into a backbone, strictly, with clear errors.

Accepted inputs (a path, or an already loaded object):
- a plain state dict (EDSR-PyTorch `.pt`, DDTB RDN);
- a BasicSR/KAIR wrapper `{'params_ema': sd}` and/or `{'params': sd}` (SwinIR, HAT): `params_ema` wins;
- a Lightning checkpoint `{'state_dict': sd}`: the keys under `net.` are kept, with the prefix removed
  (other sub-modules of the LightningModule, e.g. a teacher, are dropped);
- a uniform `module.` prefix (DataParallel) is removed.

Quantizer keys are ignored on both sides: the model's are those under its `Quantizer` modules, a checkpoint's are
found by module name (see `is_quantizer_key`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from odm_sr.models.base import SRModel

# A module whose name is `quant`/`quantizer`, ends in `_quant`/`_quantizer` or starts with `quant_`.
_QUANTIZER_MODULE = re.compile(r"^(quant|quantizer)$|_(quant|quantizer)$|^quant_")
_WRAPPER_KEYS = ("params_ema", "params", "state_dict")
_LIGHTNING_PREFIX = "net."
_SHOWN = 5


def is_quantizer_key(key: str) -> bool:
    """True when a module on the key's path is a quantizer, e.g. `body.0.body.0.act_quant.lower`,
    `layers.0.conv.weight_quantizer.scale`, `quant.alpha`, `head.0.quant_act1.alpha`.

    Only module names count (not the final tensor name), so official keys never match.
    """
    return any(_QUANTIZER_MODULE.search(part) for part in key.split(".")[:-1])


def quantizer_prefixes(model: nn.Module) -> tuple[str, ...]:
    """``"<name>."`` of every ``Quantizer`` module in ``model``: the model's own quantizer keys start with one."""
    from odm_sr.quant.quantizer import Quantizer  # here: odm_sr.quant imports odm_sr.models

    return tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, Quantizer))


def extract_state_dict(checkpoint: Any, source: str = "<in-memory>") -> dict[str, torch.Tensor]:
    """Unwrap `checkpoint` (see module docstring) into a flat {key: tensor} dict."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{source}: not a checkpoint (got {type(checkpoint).__name__}, expected a dict)")
    for wrapper in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(wrapper), Mapping):
            state = dict(checkpoint[wrapper])
            if wrapper == "state_dict" and any(k.startswith(_LIGHTNING_PREFIX) for k in state):
                state = {k[len(_LIGHTNING_PREFIX):]: v for k, v in state.items()
                         if k.startswith(_LIGHTNING_PREFIX)}
            break
    else:
        state = dict(checkpoint)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    non_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not state or non_tensors:
        detail = f"non-tensor entries {non_tensors[:_SHOWN]}" if non_tensors else "no tensors"
        raise ValueError(f"{source}: not a state dict ({detail}; top-level keys {list(checkpoint)[:_SHOWN]})")
    return state


def load_torch_file(path: str | os.PathLike) -> Any:
    """torch.load(path, map_location='cpu', weights_only=True); a missing or unreadable file names itself."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path}: is a directory, expected a checkpoint file "
                                f"(e.g. {os.path.join(path, 'checkpoints', 'last.ckpt')})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot be read as a torch checkpoint ({load_failure(error)})") from None


def load_failure(error: Exception) -> str:
    """What made ``torch.load(weights_only=True)`` fail, in one line, without torch's advice to retry with
    ``weights_only=False`` (that would run any code the file holds: odm-sr never does)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].split(". ")[0].strip(" .")
        return (f"it holds more than tensors and plain values: {detail}; odm-sr loads files with "
                f"weights_only=True and never runs code from a file")
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {'weights-only load failed' if 'weights_only' in first else first}"


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``load_torch_file``, unwrapped into a flat state dict (``extract_state_dict``)."""
    return extract_state_dict(load_torch_file(path), source=str(path))


def guess_scale(state: Mapping[str, torch.Tensor]) -> int | None:
    """Upscaling factor implied by the tail of an EDSR/RDN/SwinIR/HAT state dict, or None.

    x4 tails have a second upsampling conv (`tail.0.2`, `UPNet.4`, `upsample.2`, PAN's `upconv2`); otherwise the
    first upsampling conv maps C -> r^2 C (SwinIR-light: embed -> 3 r^2; IMDN's `upsampler.0`: nf -> 3 r^2). PAN x2
    and x3 have the same tensors (nearest upsampling by the scale): None for them.
    """
    if any(k in state for k in ("tail.0.2.weight", "UPNet.4.weight", "upsample.2.weight", "upconv2.weight")):
        return 4
    if "tail.0.0.weight" in state:
        out_ch, in_ch = state["tail.0.0.weight"].shape[:2]
    elif "UPNet.0.weight" in state and "UPNet.2.weight" in state:
        out_ch, in_ch = state["UPNet.0.weight"].shape[0], state["UPNet.2.weight"].shape[1]
    elif "upsampler.0.weight" in state:
        out_ch, in_ch = state["upsampler.0.weight"].shape[0], 3
    elif "upsample.0.weight" in state:
        out_ch = state["upsample.0.weight"].shape[0]
        in_ch = 3 if "conv_last.weight" not in state else state["upsample.0.weight"].shape[1]
    else:
        return None
    root = math.isqrt(out_ch // in_ch) if out_ch % in_ch == 0 else 0
    return root if root > 1 and root * root * in_ch == out_ch else None


MODELS_ENV_VAR = "ODM_SR_MODELS"


def default_models_root() -> str | None:
    """Where official FP weights (IMDN, PAN) are found, as ``paths.models_root``: ``$ODM_SR_MODELS`` if set, else
    ``<repo root>/../shared/models`` if that folder exists, else None."""
    env = os.environ.get(MODELS_ENV_VAR)
    if env:
        return os.path.expanduser(env)
    candidate = os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 4, "shared", "models")
    return os.path.normpath(candidate) if os.path.isdir(candidate) else None


_SCALE_IN_NAME = re.compile(r"(?:^|[^a-z0-9]|imdn|pan|edsr|rdn)x([234])(?=[^0-9]|$)", re.IGNORECASE)


def scale_in_filename(source: str) -> int | None:
    """The scale an official file's name states (``IMDN_x3.pth``, ``PANx2_DF2K.pth``, ``edsr_baseline_x4-6b446fab.pt``),
    or None. PAN's x2 and x3 files hold tensors of equal shapes: the name is all that tells them apart."""
    match = _SCALE_IN_NAME.search(os.path.basename(source))
    return int(match.group(1)) if match else None


def mismatch_report(model: nn.Module, target: dict, state: dict) -> list[str]:
    """Missing/unexpected keys and shape mismatches of ``state`` against ``target`` (``model``'s state dict),
    with the scale the checkpoint looks like when it differs from ``model.scale``; empty when they match."""
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    wrong_shape = [k for k in target if k in state  # non-tensor entries (extra state) have no shape
                   and getattr(target[k], "shape", None) != getattr(state[k], "shape", None)]
    lines = []
    if missing:
        lines.append(f"{len(missing)} missing key(s), e.g. {missing[:_SHOWN]}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:_SHOWN]}")
    for key in wrong_shape[:_SHOWN]:
        lines.append(f"shape mismatch for {key}: checkpoint {tuple(state[key].shape)}, "
                     f"model {tuple(target[key].shape)}")
    if len(wrong_shape) > _SHOWN:
        lines.append(f"... {len(wrong_shape) - _SHOWN} more shape mismatch(es)")
    model_scale = model.scale if isinstance(model, SRModel) else None
    checkpoint_scale = guess_scale(state)
    if lines and checkpoint_scale is not None and model_scale is not None and checkpoint_scale != model_scale:
        lines.insert(0, f"checkpoint looks like scale {checkpoint_scale}, model is scale {model_scale}")
    return lines


def refuse_quantized(checkpoint: Any, source: str) -> None:
    """ValueError when ``checkpoint`` is an odm-sr training checkpoint of a quantized run (its stored
    ``method.name`` is not ``fp`` or its ``bits`` are not 32): its latent float weights are not an FP model, and
    a table would label them FP. The stored config is only read here, never instantiated."""
    cfg = checkpoint.get("hyper_parameters", {}).get("cfg") if isinstance(checkpoint, dict) else None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("method", {}), dict):
        return
    method, bits = cfg.get("method", {}).get("name", "fp"), cfg.get("bits") or {}
    w, a = (bits.get(k, 32) if isinstance(bits, dict) else 32 for k in ("w", "a"))
    if method != "fp" or (w, a) != (32, 32):
        raise ValueError(f"model.pretrained={source}: holds a quantized network (an odm-sr checkpoint of "
                         f"method={method} bits=w{w}a{a}), not full-precision weights; give the checkpoint of a "
                         f"method=fp run or an official .pt/.pth (to evaluate this one: odm-sr-eval ckpt={source})")


def load_pretrained(model: nn.Module, path_or_state: str | os.PathLike | Mapping,
                    strict: bool = True) -> nn.Module:
    """Copy weights into `model` (in place) and return it; quantizer keys are ignored on both sides.

    strict=True: the non-quantizer keys of the model and of the checkpoint must be equal, with equal
    shapes, else ValueError naming the source, the missing/unexpected keys and the shape mismatches.
    strict=False: loads the keys present in both with equal shapes and ignores the rest.
    """
    if isinstance(path_or_state, Mapping):
        source, state = "<in-memory>", extract_state_dict(path_or_state)
    else:
        source, checkpoint = str(path_or_state), load_torch_file(path_or_state)
        refuse_quantized(checkpoint, source)
        state = extract_state_dict(checkpoint, source=source)
    state = {k: v for k, v in state.items() if not is_quantizer_key(k)}  # a file has names only
    inside = quantizer_prefixes(model)
    target = {k: v for k, v in model.state_dict().items() if not k.startswith(inside)}
    problems = mismatch_report(model, target, state)
    named = scale_in_filename(source)
    if not problems and strict and named is not None and isinstance(model, SRModel) and named != model.scale:
        problems = [f"the file name says scale {named}, model is scale {model.scale} (the tensors' shapes "
                    f"agree: this network's x{named} and x{model.scale} files differ only in their values)"]
    if problems and strict:
        name = model.name if isinstance(model, SRModel) else type(model).__name__
        raise ValueError(f"{source}: does not match model {name!r}:\n  " + "\n  ".join(problems))
    usable = {k: v for k, v in state.items() if k in target and target[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return model
