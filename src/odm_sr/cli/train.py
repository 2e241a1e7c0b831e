"""`odm-sr-train`: compose ``conf/train.yaml`` with the command line's overrides (Hydra), then
``odm_sr.train.train``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from odm_sr.config import CONFIG_DIR, register_resolvers
from odm_sr.console import quiet_known_noise
from odm_sr.train import train

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_known_noise()  # Lightning tips and known deprecation texts: console shows progress and results
    train(cfg)




if __name__ == "__main__":
    main()
