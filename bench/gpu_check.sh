#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) as it must run on the GPU machine: Python 3.12 with torch, lightning,
# torchmetrics, timm, einops, onnxruntime but without hydra-core, omegaconf and antlr4 (and no network). Their
# wheels (`make gpu-wheels` -> bench/gpu-wheels/, or ../shared/gpu-wheels/) are installed into a temporary
# folder with pip --no-index --no-deps --target; nothing is installed into the machine's Python.
#   bash bench/gpu_check.sh                 # on the GPU machine, from the repository root (< 5 min in all)
#   bash bench/gpu_check.sh --dry-run       # every part for one step on the CPU (tests run this)
# Extra arguments go to bench/gpu_check.py. Results: bench/results/gpu_check.json (gpu_check_dry_run.json),
# rewritten after each part. PYTHON picks the interpreter (default python3), LIMIT the hard time limit.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${GPU_WHEELS:-bench/gpu-wheels}"
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then WHEELS=../shared/gpu-wheels; fi
SITE="$(mktemp -d)"
trap 'rm -rf "$SITE"' EXIT
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_check: could not install the wheels of $WHEELS" >&2; exit 3; }
else
  echo "gpu_check: no wheels in bench/gpu-wheels or ../shared/gpu-wheels (run make gpu-wheels); using the" \
       "interpreter's own packages" >&2
fi
export PYTHONPATH="src:$SITE${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled
timeout --kill-after=5 "${LIMIT:-290}" "$PY" bench/gpu_check.py "$@"
