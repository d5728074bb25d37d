#!/usr/bin/env bash
# The GPU check, as it runs on the GPU machine: no install, no Ray, no network; results in $OUT.
#   bash scripts/gpu_check.sh                # CUDA: exactness, bf16 throughput of big shapes, bench keys
#   bash scripts/gpu_check.sh --cpu --tiny   # dry run of every code path on the CPU (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$PY" scripts/gpu_check.py "$@"
