# Sourced by bench/gpu_check.sh and bench/gpu_real.sh (from the repository root, PY set): installs the wheels the
# GPU machine lacks (hydra-core, omegaconf, antlr4) from $GPU_WHEELS, else bench/gpu-wheels, shared/gpu-wheels or
# ../shared/gpu-wheels, into a temporary folder (removed on exit) with pip --no-index --no-deps --target, and puts
# src and that folder on PYTHONPATH. Nothing is installed into the machine's Python.
WHEELS="${GPU_WHEELS:-bench/gpu-wheels}"
for alt in shared/gpu-wheels ../shared/gpu-wheels; do
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then WHEELS=$alt; fi
done
SITE="$(mktemp -d)"
trap 'rm -rf "$SITE"' EXIT
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl \
    || { echo "$0: could not install the wheels of $WHEELS" >&2; exit 3; }
else
  echo "$0: no wheels in bench/gpu-wheels, shared/gpu-wheels or ../shared/gpu-wheels (run make gpu-wheels);" \
       "using the interpreter's own packages" >&2
fi
export PYTHONPATH="src:$SITE${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled
