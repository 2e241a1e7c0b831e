"""`load_pretrained`: official wrappers, Lightning checkpoints, quantizer keys, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from odm_sr.models import build_model, guess_scale, is_quantizer_key, load_pretrained
from odm_sr.quant.quantizer import Quantizer

TINY_SWINIR = dict(embed_dim=12, depths=(2,), num_heads=(2,), img_size=16)
TINY_HAT = dict(embed_dim=24, depths=(2,), num_heads=(2,), compress_ratio=6, squeeze_factor=6, img_size=32)


def randomized_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


def assert_loaded(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())


def test_plain_edsr_pt_file_loads_strictly(tmp_path) -> None:
    state = randomized_state(build_model("edsr_baseline", 2), seed=1)
    path = tmp_path / "edsr_baseline_x2-1bc95232.pt"
    torch.save(state, path)
    model = load_pretrained(build_model("edsr_baseline", 2), path)
    assert_loaded(model, state)


@pytest.mark.parametrize("wrapper", ["params", "params_ema"])
def test_basicsr_wrappers_load_strictly(tmp_path, wrapper: str) -> None:
    state = randomized_state(build_model("swinir_light", 2), seed=2)
    path = tmp_path / "002_lightweightSR_DIV2K_s64w8_SwinIR-S_x2.pth"
    torch.save({wrapper: state}, path)
    assert_loaded(load_pretrained(build_model("swinir_light", 2), path), state)


def test_params_ema_is_preferred_over_params() -> None:
    model = build_model("hat_s", 2, **TINY_HAT)
    ema, plain = randomized_state(model, seed=3), randomized_state(model, seed=4)
    load_pretrained(model, {"params": plain, "params_ema": ema})
    assert_loaded(model, ema)


def test_hat_params_ema_file(tmp_path) -> None:
    state = randomized_state(build_model("hat_s", 4, **TINY_HAT), seed=5)
    path = tmp_path / "HAT-S_SRx4.pth"
    torch.save({"params_ema": state}, path)
    assert_loaded(load_pretrained(build_model("hat_s", 4, **TINY_HAT), path), state)


def test_lightning_checkpoint_strips_net_prefix(tmp_path) -> None:
    model = build_model("rdn", 2, D=2, C=2, G=8, G0=8)
    state = randomized_state(model, seed=6)
    checkpoint = {"epoch": 3, "state_dict": {**{f"net.{k}": v for k, v in state.items()},
                                             "teacher.head.0.weight": torch.zeros(1)}}
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    assert_loaded(load_pretrained(model, path), state)


def test_quantizer_keys_are_ignored_on_both_sides() -> None:
    model = build_model("edsr", 2, n_resblocks=2, n_feats=8)
    state = randomized_state(model, seed=7)

    class FakeQuantizer(Quantizer):  # the model side is recognised by the base class, not by the module name
        def __init__(self) -> None:
            super().__init__()
            self.lower = nn.Parameter(torch.tensor(-3.0))

    model.body[0].body[0].act_quant = FakeQuantizer()  # the model side has quantizer parameters
    with_quant = {**state, "body.1.body.2.weight_quant.scale": torch.ones(1), "quant.alpha": torch.ones(1)}
    load_pretrained(model, with_quant)
    assert_loaded(model, state)
    assert model.body[0].body[0].act_quant.lower.item() == -3.0


def test_model_side_quantizers_are_found_by_class_under_any_name() -> None:
    model = build_model("edsr", 2, n_resblocks=2, n_feats=8)
    state = randomized_state(model, seed=8)

    class Clip(Quantizer):
        def __init__(self) -> None:
            super().__init__()
            self.bound = nn.Parameter(torch.tensor(2.0))

    model.body[0].clip = Clip()  # no quantizer-like name: only the class says what it is
    load_pretrained(model, state)  # strict: the model's body.0.clip.bound is not a missing key
    assert_loaded(model, state)
    assert model.body[0].clip.bound.item() == 2.0


def test_quantizer_key_rule() -> None:
    for key in ("body.0.body.0.act_quant.lower", "layers.0.conv.weight_quantizer.s", "quant.alpha",
                "head.0.quant_act1.alpha", "x.quantizer.bound"):
        assert is_quantizer_key(key), key
    for key in ("body.0.body.0.weight", "relative_position_index_SA", "layers.0.quant", "conv_quant_free.w"):
        assert not is_quantizer_key(key), key


def test_wrong_scale_names_both_scales() -> None:
    state = build_model("edsr_baseline", 2).state_dict()
    with pytest.raises(ValueError, match="checkpoint looks like scale 2, model is scale 4") as info:
        load_pretrained(build_model("edsr_baseline", 4), state)
    assert "missing key" in str(info.value) and "tail.0.2.weight" in str(info.value)


def test_shape_mismatch_reports_key_and_shapes(tmp_path) -> None:
    path = tmp_path / "swinir_x3.pth"
    torch.save({"params": build_model("swinir_light", 3, **TINY_SWINIR).state_dict()}, path)
    with pytest.raises(ValueError) as info:
        load_pretrained(build_model("swinir_light", 2, **TINY_SWINIR), path)
    message = str(info.value)
    assert str(path) in message and "looks like scale 3, model is scale 2" in message
    assert "upsample.0.weight: checkpoint (27, 12, 3, 3), model (12, 12, 3, 3)" in message


def test_unexpected_and_missing_keys_are_reported() -> None:
    model = build_model("edsr", 2, n_resblocks=2, n_feats=8)
    state = dict(model.state_dict())
    state["body.9.weight"] = torch.zeros(1)
    del state["head.0.bias"]
    with pytest.raises(ValueError, match=r"1 missing key\(s\), e.g. \['head.0.bias'\]") as info:
        load_pretrained(model, state)
    assert "1 unexpected key(s), e.g. ['body.9.weight']" in str(info.value)
    load_pretrained(model, state, strict=False)  # non-strict loads what matches


def test_unreadable_and_non_checkpoint_files(tmp_path) -> None:
    model = build_model("edsr", 2, n_resblocks=1, n_feats=8)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt: cannot be read"):
        load_pretrained(model, garbage)
    a_list = tmp_path / "list.pt"
    torch.save([1, 2, 3], a_list)
    with pytest.raises(ValueError, match="list.pt: not a checkpoint"):
        load_pretrained(model, a_list)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_pretrained(model, tmp_path / "missing.pt")


@pytest.mark.parametrize("name", ["edsr_baseline", "rdn", "swinir_light", "swinir_classical", "hat_s"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_guess_scale_from_tail_shapes(name: str, scale: int) -> None:
    overrides = {"rdn": dict(D=1, C=1, G=8, G0=8), "swinir_light": TINY_SWINIR,
                 "swinir_classical": TINY_SWINIR, "hat_s": TINY_HAT}.get(name, {})
    assert guess_scale(build_model(name, scale, **overrides).state_dict()) == scale


@pytest.mark.parametrize(("method", "bits", "refused"), [("odm", {"w": 2, "a": 2}, True), ("pams", {"w": 4, "a": 4},
                                                         True), ("fp", {"w": 32, "a": 32}, False)])
def test_a_quantized_odm_sr_checkpoint_is_refused_as_pretrained(method, bits, refused, tmp_path) -> None:
    """``model.pretrained=<a QAT run's .ckpt>`` (issue 22 item 19): its latent float weights are no FP model,
    and the results table would label them "FP (model.pretrained)"; an FP run's checkpoint still loads."""
    model = build_model("edsr", 2, n_resblocks=2, n_feats=8)
    state = randomized_state(model, seed=9)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()},
                "hyper_parameters": {"cfg": {"method": {"name": method}, "bits": bits}}}, path)
    if not refused:
        assert_loaded(load_pretrained(model, path), state)
        return
    with pytest.raises(ValueError, match=rf"^model\.pretrained={path}: holds a quantized network \(an odm-sr "
                                         rf"checkpoint of method={method} bits=w{bits['w']}a{bits['a']}\)"):
        load_pretrained(model, path)
