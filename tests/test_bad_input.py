"""Bad input through the user-facing entry points: one clear error naming the file or value each.

Lower-level cases (truncated/unreadable images, size-mismatched pairs, grayscale/RGBA/16-bit conversion,
missing/empty folders, checkpoint key/shape mismatches) are tested next to their code in tests/data and
tests/models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN, compose_config
from PIL import Image

from odm_sr.eval import evaluate
from odm_sr.models import build_model
from odm_sr.train import train


def test_missing_training_folder_names_it(tmp_path):
    cfg = compose_config(TINY_TRAIN + [f"data.train={tmp_path / 'no_such_folder'}"], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        train(cfg)


def test_empty_training_folder_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = compose_config(TINY_TRAIN + [f"data.train={tmp_path / 'empty'}"], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="empty"):
        train(cfg)


def test_any_folder_of_hr_images_trains(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 48, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8), "L").save(folder / "gray.png")
    results = train(compose_config(TINY_TRAIN + [f"data.train={folder}", "test_after_fit=false",
                                                 "trainer.val_check_interval=6"], tmp_path / "run"))
    assert results["steps"] == 6


def test_missing_pretrained_checkpoint_names_it(tmp_path):
    cfg = compose_config(TINY_TRAIN + [f"model.pretrained={tmp_path / 'fp.pt'}"], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained=.*fp\.pt"):
        train(cfg)


def test_pretrained_checkpoint_of_another_model_names_the_mismatch(tmp_path):
    other = build_model("edsr", 4, n_resblocks=1, n_feats=8)  # TINY_TRAIN builds this at x2
    torch.save(other.state_dict(), tmp_path / "x4.pt")
    cfg = compose_config(TINY_TRAIN + [f"model.pretrained={tmp_path / 'x4.pt'}"], tmp_path / "run")
    expected = r"x4\.pt: does not match model 'edsr':\s+checkpoint looks like scale 4, model is scale 2"
    with pytest.raises(ValueError, match=expected):
        train(cfg)


def test_eval_at_a_scale_the_model_was_not_built_for(tmp_path):
    out = tmp_path / "run"
    train(compose_config(TINY_TRAIN + ["trainer.max_steps=1", "test_after_fit=false"], out))
    cfg = compose_config([f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "scale=4"], tmp_path, "eval")
    with pytest.raises(ValueError, match=r"scale=4: checkpoint .*last\.ckpt holds a x2 model"):
        evaluate(cfg)
    with pytest.raises(ValueError, match="needs ckpt"):
        evaluate(compose_config([], tmp_path, "eval"))
