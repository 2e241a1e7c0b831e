"""`odm-sr-train`: compose ``conf/train.yaml`` with the command line's overrides (Hydra), then
``odm_sr.train.train``."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from odm_sr.config import CONFIG_DIR, register_resolvers
from odm_sr.console import one_line_errors, quiet_known_noise
from odm_sr.run_guard import RunTerminated
from odm_sr.train import train

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_known_noise()  # Lightning tips and known deprecation texts: console shows progress and results
    try:
        with one_line_errors("odm-sr-train"):  # a bad value, a missing file: one line (HYDRA_FULL_ERROR=1: traceback)
            train(cfg)
    except RunTerminated as stop:  # exit status 143, the message instead of a traceback
        print(stop, file=sys.stderr)
        raise


if __name__ == "__main__":
    main()
