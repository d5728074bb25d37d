#!/usr/bin/env bash
# Create or reuse .venv with the project installed; a no-op when pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.ivg-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # Pin torch first: 2.13.0 is a local CPU wheel here and a CUDA build on GPU machines;
  # an open range would pull a multi-GB CUDA build onto CPU boxes.
  .venv/bin/python -m pip install -q "torch==${IVG_TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
