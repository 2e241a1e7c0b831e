"""`odm-sr-eval`: compose ``conf/eval.yaml`` with the command line's overrides (Hydra), then
``odm_sr.eval.evaluate``; prints the table and writes ``eval.json`` (``output_json=``)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from odm_sr.config import CONFIG_DIR, register_resolvers
from odm_sr.console import one_line_errors, quiet_known_noise
from odm_sr.eval import evaluate
from odm_sr.evaluation import metrics_table, rows_as_json
from odm_sr.files import write_json

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_known_noise()  # Lightning tips and known deprecation texts: console shows progress and results
    with one_line_errors("odm-sr-eval"):  # a bad value, a missing file: one line (HYDRA_FULL_ERROR=1: traceback)
        rows = evaluate(cfg)
        print("\n" + metrics_table(rows, list(cfg.data.test)) + "\n")
        out = Path(cfg.output_json)
        write_json(out, rows_as_json(rows))  # strict JSON: a perfect reconstruction's inf PSNR as "inf"
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
