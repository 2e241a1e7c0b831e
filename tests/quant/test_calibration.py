"""Percentile calibration (METHODS.md §5.2) against independently recorded features and numpy percentiles."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import make_method

from odm_sr.models import build_model
from odm_sr.quant.base import Bits
from odm_sr.quant.calibration import calibrate_activation_ranges

LAYERS = ["body.0.body.0", "body.0.body.2", "body.1.body.0", "body.1.body.2"]




def _setup(bits: int = 2):
    torch.manual_seed(0)
    fp = build_model("edsr", 2, n_resblocks=2, n_feats=8, res_scale=1.0)
    quantized = make_method("odm", {}, Bits(w=bits, a=bits)).quantize(copy.deepcopy(fp))
    batches = [torch.rand(2, 3, 10, 10) * 255 for _ in range(4)]
    return fp, quantized, batches


def _recorded_inputs(model, batches):
    """{layer: [input of each batch]} from forward pre-hooks, model in eval mode."""
    seen = {name: [] for name in LAYERS}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, inp, n=n: seen[n].append(inp[0].detach().double().numpy().copy())) for n in LAYERS]
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    return seen


def _bounds(model, name):
    act = model.get_submodule(name).act_quant
    return act.lower.item(), act.upper.item()


@pytest.mark.parametrize("j", [99.0, 95.0])
def test_fp_init_is_mean_of_per_batch_percentiles(j):
    fp, model, batches = _setup()
    ranges = calibrate_activation_ranges(model, batches, j=j, num_batches=3, source="fp", progress=False)
    features = _recorded_inputs(fp, batches[:3])  # only the first num_batches batches count
    for name in LAYERS:
        per_batch = np.array([np.percentile(x, [100 - j, j]) for x in features[name]])
        expected = per_batch.mean(axis=0)
        np.testing.assert_allclose(ranges[name], expected, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(_bounds(model, name), expected, rtol=1e-5, atol=1e-4)


def test_j100_is_mean_of_min_and_max():
    fp, model, batches = _setup()
    calibrate_activation_ranges(model, batches, j=100, num_batches=10, source="fp", progress=False)
    features = _recorded_inputs(fp, batches)
    for name in LAYERS:
        expected = (np.mean([x.min() for x in features[name]]), np.mean([x.max() for x in features[name]]))
        np.testing.assert_allclose(_bounds(model, name), expected, rtol=1e-6, atol=1e-4)


def test_batches_may_be_tuples_or_dicts_and_modes_are_restored():
    _, model, batches = _setup()
    ref = calibrate_activation_ranges(copy.deepcopy(model), batches, num_batches=4, progress=False)
    model.train()
    model.body[0].eval()  # a mixed state must come back as it was
    modes_seen = []
    hook = model.register_forward_pre_hook(lambda m, _i: modes_seen.append(m.training))
    tuples = calibrate_activation_ranges(model, [(b, None) for b in batches], num_batches=4, progress=False)
    dicts = calibrate_activation_ranges(model, [{"lr": b} for b in batches], num_batches=4, progress=False)
    hook.remove()
    assert tuples == ref and dicts == ref
    assert modes_seen and not any(modes_seen)  # eval mode during calibration
    assert model.training and not model.body[0].training and model.body[1].training


def test_sequential_sees_upstream_quantization():
    fp, model, batches = _setup(bits=2)
    seq = copy.deepcopy(model)
    fp_ranges = calibrate_activation_ranges(model, batches, j=99, num_batches=4, source="fp", progress=False)
    seq_ranges = calibrate_activation_ranges(seq, batches, j=99, num_batches=4, source="sequential",
                                             progress=False)
    # the first quantized layer's input has no quantizer upstream: both sources agree
    np.testing.assert_allclose(seq_ranges[LAYERS[0]], fp_ranges[LAYERS[0]], rtol=1e-6)
    # every range equals the percentiles of the inputs that the fully calibrated quantized model produces
    features = _recorded_inputs(seq, batches)
    for name in LAYERS:
        expected = np.array([np.percentile(x, [1, 99]) for x in features[name]]).mean(axis=0)
        np.testing.assert_allclose(seq_ranges[name], expected, rtol=1e-5, atol=1e-4)
    assert not np.allclose(seq_ranges[LAYERS[-1]], fp_ranges[LAYERS[-1]], rtol=1e-3)


def test_invalid_arguments():
    _, model, batches = _setup()
    with pytest.raises(ValueError, match="init.source"):
        calibrate_activation_ranges(model, batches, source="teacher")
    with pytest.raises(ValueError, match="init.j"):
        calibrate_activation_ranges(model, batches, j=40)
    with pytest.raises(ValueError, match="no batches"):
        calibrate_activation_ranges(model, [], progress=False)
