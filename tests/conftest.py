"""Shared fixtures. Keep this file small: add a fixture here only when several test folders use it."""

import os
from pathlib import Path

import pytest
import torch

from odm_sr.data.registry import DATA_ENV_VAR, default_data_root
from odm_sr.models.weights import MODELS_ENV_VAR, default_models_root

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each, not one per core
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data root (``default_data_root()``); skips the test where it is absent."""
    root = default_data_root()
    if root is None or not (root / "benchmark").is_dir():
        pytest.skip(
            f"real data not found (looked at ${DATA_ENV_VAR}, then <repo>/../shared/data; "
            f"got {root}): these tests need benchmark/Set5 etc."
        )
    return root


@pytest.fixture(scope="session")
def models_root() -> Path:
    """The official FP weights (``default_models_root()``: IMDN, PAN); skips the test where they are absent."""
    root = default_models_root()
    if root is None or not (Path(root) / "imdn").is_dir():
        pytest.skip(f"official weights not found (looked at ${MODELS_ENV_VAR}, then <repo>/../shared/models; "
                    f"got {root}): these tests need imdn/IMDN_x4.pth etc.")
    return Path(root)
