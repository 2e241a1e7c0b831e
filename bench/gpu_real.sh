#!/usr/bin/env bash
# QAT from the official IMDN x4 weights on the GPU machine (bench/gpu_real.py): PAMS, DAQ, DDTB and ODM at W2A2,
# batch 16, LR patch 48, as many steps as fit, Set5/B100 after each; one process, under 9 minutes in all.
# Python 3.12 with torch, lightning, torchmetrics, ... but without hydra-core, omegaconf and antlr4 (and no
# network): their wheels (`make gpu-wheels` -> bench/gpu-wheels/, else shared/gpu-wheels/ or ../shared/gpu-wheels/)
# are installed into a temporary folder (bench/gpu_wheels.sh).
# Data and weights: $ODM_SR_DATA / $ODM_SR_MODELS, else ./shared/{data,models} (what `make gpu-real-shared` puts
# in the checkout for the device tool to carry), else ../shared/{data,models}.
#   bash bench/gpu_real.sh                 # on the GPU machine, from the repository root
#   bash bench/gpu_real.sh --dry-run       # every part for 2 steps on the CPU (tests run this)
# Extra arguments go to bench/gpu_real.py. Results: bench/results/gpu_real.json (gpu_real_dry_run.json),
# rewritten after each part. PYTHON picks the interpreter (default python3), LIMIT the hard time limit of the
# Python part (default 520 s; its own plan ends the runs by --budget 490 s).
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
. bench/gpu_wheels.sh
PYTHONUNBUFFERED=1 timeout --kill-after=5 "${LIMIT:-520}" "$PY" bench/gpu_real.py "$@"
