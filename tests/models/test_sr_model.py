"""``SRModel``: every backbone declares ``name``, ``scale``, ``pixel_range``, ``pad_mode`` and
``official_eval_pad_mode``; evaluation and checkpoint loading read them instead of probing (``getattr``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from odm_sr.evaluation import eval_gray_mode, eval_pad_mode
from odm_sr.models import MODEL_NAMES, SRModel, build_model, load_pretrained
from odm_sr.models.base import pixel_range

TINY = {"edsr_baseline": {"n_resblocks": 1, "n_feats": 8}, "edsr": {"n_resblocks": 1, "n_feats": 8},
        "rdn": {"D": 1, "C": 1, "G": 8, "G0": 8},
        "swinir_light": {"embed_dim": 12, "depths": [1], "num_heads": [2], "window_size": 4, "img_size": 8},
        "swinir_classical": {"embed_dim": 12, "depths": [1], "num_heads": [2], "window_size": 4, "img_size": 8},
        "hat_s": {"embed_dim": 12, "depths": [1], "num_heads": [2], "window_size": 4, "img_size": 8,
                  "compress_ratio": 3, "squeeze_factor": 3},
        "imdn": {"nf": 16, "num_modules": 1}, "pan": {"nf": 8, "unf": 4, "nb": 1},
        "srresnet": {"n_resblocks": 1, "n_feats": 8}}
# name -> (pixel_range, pad_mode, official_eval_pad_mode, eval_pad_mode(official)), METHODS.md §1.1, §1.3.2
DECLARED = {"edsr_baseline": (255.0, None, None, None), "edsr": (255.0, None, None, None),
            "rdn": (255.0, None, None, None), "swinir_light": (1.0, "reflect", "mirror", "mirror"),
            "swinir_classical": (1.0, "reflect", "mirror", "mirror"),
            "hat_s": (1.0, "reflect", "reflect", "reflect"), "imdn": (1.0, None, None, None),
            "pan": (1.0, None, None, None), "srresnet": (255.0, None, None, None)}
# how the script behind the published numbers compares a gray truth (eval.gray_mode=official, METHODS.md §1.3)
GRAY = {"imdn": "rgb", "pan": "rgb"}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_backbone_declares_the_attributes(name):
    model = build_model(name, 3, **TINY[name])
    assert isinstance(model, SRModel)
    rng, pad, official, evaluated = DECLARED[name]
    assert (model.name, model.scale, model.pixel_range, model.pad_mode, model.official_eval_pad_mode) == (
        name, 3, rng, pad, official)
    assert pixel_range(model) == rng and eval_pad_mode(model) == evaluated
    assert eval_pad_mode(model, "mirror") == (None if pad is None else "mirror")
    assert model.official_gray_mode == GRAY.get(name, "channel") == eval_gray_mode(model)
    assert eval_gray_mode(model, "channel") == "channel" and eval_gray_mode(model, "rgb") == "rgb"


def test_a_bare_module_gets_the_defaults():
    net = nn.Conv2d(3, 3, 1)
    assert pixel_range(net) == 1.0 and eval_pad_mode(net) is None and eval_pad_mode(net, "reflect") is None
    with pytest.raises(ValueError, match=r"does not match model 'Conv2d'"):
        load_pretrained(net, {"weight": torch.zeros(1)})  # no name: the class name
