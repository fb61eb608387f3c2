"""Headline GPU benchmark (issue: N=1,000,000 train, T=10,000 test, D=512,
C=10, k=10, theta-RelatIF with K-FAC): exemplar's top-k on CUDA (the streamed
default, the fused kernel, kernel="fused", and the bf16 screen,
precision=...) vs the chunked
pure-PyTorch baseline and vs cuBLAS float32 GEMMs of the same flop count, all
timed in this run with CUDA events (median of 3 after a warm-up).

    python3 bench/gpu_bench.py [--quick]"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import baselines  # noqa: E402
from exemplar import ops  # noqa: E402
from workloads import theta_relatif_operands  # noqa: E402


def timed(fn, repeats=3):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2], out


def peak_extra(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def cublas_same_flops(T, N, K, chunk=65536):
    """float32 (T, K) @ (K, chunk) GEMMs covering N columns: 2*T*N*K flops."""
    a = torch.randn(T, K, device="cuda")
    b = torch.randn(K, chunk, device="cuda")
    out = torch.empty(T, chunk, device="cuda")
    full, rest = divmod(N, chunk)

    def run():
        for _ in range(full):
            torch.mm(a, b, out=out)
        if rest:
            torch.mm(a, b[:, :rest])
    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="N=100k, T=1k")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # same precision as our float32 kernel
    N, T, D, C, k = (100_000, 1_000, 512, 10, 10) if args.quick else (1_000_000, 10_000, 512, 10, 10)
    Dp = D + 1
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; N={N:,} T={T:,} D={D} C={C} k={k}")
    rows = []
    for kfac_damping in ("eigenbasis", "factored"):
        path, operands = theta_relatif_operands(N, T, D, C, kfac_damping, device="cuda")
        inputs = sum(x.numel() * x.element_size() for x in operands)
        op = ops.topk if path == "general" else ops.topk_rank1
        if path == "general":
            chunked = lambda x=operands: baselines.chunked_general(*x, k=k, chunk=8192)
            K = C * Dp
        else:
            chunked = lambda x=operands: baselines.chunked_rank1(*x, k=k, chunk=65536)
            K = C + Dp
        flops = 2 * T * N * K
        t_chunked, (v_chunked, _) = timed(chunked)
        t_cublas, _ = timed(cublas_same_flops(T, N, K))
        # The CUDA default, the fused kernel by name, and the bf16 screen (exact answers).
        variants = [("streamed", {"kernel": "streamed"}), ("fused", {"kernel": "fused"}),
                    ("bf16 screen", {"precision": "bf16"})]
        _, exact_indices = op(*operands, k, True)
        for name, options in variants:
            ours = lambda op=op, x=operands, options=options: op(*x, k, True, **options)
            t_ours, (v_ours, i_ours) = timed(ours)
            mem = peak_extra(ours)
            agree = float((v_ours - v_chunked).abs().max() / v_chunked.abs().max())
            same = float((i_ours == exact_indices).double().mean())
            name = f"{name} ({same:.4f} of indices = exact)"
            rows.append((f"{path} ({kfac_damping} damping), {name}", t_ours, T * N / t_ours,
                         flops / t_ours / 1e12, flops / t_cublas / 1e12, t_chunked / t_ours, mem / 2**20,
                         inputs / 2**20, agree))
        del operands
        torch.cuda.empty_cache()
    print("| path | time s | pairs/s | TFLOP/s | cuBLAS fp32 TFLOP/s (same flops) | x chunked | "
          "peak extra MiB | inputs MiB | max rel diff vs chunked |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.3g} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:.0f} | "
              f"{r[7]:.0f} | {r[8]:.1e} |")


if __name__ == "__main__":
    main()
