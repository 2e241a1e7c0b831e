"""ONNX graph of an integer model (``integer.integer_model``) through the TorchScript exporter.

The integer layers emit their own nodes (``_IntegerOp.symbolic``); every float part (head, tail,
upsampler, attention, softmax, LayerNorm, skip fake quant) is exported by ``torch.onnx`` as usual.
CNNs (EDSR, RDN) get dynamic batch/height/width; SwinIR/HAT graphs are fixed to one LR size because their
shifted-window masks and window padding are computed from Python sizes (``runtime`` builds one graph per
size).
"""

from __future__ import annotations

import copy
import io
import warnings

import torch
from torch import nn

from odm_sr.evaluation import eval_pad_mode, window_padding
from odm_sr.quant.backbones import backbone_of

from .spec import ExportError
from .tail import compose_tail, tail_modules

OPSET = 17
INPUT, OUTPUT = "lr", "sr"


def has_dynamic_size(model: nn.Module) -> bool:
    """True for the CNN backbones, whose graph runs at any input size."""
    return backbone_of(model).dynamic_size


def to_onnx(int_model: nn.Module, lr_hw: tuple[int, int] = (32, 32), pad_mode: str = "official",
            compose: bool = True) -> bytes:
    """The ONNX model (bytes) of ``int_model`` on (N, 3, H, W) inputs in the backbone's pixel range.

    ``lr_hw`` is the traced size (the only size for transformers). ``pad_mode``: SwinIR/HAT window padding as
    ``odm-sr-eval`` does it (``evaluation.eval_pad_mode``). ``compose``: the float tail as one conv where the
    backbone has an affine one (``tail.compose_tail``; the model itself is left as it is).
    """
    if compose and tail_modules(int_model):
        int_model = compose_tail(copy.deepcopy(int_model))
    dynamic = has_dynamic_size(int_model)
    x = torch.rand(1, 3, *lr_hw) * float(int_model.pixel_range)
    axes = {INPUT: {0: "batch", 2: "height", 3: "width"}, OUTPUT: {0: "batch", 2: "out_height", 3: "out_width"}}
    buf = io.BytesIO()
    with window_padding(int_model, eval_pad_mode(int_model, pad_mode)), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(int_model, (x,), buf, dynamo=False, opset_version=OPSET, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes=axes if dynamic else None,
                          do_constant_folding=True)
    return buf.getvalue()


def code_chains(model) -> list[tuple[str, str]]:
    """(uint8 code, float input) value names of every integer layer's code chain of an ``onnx.ModelProto``
    (Sub/Mul → QuantizeLinear → Clip, or Max → … → Cast uint8), in graph order (= forward order): what the
    exactness checks expose as extra outputs. Codes requantized by a ``QLinearConv`` have no float input and
    are not listed."""
    import onnx

    producer = {o: n for n in model.graph.node for o in n.output}
    chains = []
    for node in model.graph.node:
        if node.op_type == "Clip" and producer.get(node.input[0]) is not None \
                and producer[node.input[0]].op_type == "QuantizeLinear":
            scaled = producer[producer[node.input[0]].input[0]]  # Sub (ODM) or Mul (PAMS)
            chains.append((node.output[0], scaled.input[0]))
        elif node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.UINT8
                                            for a in node.attribute):
            cur = node
            while cur.op_type != "Max":
                cur = producer[cur.input[0]]
            chains.append((node.output[0], cur.input[0]))
    return chains


def tag_graph(graph: bytes, metadata: dict[str, str]) -> bytes:
    """``graph`` with ``metadata`` added to the model's metadata properties (``odm_sr.<key>``)."""
    import onnx

    model = onnx.load_model_from_string(graph)
    onnx.helper.set_model_props(model, {f"odm_sr.{k}": str(v) for k, v in metadata.items()})
    return model.SerializeToString()


def graph_metadata(graph: bytes, source: str) -> dict[str, str]:
    """The ``odm_sr.*`` metadata of an ONNX model (``tag_graph``); ExportError naming ``source`` when the bytes
    are not an ONNX model."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(graph)
    except DecodeError as err:
        raise ExportError(f"{source}: not a readable ONNX model ({err}); export the checkpoint again with "
                          f"odm-sr-export") from None
    return {p.key[len("odm_sr."):]: p.value for p in model.metadata_props if p.key.startswith("odm_sr.")}
