"""``odm-sr-export`` and ``odm-sr-upscale --engine onnx`` end to end on a tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_network
from omegaconf import OmegaConf
from PIL import Image

from odm_sr.export.packing import header_size
from odm_sr.upscale import upscale_file


def write_checkpoint(net, cfg, path):
    """What odm-sr-train writes, as far as ``checkpoint.load_trained`` reads it."""
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    cfg = OmegaConf.to_container(cfg, resolve=False)
    cfg["run_name"] = "tiny"
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": cfg}}, path)


@pytest.mark.parametrize(("backbone", "method"), [("edsr", "odm"), ("swinir", "pams")])
def test_export_then_upscale_with_onnx_runtime(backbone, method, tmp_path, capsys):
    from odm_sr.export_cli import main

    net, cfg = tiny_network(backbone, method, 2, tmp_path)
    ckpt = tmp_path / "tiny.ckpt"
    write_checkpoint(net, cfg, ckpt)
    main([str(ckpt), str(tmp_path / "out" / "model.onnx"), "--lr-size", "16", "16"])
    info = json.loads(capsys.readouterr().out)
    packed = (tmp_path / "out" / "model.odmq").read_bytes()
    assert info["packed_bytes"] == len(packed) and info["header_bytes"] == header_size(packed)
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

    net, cfg = tiny_network("edsr", "pams", 4, tmp_path)
    ckpt = tmp_path / "tiny.ckpt"
    write_checkpoint(net, cfg, ckpt)
    rows = {}
    for engine in ("torch", "onnx"):
        ecfg = compose_config([f"ckpt={ckpt}", "data=sample", "eval.bicubic_row=false", f"eval.engine={engine}",
                               "eval.threads=1"], tmp_path / engine, "eval")
        rows[engine] = evaluate(ecfg)["tiny"]
    assert len(calls) == 1 and rows["torch"].keys() == rows["onnx"].keys()
    for name, (psnr, ssim) in rows["torch"].items():
        assert abs(rows["onnx"][name][0] - psnr) <= 0.01 and abs(rows["onnx"][name][1] - ssim) <= 1e-4
    with pytest.raises(ValueError, match="eval.engine='tensorrt'"):
        evaluate(compose_config([f"ckpt={ckpt}", "data=sample", "eval.engine=tensorrt"], tmp_path / "x", "eval"))
