"""Host syncs of ``SRLitModule.training_step`` per method and backbone, on steps that log and steps that do not
(issue 10): the table of bench/README.md "Ops and host syncs per step".

    python bench/host_syncs.py

Runs ``tests/test_host_syncs.py``'s harness (tiny EDSR/RDN/SwinIR-light, CPU, 8 steps in 2-step epochs,
log_every_n_steps=4, Adam's CPU-side step counter left out) and prints, per case, the syncs of each step.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]

from test_host_syncs import BACKBONES, LOG_EVERY, METHODS, STEPS, _syncs_per_step  # noqa: E402


def main() -> None:
    print(f"steps 0-{STEPS - 1}, logging steps: {[i for i in range(STEPS) if i % LOG_EVERY == LOG_EVERY - 1]}")
    print("| method | backbone | syncs per step | non-logging (steady) | logging |")
    print("|---|---|---|---|---|")
    for backbone in BACKBONES:
        for method in METHODS:
            with tempfile.TemporaryDirectory() as tmp:
                rows, _ = _syncs_per_step(method, backbone, Path(tmp))
            per_step = [n for _, n, _ in rows]
            steady = sorted({n for i, (logged, n, _) in enumerate(rows) if not logged and i >= 3})
            logging = sorted({n for logged, n, _ in rows if logged})
            print(f"| {method} | {backbone} | {per_step} | {steady} | {logging} |", flush=True)


if __name__ == "__main__":
    main()
