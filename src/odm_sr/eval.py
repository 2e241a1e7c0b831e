"""Evaluation of a checkpoint, ``evaluate(cfg)``: PSNR/SSIM per benchmark set (METHODS.md §1.3), beside bicubic;
the library side of `odm-sr-eval` (``odm_sr.cli.eval``):

    odm-sr-eval ckpt=logs/train/runs/<run>/checkpoints/last.ckpt data=sr291
    odm-sr-eval model=imdn model.scale=4 model.pretrained=../shared/models/imdn/IMDN_x4.pth data=sr291
prints a markdown table and writes ``eval.json`` to the run's output dir (``output_json=``). With
``eval.engine=onnx``, ``ckpt=`` may also be an ``odm-sr-export`` file (``.onnx`` or ``.odmq``), evaluated itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from .builders import pretrained_network
from .config import register_resolvers, reject_unknown_keys
from .data import SRDataModule
from .evaluation import (
    bicubic_upscale,
    eval_gray_mode,
    eval_upscale,
    evaluate_sets,
    resolve_device,
    warn_if_tiled_dynamic,
)
from .precision import apply_precision
from .trained import load_trained

register_resolvers()
EXPORTED_SUFFIXES = (".onnx", ".odmq")  # odm-sr-export's files: eval.engine=onnx evaluates them


def evaluate(cfg: DictConfig) -> dict[str, dict[str, tuple[float, float]]]:
    """Evaluate ``cfg.ckpt`` (and bicubic) on ``cfg.data.test``; returns {row: {set: (psnr, ssim)}}."""
    reject_unknown_keys(cfg)  # a typo (+eval.tiles=64) is an error, as in training, not silently ignored
    apply_precision(cfg)  # fp32, TF32 per ``tf32`` as in training
    scale, rows, net = cfg.get("scale"), {}, None
    if cfg.get("ckpt"):
        row, net, upscale = checkpoint_upscale(cfg)
        if scale is not None and int(scale) != int(net.scale):
            raise ValueError(f"scale={scale}: checkpoint {cfg.ckpt} holds a x{net.scale} model; "
                             f"evaluate it at scale={net.scale} (or leave scale unset)")
        scale = int(net.scale)
    elif cfg.get("model") is not None:
        net, row = fp_network(cfg.model, cfg.eval, scale)
        upscale = eval_upscale(net.to(resolve_device(cfg.eval.get("device"))), cfg.eval)
        scale = int(net.scale)
    elif scale is None:
        raise ValueError("odm-sr-eval needs ckpt=<checkpoint>, model=<name> model.pretrained=<FP weights>, or "
                         "scale=<2|3|4> for a bicubic-only table")
    scale = int(scale)
    dm = SRDataModule(train=None, val=[], test=list(cfg.data.test), scale=scale, lr_patch=int(cfg.data.lr_patch),
                      batch_size=1, data_root=str(cfg.data.data_root))
    dm.check_eval_sets()  # every image opened (and large enough to score) before any is evaluated
    gray = eval_gray_mode(net, cfg.eval.get("gray_mode", "official"))  # bicubic compared as the network's row
    if cfg.eval.get("bicubic_row", True) or net is None:
        rows["bicubic"] = evaluate_sets(bicubic_upscale(scale), dm, gray)
    if net is not None:
        rows[row] = evaluate_sets(upscale, dm, gray)
    return rows


def checkpoint_upscale(cfg: DictConfig) -> tuple[str, torch.nn.Module, Callable]:
    """(row name, network, upscale function) of ``cfg.ckpt``: a training checkpoint on ``eval.engine``, or an
    exported ``.onnx``/``.odmq`` (``odm-sr-export``) on ONNX Runtime (``eval.engine=onnx``)."""
    engine = cfg.eval.get("engine", "torch")
    if engine not in ("torch", "onnx"):
        raise ValueError(f"eval.engine={engine!r}: expected torch or onnx")
    if Path(cfg.ckpt).suffix in EXPORTED_SUFFIXES:
        if engine != "onnx":
            raise ValueError(f"ckpt={cfg.ckpt}: an exported model runs on ONNX Runtime: add eval.engine=onnx "
                             f"(or give its training .ckpt for eval.engine=torch)")
        from .export.runtime import load_engine, onnx_upscale

        onnx = load_engine(cfg.ckpt, cfg.eval.get("threads"), str(cfg.eval.get("pad_mode", "official")))
        return onnx.run_name, onnx.model, onnx_upscale(onnx, cfg.eval.get("tile"),
                                                        int(cfg.eval.get("tile_overlap", 16)))
    net, method, train_cfg = load_trained(cfg.ckpt)
    warn_if_tiled_dynamic(method, cfg.eval.get("tile"), "eval.tile")
    device = cfg.eval.get("device")
    if engine == "torch" and cfg.eval.get("exact", False):  # exact integer sums, float64 rescale
        from .export.integer import extract_spec, integer_model

        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"eval.exact=true runs on the CPU (the reference of the ONNX graph, float64 and "
                             f"integer-valued arithmetic as ORT's CPU kernels do it); got eval.device={device}: "
                             f"leave it unset or set eval.device=cpu")
        net, device = integer_model(net, extract_spec(net)), "cpu"
    if engine == "onnx":  # the integer graph in ONNX Runtime (export.runtime)
        from .export.runtime import onnx_eval_upscale

        return str(train_cfg.run_name), net, onnx_eval_upscale(cfg.ckpt, cfg.eval)
    # network and metrics on eval.device (default CUDA where available); the LR batches follow the network
    return str(train_cfg.run_name), net, eval_upscale(net.to(resolve_device(device)), cfg.eval)


def fp_network(model_cfg: DictConfig, eval_cfg: DictConfig, scale: int | None) -> tuple[torch.nn.Module, str]:
    """The FP backbone of ``model=<name>`` with the weights of ``model.pretrained`` (required), and its row name."""
    if not model_cfg.get("pretrained"):
        raise ValueError(f"model={model_cfg.name}: set model.pretrained=<FP weights file> (e.g. an official .pth) "
                         f"to evaluate it, or pass ckpt=<checkpoint>")
    if eval_cfg.get("exact", False) or eval_cfg.get("engine", "torch") != "torch":
        raise ValueError("eval.exact / eval.engine=onnx run a quantized checkpoint's integer graph; an FP "
                         "network (model=...) runs with eval.engine=torch, eval.exact=false")
    if scale is not None and int(scale) != int(model_cfg.scale):
        raise ValueError(f"scale={scale} but model.scale={model_cfg.scale}: set model.scale={scale}")
    return pretrained_network(model_cfg), f"{model_cfg.name} FP ({Path(str(model_cfg.pretrained)).name})"
