"""Shared fixtures. Keep this file small: add a fixture here only when several test folders use it."""

import os
from pathlib import Path

import pytest

# torch and odm_sr are imported where needed, not at the top: `make test`'s controlling process loads this file
# too, and has no use for the ~10 s their imports take

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each, not one per core
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and so do the commands the tests start


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data root (``default_data_root()``); skips the test where it is absent."""
    from odm_sr.data.registry import DATA_ENV_VAR, default_data_root

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
    from odm_sr.models.weights import MODELS_ENV_VAR, default_models_root

    root = default_models_root()
    if root is None or not (Path(root) / "imdn").is_dir():
        pytest.skip(f"official weights not found (looked at ${MODELS_ENV_VAR}, then <repo>/../shared/models; "
                    f"got {root}): these tests need imdn/IMDN_x4.pth etc.")
    return Path(root)


# The heaviest test files (seconds of one worker, `make test` on the idle 2-core machine), run first: `--dist
# loadfile` hands out whole files in collection order, so a heavy file collected last would run alone at the end
# while the other worker idles. Order only; every file still runs.
HEAVY_FIRST = ("test_sweep.py", "test_configs.py", "test_ddp_train.py", "test_run_guard.py", "test_gpu_check.py",
               "test_console.py", "test_config_keys.py", "test_wheel.py", "test_notebooks.py", "test_export.py",
               "test_real_networks.py", "test_ddp_methods.py", "test_gpu_real.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))  # stable: the rest keep their order
