"""Long-run robustness: exact resume, determinism, non-finite losses, atomic checkpoints, config validation."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_TRAIN, KillAt, compose_config, last_state

from odm_sr.lit_module import NonFiniteLossError
from odm_sr.resume import AtomicCheckpointIO
from odm_sr.train import train

# ODM 2-bit so that quantizer state (calibrated bounds, gamma) is part of what must survive a resume;
# epochs of 3 steps with checkpoints every 2 steps, so the resume point lies mid-epoch.
RESUMABLE = TINY_TRAIN + ["method=odm", "bits=w2a2", "method.init.num_batches=2", "trainer.max_steps=8",
                          "callbacks.model_checkpoint.every_n_train_steps=2", "eval.bicubic_row=false"]



@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, train(compose_config(RESUMABLE, out))


def test_same_seed_gives_identical_metrics_and_weights(uninterrupted, tmp_path):
    out, results = uninterrupted
    again = train(compose_config(RESUMABLE, tmp_path))
    assert again["metrics"] == results["metrics"]
    state_a, _ = last_state(out)
    state_b, _ = last_state(tmp_path)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_killed_run_resumes_to_the_same_weights_and_metrics(uninterrupted, tmp_path, monkeypatch):
    out, results = uninterrupted
    import odm_sr.train as train_mod

    real_build_callbacks = train_mod.build_callbacks
    monkeypatch.setattr(train_mod, "build_callbacks", lambda cfg: real_build_callbacks(cfg) + [KillAt(5)])
    killed = tmp_path / "killed"
    with pytest.raises(SystemExit):  # Lightning shuts down gracefully on the interrupt, then exits
        train(compose_config(RESUMABLE, killed))
    state, step = last_state(killed)
    assert step == 4  # the last checkpoint before the crash, mid-epoch (epochs of 3 steps)
    monkeypatch.setattr(train_mod, "build_callbacks", real_build_callbacks)
    last = killed / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert 0 < ckpt["odm_sr_seconds"]["train"] < 600
    ckpt["odm_sr_seconds"] = {"train": 1000.0, "validation": 50.0}  # as if the first part had run that long
    torch.save(ckpt, last)
    import time

    started = time.perf_counter()
    resumed = train(compose_config(RESUMABLE + [f"resume={last}"], killed))
    own = time.perf_counter() - started
    # the whole run's training time: the first part's (from the checkpoint) plus the resumed part's
    assert 1000.0 < resumed["train_seconds"] < 1000.0 + own and resumed["validation_seconds"] >= 50.0
    final, step = last_state(killed)
    reference, ref_step = last_state(out)
    assert step == ref_step == 8 and resumed["steps"] == 8
    assert set(final) == set(reference)
    assert all(torch.equal(final[k], reference[k]) for k in reference), "resumed weights differ"
    assert resumed["metrics"] == results["metrics"]
    assert resumed["mr_balance"] == results["mr_balance"] and results["mr_balance"]["steps"] == 8  # ρ's run mean


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from odm_sr.quant.base import FullPrecision

    real = FullPrecision.training_losses

    def poisoned(self, model, lr, hr, step, teacher=None):
        out = real(self, model, lr, hr, step, teacher)
        if step >= 4:
            out.terms["rec"] = out.terms["rec"] * float("nan")
        return out

    monkeypatch.setattr(FullPrecision, "training_losses", poisoned)
    overrides = TINY_TRAIN + ["callbacks.model_checkpoint.every_n_train_steps=2"]
    with pytest.raises(NonFiniteLossError, match="non-finite training loss at step 4"):
        train(compose_config(overrides, tmp_path))
    state, step = last_state(tmp_path)
    assert step == 4 and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, target)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": torch.tensor(2)}, target)
    monkeypatch.undo()
    assert io.load_checkpoint(target)["step"].item() == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class Payload:
    """An arbitrary pickled object, which weights_only loading must refuse."""


def test_checkpoints_load_with_weights_only(tmp_path):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "obj": Payload()}, evil)
    with pytest.raises(Exception, match="[Ww]eights only"):
        AtomicCheckpointIO().load_checkpoint(evil)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "nope.ckpt")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["bits.w=5"], r"bits\.w=5: expected one of \(2, 3, 4, 8, 32\)"),
        (["bits.a=1"], r"bits\.a=1"),
        (["method._target_=odm_sr.quant.nope.Nope"],
         r"method\._target_='odm_sr\.quant\.nope\.Nope' cannot be imported"),
        (["method=odm", "bits=w2a2", "method.init.j=50"], r"j"),
        (["method=odm", "bits=w2a2", "method.init.j=101"], r"j"),
        (["method=odm", "bits=w2a2", "method.lambda_m=-1e-5"], r"lambda_m"),
        (["model.scale=5"], r"model\.scale=5: expected one of \(2, 3, 4\)"),
        (["eval.pad_mode=zeros"], r"eval\.pad_mode='zeros': expected one of \('official', 'reflect', 'mirror'\)"),
    ],
)
def test_invalid_configs_fail_before_any_work(overrides, message, tmp_path):
    cfg = compose_config(TINY_TRAIN + overrides, tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not (tmp_path / "run").exists()  # nothing was built or written


def test_method_that_does_not_support_the_backbone_fails_before_any_work(tmp_path):
    cfg = compose_config(["model=rdn", "method=odm_fq", "bits=w4a4", "logger=csv"], tmp_path / "run")
    with pytest.raises(ValueError, match=r"method 'odm_fq' does not support backbone 'rdn'; supported: edsr"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_unknown_method_name_is_a_clear_compose_error(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="method"):
        compose_config(["method=nope"], tmp_path)


def test_cuda_rng_states_are_saved_and_restored(monkeypatch):
    """A resumed GPU run continues the CUDA generators too (drop-path, random draws on the device); simulated with
    stand-ins for torch.cuda's RNG functions, as this machine has no GPU."""
    from odm_sr.lit_module import SRLitModule
    from odm_sr.models import build_model
    from odm_sr.quant.base import FullPrecision

    states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda new: restored.append([s.clone() for s in new]))
    lit = SRLitModule(build_model("edsr", 2, n_resblocks=1, n_feats=8), FullPrecision(), {"lr": 1e-4})
    checkpoint: dict = {}
    lit.on_save_checkpoint(checkpoint)
    assert [s.tolist() for s in checkpoint["odm_sr_cuda_rng"]] == [[1, 2, 3], [4, 5]]
    lit.on_load_checkpoint(checkpoint)
    assert [[s.tolist() for s in r] for r in restored] == [[[1, 2, 3], [4, 5]]]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # another machine: warn, do not half-restore
    with pytest.warns(UserWarning, match="2 GPUs"):
        lit.on_load_checkpoint(checkpoint)
    assert len(restored) == 1
