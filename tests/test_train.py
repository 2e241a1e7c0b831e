"""End-to-end: a tiny full-precision training through ``train(cfg)``, then eval and upscale of its checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN, compose_config
from PIL import Image

from odm_sr.train import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(TINY_TRAIN, out)
    results = train(cfg)
    return out, results


def test_training_writes_results_and_checkpoints(tiny_run):
    out, results = tiny_run
    assert results["steps"] == 6
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["metrics"]) == {"bicubic", saved["run_name"]}
    for row in saved["metrics"].values():
        psnr, ssim = row["sample_test"]["psnr"], row["sample_test"]["ssim"]
        assert math.isfinite(psnr) and 10 < psnr < 60 and 0 < ssim <= 1
    assert (out / "checkpoints" / "last.ckpt").is_file()
    # eval.select_best_on=null (default): the test rows are those of the last weights, and no best.ckpt is kept
    assert saved["test_checkpoint"] == {"select_best_on": None, "checkpoint": "last", "path": None, "val_psnr": None}
    assert not (out / "checkpoints" / "best.ckpt").exists()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["odm_sr_step_count"] == 6
    # the csv logger received losses and learning rates
    metrics_csv = next(out.glob("csv/version_*/metrics.csv")).read_text()
    assert "train/loss_rec" in metrics_csv and "lr/net" in metrics_csv and "val/sample_test/psnr" in metrics_csv


def test_eval_of_checkpoint_matches_training_test(tiny_run, tmp_path):
    from odm_sr.eval import evaluate

    out, results = tiny_run
    cfg = compose_config([f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "data=sample"], tmp_path, "eval")
    rows = evaluate(cfg)
    name = results["run_name"]
    assert rows[name]["sample_test"][0] == pytest.approx(results["metrics"][name]["sample_test"]["psnr"], abs=1e-6)
    assert rows["bicubic"]["sample_test"][0] == pytest.approx(results["metrics"]["bicubic"]["sample_test"]["psnr"])


def test_upscale_writes_an_image_of_scale_times_the_input(tiny_run, tmp_path):
    from odm_sr.cli.upscale import main as upscale_main

    out, _ = tiny_run
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(src)
    dst = tmp_path / "sub" / "out.png"
    upscale_main([str(out / "checkpoints" / "last.ckpt"), str(src), str(dst), "--tile", "8"])
    assert Image.open(dst).size == (60, 40)


def test_eval_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    from odm_sr.trained import read_checkpoint

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.ckpt"):
        read_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        read_checkpoint(tmp_path / "missing.ckpt")


def _input_image(path, size=(20, 30)):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def test_upscale_refuses_to_write_over_its_input(tiny_run, tmp_path):
    from odm_sr.cli.upscale import main as upscale_main

    out, _ = tiny_run
    src = _input_image(tmp_path / "in.png")
    before = src.read_bytes()
    with pytest.raises(SystemExit, match=r"^odm-sr-upscale: error: output .* is the input image .*--overwrite"):
        upscale_main([str(out / "checkpoints" / "last.ckpt"), str(src), str(tmp_path / "." / "in.png")])
    assert src.read_bytes() == before
    upscale_main([str(out / "checkpoints" / "last.ckpt"), str(src), str(src), "--overwrite"])
    assert Image.open(src).size == (60, 40)


def test_upscale_writes_the_rounded_tiled_output_atomically(tiny_run, tmp_path, monkeypatch):
    from odm_sr.data.io import read_image, to_tensor
    from odm_sr.evaluation import network_upscale
    from odm_sr.metrics import to_uint8
    from odm_sr.trained import load_trained
    from odm_sr.upscale import upscale_file

    ckpt = tiny_run[0] / "checkpoints" / "last.ckpt"
    src, dst = _input_image(tmp_path / "in.png", (37, 29)), tmp_path / "out.png"
    upscale_file(ckpt, src, dst, tile=8, overlap=4)
    net, _, _ = load_trained(ckpt)
    with torch.no_grad():
        expected = to_uint8(network_upscale(net, 8, 4)(to_tensor(read_image(src)[0])[None])[0], 1.0)
    assert np.array_equal(np.asarray(Image.open(dst)), expected.permute(1, 2, 0).numpy())

    def killed(self_or_file, fp=None, *args, **kwargs):  # the encoder dies half-way through the file
        (fp if hasattr(fp, "write") else self_or_file).write(b"\x89PNG partial")
        raise KeyboardInterrupt

    before = dst.read_bytes()
    monkeypatch.setattr(Image.Image, "save", killed)
    monkeypatch.setattr("odm_sr.data.io.write_png", killed, raising=False)
    with pytest.raises(KeyboardInterrupt):
        upscale_file(ckpt, src, dst)
    assert dst.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "out.png"]
    with pytest.raises(KeyboardInterrupt):
        upscale_file(ckpt, src, tmp_path / "new.png")
    assert not (tmp_path / "new.png").exists()


def test_checkpoint_with_non_finite_weights_is_refused_for_eval_and_upscale(tiny_run, tmp_path):
    from odm_sr.trained import load_trained
    from odm_sr.upscale import upscale_file

    ckpt = torch.load(tiny_run[0] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["state_dict"]["net.body.0.body.0.weight"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "diverged.ckpt"
    torch.save(ckpt, bad)
    message = rf"checkpoint {bad}: 1 tensor\(s\) hold NaN or inf, e.g. \['body\.0\.body\.0\.weight'\]"
    with pytest.raises(ValueError, match=message):
        load_trained(bad)  # odm-sr-eval and odm-sr-analyze read checkpoints with it
    with pytest.raises(ValueError, match=message):
        upscale_file(bad, _input_image(tmp_path / "in.png"), tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


def test_upscale_reads_a_webp_input(tiny_run, tmp_path):
    from odm_sr.cli.upscale import main as upscale_main

    out, _ = tiny_run
    rgb = np.random.default_rng(1).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in.webp", lossless=True)
    Image.fromarray(rgb).save(tmp_path / "in.png")
    upscale_main([str(out / "checkpoints" / "last.ckpt"), str(tmp_path / "in.webp"), str(tmp_path / "a.png")])
    upscale_main([str(out / "checkpoints" / "last.ckpt"), str(tmp_path / "in.png"), str(tmp_path / "b.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_eval_and_upscale_run_the_network_on_the_configured_device(tiny_run, tmp_path, monkeypatch):
    """``eval.device`` / ``--device`` (issue 14): the network moves there, the LR batches follow it and the
    metrics get its output where it is. The ``meta`` device stands in for a GPU (shapes only, so the metrics are
    stubbed); real CUDA is not exercised on a CPU-only machine."""
    from odm_sr import metrics, upscale
    from odm_sr.cli.upscale import main as upscale_main
    from odm_sr.eval import evaluate
    from odm_sr.evaluation import module_device

    out, _ = tiny_run
    seen = []
    monkeypatch.setattr(metrics.SRMetrics, "update", lambda self, sr, hr, weight=1.0: seen.append(
        (sr.device, self.count.device)))
    monkeypatch.setattr(metrics.SRMetrics, "compute", lambda self: torch.tensor([30.0, 0.9, 1.0]))
    cfg = compose_config([f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "data=sample", "eval.device=meta",
                          "eval.bicubic_row=false"], tmp_path, "eval")
    evaluate(cfg)
    assert seen and set(seen) == {(torch.device("meta"), torch.device("meta"))}  # the output and the metric's sums
    nets = []
    monkeypatch.setattr(upscale, "upscale_image", lambda net, *args: nets.append(module_device(net)))
    upscale_main([str(out / "checkpoints" / "last.ckpt"), str(tmp_path / "in.png"), str(tmp_path / "o.png"),
                  "--device", "meta"])
    assert nets == [torch.device("meta")]


def test_eval_device_defaults_to_cuda_where_available(monkeypatch):
    """Only the choice: ``torch.cuda.is_available`` is faked, no CUDA runs here."""
    from odm_sr.evaluation import resolve_device

    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize(("overrides", "expected"), [([], True), (["trainer.deterministic=true"], False),
                                                     (["trainer.benchmark=false"], False)])
def test_training_sets_cudnn_benchmark_unless_deterministic(tmp_path, overrides, expected):
    import hydra

    from odm_sr.quant.base import FullPrecision
    from odm_sr.train import lightning_trainer_config, trainer_overrides

    cfg = compose_config(TINY_TRAIN + overrides, tmp_path)
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = not expected
        hydra.utils.instantiate(lightning_trainer_config(cfg.trainer), logger=False,
                                **trainer_overrides(cfg.trainer, FullPrecision()))
        assert torch.backends.cudnn.benchmark is expected
    finally:
        torch.backends.cudnn.benchmark = saved
