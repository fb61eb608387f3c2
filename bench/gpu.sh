#!/usr/bin/env bash
# One command for a GPU machine (the device tool's H100/H200, or your own):
# build with the machine's torch, run the CUDA tests, time the headline
# workload and print the table for bench/RESULTS.md.
#   bash bench/gpu.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps -e .
python3 -c "import exemplar, torch; assert exemplar.cuda_compiled(); print(torch.cuda.get_device_name())"
python3 -m pytest -m cuda tests -q
if command -v compute-sanitizer >/dev/null; then
  # A small CUDA subset under each checker: the fused kernel, the streamed path, residuals.
  for tool in memcheck racecheck synccheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 1 python3 -m pytest -q tests/test_cuda.py \
      -k "special_values_and_ties_match_cpu and 300 or residuals or opcheck_fused"
  done
else
  echo "compute-sanitizer not found: sanitizer runs skipped" >&2
fi
python3 bench/gpu_bench.py "$@"
