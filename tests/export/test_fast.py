"""The opt-in inexact fast graph (``export.fast``, ``odm-sr-export --mode fast-inexact``) and the default graph,
which it must leave as it was."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_network
from PIL import Image
from test_export_cli import write_checkpoint
from test_requant import pair

from odm_sr.export.fast import check_mode, fast_model
from odm_sr.export.integer import extract_spec, integer_model
from odm_sr.export.onnx_graph import to_onnx
from odm_sr.export.requant import simulate
from odm_sr.export.runtime import export_checkpoint, session
from odm_sr.export.spec import ExportError

# op types of the default graph of the tiny EDSR x2, recorded on the code before the fast mode existed (commit
# daaca47): the default export must keep its structure (its codes are held by test_requant/test_export). No hash of
# the constants: calibrated float ranges may differ in the last bits on another CPU.
DEFAULT_GRAPHS = {
    ("odm", 2): ({"Add": 6, "Cast": 6, "Clip": 4, "Concat": 4, "Constant": 57, "Conv": 6, "ConvInteger": 2,
                  "DepthToSpace": 1, "Expand": 2, "Identity": 1, "MatMul": 1, "Mul": 4, "QLinearConv": 2,
                  "QuantizeLinear": 2, "Shape": 2, "Slice": 4, "Sub": 2, "Transpose": 2}),
    ("odm", 4): ({"Add": 10, "Cast": 12, "Clip": 4, "Concat": 2, "Constant": 55, "ConstantOfShape": 2, "Conv": 8,
                  "ConvInteger": 4, "DepthToSpace": 1, "Identity": 1, "MatMul": 1, "Mul": 8, "QuantizeLinear": 4,
                  "Relu": 2, "Shape": 2, "Slice": 2, "Sub": 4, "Transpose": 2}),
    ("pams", 2): ({"Add": 10, "Cast": 6, "Clip": 4, "Constant": 77, "Conv": 6, "ConvInteger": 2, "DepthToSpace": 1,
                   "Div": 8, "Identity": 1, "MatMul": 1, "Max": 4, "Min": 4, "Mul": 14, "QLinearConv": 2,
                   "QuantizeLinear": 2, "Round": 4, "Sub": 4, "Transpose": 2}),
}


def graph_ops(graph: bytes) -> dict:
    model = onnx.load_from_string(graph)
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


# what the composed tail (export.tail) changes in the tiny EDSR x2's graph: the 3 tail convs (upsampler, last,
# add_mean) and the pixel shuffle become the composed conv + shuffle and the sequential tail on 4 border strips;
# the strips and the assembly are Slice/Concat
COMPOSED_TAIL = {"Conv": 1 + 4 * 3 - 3, "DepthToSpace": 1 + 4 - 1, "Slice": 4 + 4 + 2 * 2, "Concat": 2}


@pytest.mark.parametrize(("method", "bits"), list(DEFAULT_GRAPHS))
def test_default_graph_is_unchanged(method, bits, tmp_path):
    """The integer part of the default graph is as recorded; the composed tail changes only the tail's ops."""
    net, _ = tiny_network("edsr", method, bits, tmp_path)
    model = integer_model(net, extract_spec(net))
    assert graph_ops(to_onnx(model, (13, 11), compose=False)) == DEFAULT_GRAPHS[method, bits]
    composed, want = graph_ops(to_onnx(model, (13, 11))), collections.Counter(DEFAULT_GRAPHS[method, bits])
    want.update(COMPOSED_TAIL)
    assert {k: v for k, v in composed.items() if k != "Constant"} == {k: v for k, v in want.items() if k != "Constant"}


def fast_pair(method: str, bits: int, tmp_path):
    """(exact integer model, fast model) of a tiny EDSR x4; ranges from 3 random images."""
    net, _ = tiny_network("edsr", method, bits, tmp_path, scale=4)
    exact = integer_model(net, extract_spec(net))
    gen = torch.Generator().manual_seed(1)
    return exact, fast_model(exact, [torch.rand(1, 3, 16, 16, generator=gen) * 255 for _ in range(3)])


