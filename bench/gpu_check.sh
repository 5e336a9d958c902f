#!/usr/bin/env bash
# The one prepared GPU check (bench/gpu_check.py): engine-level latency of every model in float32
# and bfloat16, clicks on a 512x512x300 volume, uncertainty N=8 and N=100, SAM3D's decoder training and
# FastSAM3D's encoder distillation (teacher targets, student iteration). Under 8 minutes on an
# H100/H200 with only PyTorch preinstalled. What else it needs travels as wheels in .whl/ (monai,
# nibabel and their needs; see README "GPU check"); this project's lib is put on PYTHONPATH.
# --dry-run: small configurations on the CPU (the test suite runs it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site .whl/*.whl
  export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_check.py "$@"
