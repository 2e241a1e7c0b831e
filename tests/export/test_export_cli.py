"""``odm-sr-export`` and ``odm-sr-upscale --engine onnx`` end to end on a tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_network
from omegaconf import OmegaConf
from PIL import Image

from odm_sr.export.packing import body_size
from odm_sr.upscale import upscale_file


def write_checkpoint(net, cfg, path):
    """What odm-sr-train writes, as far as ``checkpoint.load_trained`` reads it."""
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    cfg = OmegaConf.to_container(cfg, resolve=True)  # as odm-sr-train stores it
    cfg["run_name"] = "tiny"
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": cfg}}, path)


def tiny_checkpoint(backbone: str, method: str, bits: int, tmp_path):
    """``tmp_path``/tiny.ckpt of ``conftest.tiny_network``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    net, cfg = tiny_network(backbone, method, bits, tmp_path)
    write_checkpoint(net, cfg, tmp_path / "tiny.ckpt")
    return tmp_path / "tiny.ckpt"


def eval_rows(ckpt, overrides: list[str], out) -> dict:
    """``odm-sr-eval ckpt=<ckpt> data=sample`` (no bicubic row): the checkpoint's {set: (psnr, ssim)}."""
    from helpers import compose_config

    from odm_sr.eval import evaluate

    cfg = compose_config([f"ckpt={ckpt}", "data=sample", "eval.bicubic_row=false", *overrides], out, "eval")
    return evaluate(cfg)["tiny"]


@pytest.mark.parametrize(("backbone", "method"), [("edsr", "odm"), ("swinir", "pams")])
def test_export_then_upscale_with_onnx_runtime(backbone, method, tmp_path, capsys):
    from odm_sr.export_cli import main

    net, cfg = tiny_network(backbone, method, 2, tmp_path)
    ckpt = tmp_path / "tiny.ckpt"
    write_checkpoint(net, cfg, ckpt)
    main([str(ckpt), str(tmp_path / "out" / "model.onnx"), "--lr-size", "16", "16"])
    info = json.loads(capsys.readouterr().out)
    packed = (tmp_path / "out" / "model.odmq").read_bytes()
    assert info["packed_bytes"] == len(packed) and info["body_bytes"] == body_size(packed)
    assert info["header_bytes"] == len(packed) - body_size(packed)
    assert 1.0 <= info["body_over_storage"] <= 1.02
    rgb = (np.random.default_rng(0).random((21, 19, 3)) * 255).astype(np.uint8)  # odd sizes, 2 tiles a side
    Image.fromarray(rgb).save(tmp_path / "lr.png")
    torch_png = upscale_file(ckpt, tmp_path / "lr.png", tmp_path / "torch.png", tile=12, overlap=8)
    for source in (tmp_path / "out" / "model.onnx", ckpt):
        onnx_png = upscale_file(source, tmp_path / "lr.png", tmp_path / "onnx.png", tile=12, overlap=8,
                                engine="onnx", threads=1)
        a = np.asarray(Image.open(torch_png), dtype=np.int16)
        b = np.asarray(Image.open(onnx_png), dtype=np.int16)
        assert a.shape == (42, 38, 3) and np.abs(a - b).max() <= 1 and (a == b).mean() >= 0.999


def test_eval_engine_onnx_gives_the_torch_table(tmp_path, monkeypatch):
    from helpers import compose_config

    from odm_sr.eval import evaluate
    from odm_sr.export import runtime

    calls = []
    real = runtime.onnx_eval_upscale
    monkeypatch.setattr(runtime, "onnx_eval_upscale", lambda *a: calls.append(a) or real(*a))

    ckpt = tiny_checkpoint("edsr", "pams", 4, tmp_path)
    rows = {engine: eval_rows(ckpt, [f"eval.engine={engine}", "eval.threads=1"], tmp_path / engine)
            for engine in ("torch", "onnx")}
    assert len(calls) == 1 and rows["torch"].keys() == rows["onnx"].keys()
    for name, (psnr, ssim) in rows["torch"].items():
        assert abs(rows["onnx"][name][0] - psnr) <= 0.01 and abs(rows["onnx"][name][1] - ssim) <= 1e-4
    with pytest.raises(ValueError, match="eval.engine='tensorrt'"):
        evaluate(compose_config([f"ckpt={ckpt}", "data=sample", "eval.engine=tensorrt"], tmp_path / "x", "eval"))


def test_eval_exact_runs_the_integer_model_in_torch(tmp_path, monkeypatch):
    """``eval.exact=true`` evaluates the integer model's PyTorch forward (exact sums, float64 rescale): the
    table of the ONNX graph to float round-off of the FP layers; DAQ (dynamic ranges) is refused."""
    from odm_sr.export import integer
    from odm_sr.export.spec import ExportError

    built, real = [], integer.integer_model
    monkeypatch.setattr(integer, "integer_model", lambda *a: built.append(a) or real(*a))
    ckpt = tiny_checkpoint("edsr", "odm", 2, tmp_path)
    rows = {"exact": eval_rows(ckpt, ["eval.exact=true"], tmp_path / "exact")}
    assert len(built) == 1
    rows["onnx"] = eval_rows(ckpt, ["eval.engine=onnx", "eval.threads=1"], tmp_path / "onnx")
    for name, (psnr, ssim) in rows["exact"].items():
        assert abs(rows["onnx"][name][0] - psnr) <= 1e-3 and abs(rows["onnx"][name][1] - ssim) <= 1e-5
    with pytest.raises(ExportError, match="DAQ"):
        eval_rows(tiny_checkpoint("edsr", "daq", 2, tmp_path / "daq"), ["eval.exact=true"], tmp_path / "d")


def test_eval_exact_is_a_cpu_reference(tmp_path):
    """``eval.exact=true`` with a GPU ``eval.device`` is refused before any work, naming the key (the integer
    model keeps its float64 weights and codes on the CPU, the arithmetic ORT's CPU kernels do)."""
    ckpt = tiny_checkpoint("edsr", "odm", 2, tmp_path)
    with pytest.raises(ValueError, match=r"eval.exact=true runs on the CPU.*eval.device=cuda:1"):
        eval_rows(ckpt, ["eval.exact=true", "eval.device=cuda:1"], tmp_path / "exact")
