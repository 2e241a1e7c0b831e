#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) as it must run on the GPU machine: Python 3.12 with torch, lightning,
# torchmetrics, timm, einops, onnxruntime but without hydra-core, omegaconf and antlr4 (and no network). Their
# wheels (`make gpu-wheels` -> bench/gpu-wheels/, else shared/ or ../shared/gpu-wheels/) are installed into a
# temporary folder (bench/gpu_wheels.sh); nothing is installed into the machine's Python.
#   bash bench/gpu_check.sh                 # on the GPU machine, from the repository root (< 5 min in all)
#   bash bench/gpu_check.sh --dry-run       # every part for one step on the CPU (tests run this)
# Extra arguments go to bench/gpu_check.py. Results: bench/results/gpu_check.json (gpu_check_dry_run.json),
# rewritten after each part. PYTHON picks the interpreter (default python3), LIMIT the hard time limit.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
. bench/gpu_wheels.sh
timeout --kill-after=5 "${LIMIT:-290}" "$PY" bench/gpu_check.py "$@"
