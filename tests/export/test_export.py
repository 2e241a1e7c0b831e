"""Integer ONNX export (``odm_sr.export``): ORT output against fake quant, the packed file, refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_config, tiny_network

from odm_sr.evaluation import eval_pad_mode, window_padding
from odm_sr.export.integer import extract_spec, integer_model, weight_layers
from odm_sr.export.onnx_graph import to_onnx
from odm_sr.export.packing import body_size, header_size, pack, pack_bits, unpack, unpack_bits
from odm_sr.export.requant import RequantPair
from odm_sr.export.runtime import OnnxEngine, session
from odm_sr.export.spec import ExportError

CASES = [(b, m) for b in ("edsr", "rdn", "swinir") for m in ("odm", "pams", "lsq")]
CASES += [("edsr", "odm_fq"), ("hat", "odm"), ("imdn", "odm"), ("pan", "pams")]


def grey(y: np.ndarray, rng: float) -> np.ndarray:
    """Output as the evaluation writes it: [0, 255], rounded, clamped (METHODS.md §1.3)."""
    return np.clip(np.round(y / rng * 255.0), 0, 255)


def fake_quant(net, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad(), window_padding(net, eval_pad_mode(net, "official")):
        return net(x).numpy()


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize(("backbone", "method"), CASES)
def test_ort_integer_graph_equals_fake_quant(backbone, method, bits, tmp_path):
    net, _ = tiny_network(backbone, method, bits, tmp_path)
    int_model = integer_model(net, extract_spec(net))
    x = torch.rand(1, 3, 13, 11) * float(net.pixel_range)  # odd sizes: borders on every side
    graph = to_onnx(int_model, (13, 11))
    model = onnx.load_from_string(graph)
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    integer_op = "MatMulInteger" if backbone in ("swinir", "hat") else "ConvInteger"
    linears = [m for m in weight_layers(net).values() if isinstance(m, torch.nn.Linear)]
    convs = len(weight_layers(net)) - len(linears) - (1 if method == "odm_fq" else 0)  # FQ head.0: FP input
    fused = sum(isinstance(m, RequantPair) for m in int_model.modules())
    assert fused == (2 if (backbone, bits) == ("edsr", 2) else ops.count("QLinearConv"))  # each block at 2 bits
    assert ops.count("MatMulInteger") == len(linears) and ops.count("ConvInteger") == convs - fused
    assert ops.count("QLinearConv") == fused
    assert ops.count(integer_op) > 0
    y = session(graph, threads=1).run(None, {"lr": x.numpy()})[0]
    ref = fake_quant(net, x)
    rng = float(net.pixel_range)
    assert np.abs(y - ref).max() <= 1e-4 * rng  # float round-off only, no code differs by a level
    assert np.abs(grey(y, rng) - grey(ref, rng)).max() <= 1


@pytest.mark.parametrize(("backbone", "method", "bits"), [("edsr", "odm", 2), ("rdn", "pams", 4),
                                                          ("edsr", "lsq", 3), ("swinir", "odm", 2)])
def test_packed_file_round_trips(backbone, method, bits, tmp_path):
    from odm_sr.analysis.complexity import storage

    net, cfg = tiny_network(backbone, method, bits, tmp_path)
    spec = extract_spec(net)
    data = pack(net, spec, cfg)
    rebuilt, spec2, _ = unpack(data)
    assert list(spec2.weights) == list(spec.weights) and spec2.grids == spec.grids
    for name, codes in spec.weights.items():
        assert torch.equal(spec2.weights[name].codes, codes.codes) and spec2.weights[name].param == codes.param
    assert all(torch.equal(spec2.fp[n], v) for n, v in spec.fp.items()) and list(spec2.fp) == list(spec.fp)
    x = torch.rand(1, 3, 9, 10) * float(net.pixel_range)
    a = OnnxEngine(integer_model(net, spec), threads=1)(x.numpy())
    b = OnnxEngine(integer_model(rebuilt, spec2), threads=1)(x.numpy())
    np.testing.assert_array_equal(a, b)
    # the body is the storage figure: b bits per weight, 32 per float; per-layer byte padding and PAMS's m
    body, expected = body_size(data), storage(net)["total_k"] * 4000
    layers = len(spec.weights)
    assert expected <= body <= expected + layers * (1 + (4 if method == "pams" else 0))
    assert header_size(data) < 4096


@pytest.mark.parametrize("bits", [2, 3, 4, 7, 8])
def test_bit_packing(bits):
    values = torch.randint(0, 2 ** bits, (1001,))
    data = pack_bits(values, bits)
    assert len(data) == (1001 * bits + 7) // 8
    assert torch.equal(unpack_bits(data, 1001, bits), values)
    if bits == 2:
        assert pack_bits(torch.tensor([1, 2, 3, 0]), 2) == bytes([0b00111001])  # 4 codes per byte, LSB first


@pytest.mark.parametrize(("method", "module"), [("daq", "DaqActQuantizer"), ("ddtb", "DdtbActQuantizer")])
def test_dynamic_methods_are_refused(method, module, tmp_path):
    from odm_sr.builders import build_network

    net, _, _ = build_network(tiny_config("edsr", method, 2, tmp_path))
    with pytest.raises(ExportError, match=f"{module}.*(per image|per-image)"):
        extract_spec(net)


def test_fqsr_is_refused_naming_an_output_quantizer(tmp_path):
    from odm_sr.builders import build_network

    net, _, _ = build_network(tiny_config("edsr", "fqsr", 4, tmp_path))
    with pytest.raises(ExportError, match=r"^head\.0\.out_quant \(FqsrQuantizer\): FQSR quantizes each conv's output"):
        extract_spec(net)


def test_odm_weights_above_7_bits_are_refused(tmp_path):
    net, _ = tiny_network("edsr", "odm", 8, tmp_path)
    with pytest.raises(ExportError, match="int8 holds ±127"):
        extract_spec(net)
