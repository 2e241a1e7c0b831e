"""``odm-sr-eval ckpt=`` with a file that is not a training checkpoint (issue 22 item 14): an exported
``.onnx``/``.odmq`` is evaluated itself on ONNX Runtime; any other file is refused without torch's advice to
load it with ``weights_only=False``."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from helpers import compose_config
from test_export_cli import eval_rows, tiny_checkpoint

from odm_sr.eval import evaluate
from odm_sr.export.runtime import export_checkpoint

# torch's advice (its message since 2.6): "Re-running `torch.load` with `weights_only` set to `False` will likely
# succeed" / "This file can still be loaded"
UNSAFE_ADVICE = re.compile(r"weights_only`? (set to|=) ?`?False|can still be loaded", re.IGNORECASE)


def test_eval_of_an_exported_model_gives_the_checkpoint_table(tmp_path):
    ckpt = tiny_checkpoint("edsr", "pams", 4, tmp_path)
    export_checkpoint(ckpt, tmp_path / "deploy" / "model.onnx", (16, 16))
    onnx = ["eval.engine=onnx", "eval.threads=1"]
    expected = eval_rows(ckpt, onnx, tmp_path / "ckpt")
    for name in ("model.onnx", "model.odmq"):
        assert eval_rows(tmp_path / "deploy" / name, onnx, tmp_path / name) == expected


def test_eval_of_an_exported_model_on_torch_says_it_needs_onnx_or_the_checkpoint(tmp_path):
    ckpt = tiny_checkpoint("edsr", "odm", 2, tmp_path)
    export_checkpoint(ckpt, tmp_path / "model.onnx", (16, 16))
    with pytest.raises(ValueError, match=r"model\.odmq: an exported model runs on ONNX Runtime: add "
                                         r"eval\.engine=onnx \(or give its training \.ckpt"):
        eval_rows(tmp_path / "model.odmq", [], tmp_path / "out")


@pytest.mark.parametrize("content", ["odmq_bytes", "foreign_pickle"])
def test_a_non_checkpoint_never_gets_the_advice_to_load_it_unsafely(content, tmp_path):
    """A file torch refuses with weights_only=True: the error names it and does not pass on torch's advice
    to retry with weights_only=False (which would run the code a hostile file holds)."""
    path = tmp_path / "model.ckpt"
    if content == "odmq_bytes":
        path.write_bytes(b"ODMQ\x02\x00" + bytes(range(200)))
    else:
        torch.save({"state_dict": argparse.Namespace(a=1)}, path)  # a class outside torch's allow-list
    with pytest.raises(ValueError) as err:
        evaluate(compose_config([f"ckpt={path}", "data=sample"], tmp_path / "out", "eval"))
    message = str(err.value)
    assert message.startswith(f"{path}: cannot be read as a torch checkpoint (it holds more than tensors")
    assert not UNSAFE_ADVICE.search(message) and err.value.__cause__ is None, message
