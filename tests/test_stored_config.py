"""A config read from a file is data (issue 22 items 1-2): crafted checkpoints and ``.odmq`` files whose stored
config would run code are refused by every command that reads them, naming the file and the key, and nothing
outside the output folder is created, changed or emptied. The crafted files are generated here."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_config
from omegaconf import OmegaConf
from PIL import Image

from odm_sr.stored_config import StoredConfigError, package_hydra_keys, stored_config

TINY = ["model=edsr_small", "model.kwargs.n_resblocks=1", "model.kwargs.n_feats=8", "model.scale=2", "bits=w4a4"]


class _Payload:
    """Unpickling it writes ``marker`` (what a pickle extracted and loaded with weights_only=False could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _open_nested(cfg: dict, world: Path, crafted: Path) -> str:
    cfg["model"]["kwargs"]["n_feats"] = {"_target_": "builtins.open", "file": str(world / "victim.txt"), "mode": "w"}
    return "model.kwargs.n_feats._target_"


def _copyfile_in_list(cfg: dict, world: Path, crafted: Path) -> str:
    cfg["model"]["kwargs"]["extra"] = [{"_target_": "shutil.copyfile", "src": str(world / "victim.txt"),
                                        "dst": str(world / "copied.txt")}]
    return "model.kwargs.extra.0._target_"


def _zip_chain(cfg: dict, world: Path, crafted: Path) -> str:
    """torch.load(weights_only=False) of a pickle that ZipFile.extract takes out of the crafted file itself."""
    member = {"_target_": "zipfile.ZipFile.extract",
              "_args_": [{"_target_": "zipfile.ZipFile", "file": str(crafted)}, _member(crafted), str(world / "x")]}
    cfg["model"]["kwargs"]["n_feats"] = {"_target_": "torch.load", "f": member, "weights_only": False}
    return "model.kwargs.n_feats._target_"


def _resolver(cfg: dict, world: Path, crafted: Path) -> str:
    cfg["model"]["name"] = "${unique_dir:" + str(world / "made") + "}"  # a custom resolver that creates a folder
    return "model.name"


def _env_target(cfg: dict, world: Path, crafted: Path) -> str:
    cfg["model"]["kwargs"]["n_feats"] = {"_target_": "${oc.env:ODM_SR_TEST_TARGET}",
                                         "file": str(world / "victim.txt"), "mode": "w"}
    return "model.kwargs.n_feats._target_"


def _method_target(cfg: dict, world: Path, crafted: Path) -> str:
    cfg["method"]["_target_"] = "builtins.exec"
    return "method._target_"


PAYLOADS = {"open_nested": _open_nested, "copyfile_in_list": _copyfile_in_list, "zip_chain": _zip_chain,
            "resolver": _resolver, "env_target": _env_target, "method_target": _method_target}


def _member(crafted: Path) -> str:
    return f"{crafted.stem}/payload.pkl"  # torch reads a .ckpt whose members all lie in its one folder


def _attach_pickle(crafted: Path, world: Path) -> None:
    """Add the pickle to the crafted .ckpt (a zip) as a member."""
    with zipfile.ZipFile(crafted, "a") as zf:
        zf.writestr(_member(crafted), pickle.dumps(_Payload(world / "pwned.txt")))


def _zip_body(crafted: Path, world: Path) -> bytes:
    """A zip holding the pickle whose 32-byte comment is cut off: the .odmq's trailing SHA-256 takes its place,
    so the file passes its checksum and zipfile still reads it (zipfile reads a zip after any other bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(_member(crafted), pickle.dumps(_Payload(world / "pwned.txt")))
        zf.comment = bytes(32)
    return buffer.getvalue()[:-32]


def craft_checkpoint(payload: str, world: Path, tmp_path: Path) -> tuple[Path, str]:
    """A .ckpt like odm-sr-train's (resolved config, no weights needed) with ``PAYLOADS[payload]`` in its config."""
    cfg = OmegaConf.to_container(compose_config(TINY + ["method=odm"], tmp_path / "cfg"), resolve=True)
    crafted = world / f"{payload}.ckpt"
    key = PAYLOADS[payload](cfg, world, crafted)
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": cfg}}, crafted)
    _attach_pickle(crafted, world)
    return crafted, key


def craft_packed(payload: str, world: Path, tmp_path: Path) -> tuple[Path, str]:
    """An .odmq whose header holds ``PAYLOADS[payload]`` in its config (and an .onnx beside it)."""
    from odm_sr.export.packing import frame

    cfg = OmegaConf.to_container(compose_config(TINY + ["method=odm"], tmp_path / "cfg"), resolve=True)
    crafted = world / f"{payload}.odmq"
    key = PAYLOADS[payload](cfg, world, crafted)
    crafted.write_bytes(frame({"cfg": cfg, "names_sha1": "0" * 40, "counts": [0, 0, 0]}, _zip_body(crafted, world)))
    crafted.with_suffix(".onnx").write_bytes(b"not read before the .odmq")
    return crafted, key


def _upscale(path: Path, world: Path, out: Path, engine: str = "torch") -> None:
    from odm_sr.upscale import upscale_file

    upscale_file(path, world / "lr.png", out / "sr.png", engine=engine, threads=1)


def _eval(path: Path, world: Path, out: Path) -> None:
    from odm_sr.eval import evaluate

    evaluate(compose_config([f"ckpt={path}", "data=sample", "eval.bicubic_row=false"], out, "eval"))


def _export(path: Path, world: Path, out: Path) -> None:
    from odm_sr.cli.export import main

    main([str(path), str(out / "model.onnx")])


def _analyze(path: Path, world: Path, out: Path) -> None:
    from odm_sr.cli.analyze import main

    main(["wstats", "--ckpt", str(path), "--out", str(out)])


CKPT_COMMANDS = {"upscale": _upscale, "eval": _eval, "export": _export, "analyze": _analyze}
PACKED_COMMANDS = {"upscale_odmq": lambda p, w, o: _upscale(p, w, o, "onnx"),
                   "upscale_onnx": lambda p, w, o: _upscale(p.with_suffix(".onnx"), w, o, "onnx")}


def _tree(root: Path, skip: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*")) if skip not in (p, *p.parents)}


@pytest.fixture
def world(tmp_path, monkeypatch) -> Path:
    """A folder of files the payloads aim at, and the LR image of the upscale commands."""
    monkeypatch.setenv("ODM_SR_TEST_TARGET", "builtins.open")
    world = tmp_path / "world"
    world.mkdir()
    (world / "victim.txt").write_text("keep me")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(world / "lr.png")
    return world


def _assert_refused(command, crafted: Path, key: str, world: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = _tree(tmp_path, out)
    with pytest.raises((ValueError, SystemExit)) as err:
        command(crafted, world, out)
    message = str(err.value)
    assert str(crafted) in message and repr(key) in message and "\n" not in message, message
    assert _tree(tmp_path, out) == before  # nothing created, changed or emptied outside the output


@pytest.mark.parametrize("command", sorted(CKPT_COMMANDS))
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_a_checkpoint_whose_config_would_run_code_is_refused(payload, command, world, tmp_path):
    crafted, key = craft_checkpoint(payload, world, tmp_path)
    _assert_refused(CKPT_COMMANDS[command], crafted, key, world, tmp_path)


@pytest.mark.parametrize("command", sorted(PACKED_COMMANDS))
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_a_packed_file_whose_config_would_run_code_is_refused(payload, command, world, tmp_path):
    crafted, key = craft_packed(payload, world, tmp_path)
    _assert_refused(PACKED_COMMANDS[command], crafted, key, world, tmp_path)


@pytest.mark.parametrize("kind", ["ckpt", "odmq"])
def test_the_zip_chain_would_run_the_pickle_if_instantiated(kind, world, tmp_path):
    """The crafted chain is real: instantiating its node (what the old readers did) writes the marker."""
    import hydra

    from odm_sr.export.packing import read_header

    if kind == "ckpt":
        crafted, _ = craft_checkpoint("zip_chain", world, tmp_path)
        cfg = torch.load(crafted, weights_only=True)["hyper_parameters"]["cfg"]
    else:
        crafted, _ = craft_packed("zip_chain", world, tmp_path)
        cfg = read_header(crafted.read_bytes(), str(crafted))["cfg"]  # the checksum holds
    node = cfg["model"]["kwargs"]["n_feats"]
    with pytest.raises(Exception):  # noqa: B017 - torch.load fails after the pickle ran (not a checkpoint)
        hydra.utils.instantiate(node)
    assert (world / "pwned.txt").is_file()


@pytest.mark.parametrize("method", ["fp", "odm", "lsq", "odm_fq", "pams", "daq", "ddtb"])
def test_the_configs_of_the_package_pass(method, tmp_path):
    bits = "bits=fp32" if method == "fp" else "bits=w4a4"
    cfg = compose_config([*TINY[:-1], f"method={method}", bits, "logger=wandb"], tmp_path)
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert OmegaConf.to_container(stored_config(raw, "x.ckpt"), resolve=True) == raw


def test_references_to_own_keys_are_resolved_and_checked_after(tmp_path):
    """``${..lr}`` (a key of the same config) is data; a reference that puts a foreign class at a Hydra key
    is refused once resolved."""
    raw = OmegaConf.to_container(compose_config(TINY + ["method=odm", "optim.lr=3e-4"], tmp_path), resolve=True)
    raw["optim"]["optimizer"]["lr"] = "${..lr}"  # as conf/optim/adam.yaml holds it, unresolved
    assert stored_config(raw, "x.ckpt").optim.optimizer.lr == 3e-4
    raw["run_name"] = "builtins.open"
    raw["optim"]["optimizer"]["_target_"] = "${run_name}"
    with pytest.raises(StoredConfigError, match=r"x\.ckpt: stored config key 'optim\.optimizer\._target_' = "
                                                r"'builtins\.open' is not one of odm-sr's own"):
        stored_config(raw, "x.ckpt")


def test_a_stored_config_of_tensors_or_no_model_is_refused():
    with pytest.raises(StoredConfigError, match="x.ckpt: stored config key 'model.w' holds a Tensor"):
        stored_config({"model": {"w": torch.zeros(1)}}, "x.ckpt")
    with pytest.raises(StoredConfigError, match="x.ckpt: the stored config is not an odm-sr training config"):
        stored_config(["model"], "x.ckpt")


def test_the_allow_list_is_read_from_the_package_configs():
    allowed = package_hydra_keys()
    assert allowed[("model", "_target_")] == ("odm_sr.models.build.backbone",)
    assert "odm_sr.quant.pams.PAMS" in allowed[("method", "_target_")]
    assert allowed[("optim.optimizer", "_target_")] == ("torch.optim.Adam",)
    assert ("model.kwargs", "_target_") not in allowed and not any(k == "_args_" for _, k in allowed)


@pytest.mark.parametrize("stored", [{"_target_": "odm_sr.builders.backbone"}, {}])
def test_an_older_run_naming_the_model_builder_at_its_old_place_or_not_at_all_still_builds(stored, tmp_path):
    cfg = OmegaConf.to_container(compose_config(["experiment=main_fp"], tmp_path), resolve=True)
    cfg["model"].pop("_target_")
    cfg["model"].update(stored)
    assert stored_config(cfg, "old.ckpt").model._target_ == "odm_sr.models.build.backbone"
    with pytest.raises(StoredConfigError, match="'odm_sr.builders.build_backbone' is not one of odm-sr's own"):
        stored_config({**cfg, "model": {**cfg["model"], "_target_": "odm_sr.builders.build_backbone"}}, "x.ckpt")
