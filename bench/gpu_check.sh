#!/usr/bin/env bash
# GPU check (H100/H200, PyTorch preinstalled, no network): FP and ODM (2-bit) training steps of EDSR-baseline x4
# at the ODM recipe's batch 8 / LR patch 48, about a minute each, eager and torch.compile'd; prints it/s, step
# time and peak memory (torch.cuda.max_memory_allocated). Installs nothing; ends within 8 minutes (a hard
# `timeout` per part; each part also shortens its own timed window to fit).
#   PYTHONPATH=src bash bench/gpu_check.sh            # from the repository root
# Results: bench/results/gpu_check_<part>.json; the log is printed.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-src}"
PY="${PYTHON:-python}"
DURATION="${DURATION:-60}"
OUT="${OUT:-bench/results}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to PyTorch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1)); run this on a GPU machine" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
status=0
part() {  # part <name> <timeout s> <variant> <mode>
  echo "== $1 (timeout $2 s)"
  timeout --kill-after=5 "$2" "$PY" bench/step_time.py --device cuda --variants "$3" --modes "$4" \
    --duration "$DURATION" --budget "$(( $2 - 5 ))" --out "$OUT/gpu_check_$1.json" || { echo "!! $1 failed or timed out (rc $?)"; status=1; }
}
part fp_eager 90 fp eager          # ~15 s start-up + 60 s timed
part odm_eager 95 odm eager
part fp_compile 140 fp compile     # + compilation of the forward and backward graphs
part odm_compile 150 odm compile   # total at most 475 s
exit $status