@pytest.mark.parametrize(("method", "bits"), [("odm", 2), ("odm", 4), ("pams", 2)])
def test_fast_graph_ops_and_output(method, bits, tmp_path):
    """Every body conv on QLinearConv (2 per block, body end), the float32 tail composed as in the default graph,
    no ConvInteger and no float64 op; ORT's output equals the fast model's PyTorch forward (the ``simulate`` twin,
    its tail sequential) to float32 round-off but where a float32 head sum lands on the other side of a code
    boundary on another CPU (at most 1 % of the pixels beyond 1e-3 grey levels, none beyond 2, allowed), and lies
    within 2 grey levels of the exact graph, 1 on average at most."""
    exact, fast = fast_pair(method, bits, tmp_path)
    graph = to_onnx(fast, (13, 11))
    model = onnx.load_from_string(graph)
    onnx.checker.check_model(model, full_check=True)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["QLinearConv"] == 2 * 2 + 1 and ops["ConvInteger"] == 0 and ops["MatMul"] == 0
    assert ops["DequantizeLinear"] == 2 + 1
    # sub_mean, head, the composed tail (1 + 4 strips of upsampler conv x2, last conv, add_mean)
    assert ops["Conv"] == 2 + 1 + 4 * 4 and ops["DepthToSpace"] == 1 + 4 * 2
    assert not any(a.name == "to" and a.i == onnx.TensorProto.DOUBLE for n in model.graph.node for a in n.attribute)
    x = torch.rand(1, 3, 13, 11, generator=torch.Generator().manual_seed(2)) * 255
    y = session(graph, threads=1).run(None, {"lr": x.numpy()})[0]
    y_exact = session(to_onnx(exact, (13, 11)), threads=1).run(None, {"lr": x.numpy()})[0]
    with torch.no_grad():
        twin = np.abs(y - fast(x).numpy())
    assert np.mean(twin > 1e-3) <= 0.01 and twin.max() <= 2  # here: 3e-5 at most
    diff = np.abs(np.clip(np.round(y), 0, 255) - np.clip(np.round(y_exact), 0, 255))
    assert diff.max() <= 2 and diff.mean() <= 1.0


def test_simulate_equals_the_exact_requantization():
    """``simulate`` (the fast forward of a QLinearConv) of an exactly fitted pair gives the reference codes."""
    layer = pair("odm", 2)
    x = torch.randn(2, 16, 9, 7, generator=torch.Generator().manual_seed(5)) * 3
    with torch.no_grad():
        want = layer.second.grid.codes(torch.relu(layer.first.reference(x)))
        got = simulate(layer.req, layer.first.grid.codes(x), layer.first._attrs())
    assert torch.equal(got, want)


def test_bad_modes_and_backbones_are_refused(tmp_path):
    assert check_mode("exact") == "exact" and check_mode("fast-inexact") == "fast-inexact"
    with pytest.raises(ExportError, match=r"export mode 'fast': expected one of exact, fast-inexact"):
        check_mode("fast")
    net, _ = tiny_network("imdn", "odm", 2, tmp_path)
    with pytest.raises(ExportError, match=r"fast-inexact is for EDSR-family networks only \(imdn"):
        fast_model(integer_model(net, extract_spec(net)), [torch.rand(1, 3, 8, 8)])
    net, _ = tiny_network("edsr", "odm_fq", 2, tmp_path)
    with pytest.raises(ExportError, match="body-end and tail convs must be float"):
        fast_model(integer_model(net, extract_spec(net)), [torch.rand(1, 3, 8, 8) * 255])


def fake_data_root(root):
    """sr291's layout (train/T91/HR, train/BSD200/HR) with 2 + 2 random images."""
    rng = np.random.default_rng(0)
    for folder in ("T91", "BSD200"):
        (root / "train" / folder / "HR").mkdir(parents=True)
        for i in range(2):
            img = (rng.random((40 + 8 * i, 36, 3)) * 255).astype(np.uint8)
            Image.fromarray(img).save(root / "train" / folder / "HR" / f"{i}.png")
    return root


def test_cli_fast_mode_end_to_end(tmp_path, capsys):
    """``odm-sr-export --mode fast-inexact``: the graph says its mode, runs in the engine from the .onnx; a bad
    mode or calibration count is refused naming the value, and nothing is written."""
    from odm_sr.cli.export import main
    from odm_sr.export.runtime import load_engine

    net, cfg = tiny_network("edsr", "odm", 2, tmp_path)
    write_checkpoint(net, cfg, tmp_path / "tiny.ckpt")
    root = fake_data_root(tmp_path / "data")
    out = tmp_path / "out" / "model.onnx"
    main([str(tmp_path / "tiny.ckpt"), str(out), "--mode", "fast-inexact", "--calib-images", "3",
          "--data-root", str(root)])
    assert json.loads(capsys.readouterr().out)["mode"] == "fast-inexact"
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta["odm_sr.mode"] == "fast-inexact" and meta["odm_sr.calib_images"] == "3"
    y = load_engine(out, threads=1)(np.random.rand(1, 3, 9, 8).astype(np.float32) * 255)
    assert y.shape == (1, 3, 18, 16) and np.isfinite(y).all()
    for args, message in [(["--mode", "fast"], "export mode 'fast'"), (["--mode", "fast-inexact", "--calib-images",
                                                                        "0", "--data-root", str(root)],
                                                                       "--calib-images 0")]:
        with pytest.raises(SystemExit, match=message):
            main([str(tmp_path / "tiny.ckpt"), str(tmp_path / "bad" / "model.onnx"), *args])
    assert not (tmp_path / "bad").exists()
    info = export_checkpoint(tmp_path / "tiny.ckpt", tmp_path / "default" / "model.onnx", (16, 16))
    assert info["mode"] == "exact" and "odm_sr.mode" not in {
        p.key for p in onnx.load(tmp_path / "default" / "model.onnx").metadata_props}
