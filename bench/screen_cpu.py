"""Today's screened top-k (precision="tf32" | "bf16", the Python path in
exemplar.ops.screen) against the exact path it screens and the chunked float32
baseline, on the CPU, in one process, with the GEMM rates of the formats a
screen could use (float32, bf16, int8 with exact int32 accumulation) measured
alongside. θ-RelatIF with K-FAC, k = 10; general (eigenbasis damping) and
rank-1 (factored damping) paths; clustered ReLU features.

    .venv/bin/python bench/screen_cpu.py            # W-CPU: N=100,000 T=1,000 D=512 C=10 (about 5 minutes)
    .venv/bin/python bench/screen_cpu.py --quick    # N=20,000 T=200

Prints one JSON line per measurement and a Markdown table (bench/RESULTS.md,
"Screens on the CPU")."""
from __future__ import annotations

import argparse
import json
import time

import torch

import exemplar
from baselines import chunked_general, chunked_rank1
from exemplar import ops
from exemplar.ops import screen


def clustered(n, D, C, centers, g):
    """ReLU features around C cluster centres, logits from a random layer: a
    last layer's inputs look like this more than like N(0, 1)."""
    labels = torch.randint(0, C, (n,), generator=g)
    features = torch.relu(centers[labels] + 0.5 * torch.randn(n, D, generator=g))
    return features, labels


def operands(N, T, D, C, kfac_damping, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(C, D, generator=g)
    weight = torch.randn(C, D, generator=g) / D ** 0.5
    f, y = clustered(N, D, C, centers, g)
    ft, _ = clustered(T, D, C, centers, g)
    attr = exemplar.Attributor(exemplar.LastLayerData(f, f @ weight.T, y), curvature="kfac", damping=1e-3,
                               kfac_damping=kfac_damping)
    train = attr.prepare("theta_relatif")
    gradient = attr.query(exemplar.LastLayerData(ft, ft @ weight.T), "theta_relatif").gradient
    left = (gradient.alpha, gradient.beta) if isinstance(gradient, exemplar.Rank1) else (gradient.S,)
    return left, (train.r, train.phi, train.inv_norm)


def best_of(fn, rounds):
    times, out = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def gemm_rates(rounds=3, n=2048, depth=512):
    """(float32, bf16, int8) GEMM rates in GFLOP/s (GOP/s for int8) on (n, depth) x (depth, n)."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(n, depth, generator=g), torch.randn(depth, n, generator=g)
    ai = torch.randint(-127, 128, (n, depth), generator=g, dtype=torch.int8)
    bi = torch.randint(-127, 128, (depth, n), generator=g, dtype=torch.int8)
    flops = 2 * n * n * depth
    rates = {}
    for name, fn in (("float32", lambda: a @ b), ("bf16", lambda: a.bfloat16() @ b.bfloat16()),
                     ("int8", lambda: torch._int_mm(ai, bi))):
        fn()
        rates[name] = flops / best_of(fn, rounds)[0] / 1e9
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=20,000 T=200")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    N, T, D, C, k = (20_000, 200, 512, 10, 10) if args.quick else (100_000, 1_000, 512, 10, 10)
    print(json.dumps({"N": N, "T": T, "D": D, "C": C, "k": k, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "gemm_rates": gemm_rates()}), flush=True)
    rows = []
    for path, kfac_damping in (("general", "eigenbasis"), ("rank1", "factored")):
        left, train = operands(N, T, D, C, kfac_damping)
        op = ops.topk if path == "general" else ops.topk_rank1
        chunked = chunked_general if path == "general" else chunked_rank1
        exact_s, exact = best_of(lambda op=op, left=left, train=train: op(*left, *train, k, True), args.rounds)
        base_s, (_, base_indices) = best_of(lambda f=chunked, left=left, train=train: f(*left, *train, k=k),
                                            args.rounds)
        result = {"path": path, "exact_s": exact_s, "chunked_s": base_s,
                  "chunked_same_indices": float((base_indices == exact[1]).double().mean())}
        alpha, beta = (None, left[0]) if path == "general" else (left[0].unsqueeze(1), left[1].unsqueeze(1))
        assert screen.bound_applies(alpha, beta, *train)  # so ops.topk(precision=) runs exactly this
        for precision in ("tf32", "bf16"):
            # the screen ops.topk(..., precision=) runs, called directly for its survivor counts
            seconds, screened = best_of(lambda a=alpha, b=beta, t=train, p=precision:
                                        screen.screened_topk(a, b, *t, k, True, p), 1)
            result[precision] = {"s": seconds,
                                 "same_indices": float((screened.indices == exact[1]).double().mean()),
                                 "survivors_per_row": float(screened.survivors.double().mean()),
                                 "exact_over_this": exact_s / seconds}
        print(json.dumps(result), flush=True)
        rows.append(result)
    print("\n| path | exact s (pairs/s) | chunked float32 s | tf32 screen s (x exact) | bf16 screen s (x exact) "
          "| survivors per row (tf32 / bf16) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['exact_s']:.2f} ({N * T / r['exact_s']:.3g}) | {r['chunked_s']:.2f} | "
              f"{r['tf32']['s']:.2f} ({r['tf32']['exact_over_this']:.2f}x) | "
              f"{r['bf16']['s']:.2f} ({r['bf16']['exact_over_this']:.2f}x) | "
              f"{r['tf32']['survivors_per_row']:.0f} / {r['bf16']['survivors_per_row']:.0f} of {N:,} |")


if __name__ == "__main__":
    main()
