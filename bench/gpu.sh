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
python3 bench/gpu_bench.py "$@"
