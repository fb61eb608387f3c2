"""precision= of every top-k. "exact" runs the float32/float64 kernels;
"bf16" the screened op (exemplar::screened_topk, csrc/screen.h): every score
tile from bfloat16 operands (AMX / AVX512-BF16 on the CPU, tensor cores on a
GPU) with a rigorous per-pair error bound, and exact rescoring of whatever the
bound cannot rule out, so the indices are exact's (up to rounding-level ties)
and the values exact scores; operands the bound is not for (NaN, inf, scales
beyond float64) get the exact path inside the op. "auto" (the default) takes
the screen only where bench/screen_cpu.py measured it faster than exact
(bench/RESULTS.md, "Screens on the CPU"): on a CPU with bf16 matrix
instructions, with enough tests, training rows and GEMM depth per call (C * D'
on the general path, D' on the rank-1 path) to fill its GEMMs. Everywhere
else, including every GPU until the screen is timed on one, it is exact."""
from __future__ import annotations

import torch

PRECISIONS = ("auto", "exact", "bf16")
# Below these the screen's fixed costs (rounding the training rows, the exact
# rescoring) outweigh its faster GEMMs (bench/RESULTS.md). General path:
# measured faster at C * D' = 5,130 (W-CPU) and 5,770 (the Fashion-MNIST
# ConvNet head), 12x slower at 130 (the IMDB BERT head, N = 6,000). Rank-1
# path (depth D'): faster at 513 and 577, slower at 65; untried between.
AUTO_MIN_TESTS = 512
AUTO_MIN_TRAIN = 16_384
AUTO_MIN_DEPTH = 4_096
AUTO_MIN_DEPTH_RANK1 = 512
AUTO_MAX_K = 64


def check_precision(precision) -> None:
    """Refuses a precision= that is not one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# Read once, at import: resolve() runs inside torch.compile'd code, which cannot read files.
CPU_HAS_BF16_MATMUL = cpu_has_bf16_matmul()


def resolve(precision: str, general: bool, tests: int, train: int, depth: int, k: int,
            device: torch.device) -> str:
    """The precision a top-k call runs at: "auto" made "exact" or "bf16" for
    this call's shape (general path or not, T, N, GEMM depth: C * D' general,
    D' rank-1; k) and device."""
    check_precision(precision)
    if precision != "auto":
        return precision
    screen_pays = (device.type == "cpu" and CPU_HAS_BF16_MATMUL and tests >= AUTO_MIN_TESTS
                   and train >= AUTO_MIN_TRAIN and k <= AUTO_MAX_K
                   and depth >= (AUTO_MIN_DEPTH if general else AUTO_MIN_DEPTH_RANK1))
    return "bf16" if screen_pays else "exact"
