"""The bf16 screen (exemplar::screened_topk, precision="bf16") against the
exact path it screens, what precision="auto" picks, and the chunked float32
baseline, on the CPU, in one process, exact and screen alternating, with the
GEMM rates of the formats a screen could use (float32, bf16, int8 with exact
int32 accumulation) measured alongside. θ-RelatIF with K-FAC, k = 10; general
(eigenbasis damping) and rank-1 (factored damping) paths; clustered ReLU
features.

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


def clustered(n, D, C, centers, g):
    """ReLU features around C cluster centres, logits from a random layer: a
    last layer's inputs look like this more than like N(0, 1)."""
    labels = torch.randint(0, C, (n,), generator=g)
    features = torch.relu(centers[labels] + 0.5 * torch.randn(n, D, generator=g))
    return features, labels


def prepared(train, test, kfac_damping):
    """θ-RelatIF K-FAC operands of LastLayerData train and test through the public
    API (curvature and normalisers fitted here, not timed): (left, (r, phi, inv_norm))."""
    attr = exemplar.Attributor(train, curvature="kfac", damping=1e-3, kfac_damping=kfac_damping)
    operands = attr.prepare("theta_relatif")
    gradient = attr.query(test, "theta_relatif").gradient
    left = (gradient.alpha, gradient.beta) if isinstance(gradient, exemplar.Rank1) else (gradient.S,)
    return left, (operands.r, operands.phi, operands.inv_norm)


def operands(N, T, D, C, kfac_damping, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(C, D, generator=g)
    weight = torch.randn(C, D, generator=g) / D ** 0.5
    f, y = clustered(N, D, C, centers, g)
    ft, _ = clustered(T, D, C, centers, g)
    return prepared(exemplar.LastLayerData(f, f @ weight.T, y), exemplar.LastLayerData(ft, ft @ weight.T),
                    kfac_damping)


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


def measure(path, left, train, k, rounds) -> dict:
    """One path's operands: exact and the bf16 screen alternating (best of
    `rounds`), then auto and the chunked baseline, one run each."""
    general = path == "general"
    op = ops.topk if general else ops.topk_rank1
    screened = ops.screened_topk if general else ops.screened_topk_rank1
    chunked = chunked_general if general else chunked_rank1
    exact_s, screen_s = [], []
    for _ in range(rounds):  # alternating, so both see the same machine
        exact_s.append(best_of(lambda: op(*left, *train, k, True, precision="exact"), 1)[0])
        screen_s.append(best_of(lambda: screened(*left, *train, k, True), 1)[0])
    exact = op(*left, *train, k, True, precision="exact")
    values, indices, survivors = screened(*left, *train, k, True)
    auto_s, _ = best_of(lambda: op(*left, *train, k, True, precision="auto"), 1)
    base_s, (_, base_indices) = best_of(lambda: chunked(*left, *train, k=k), 1)
    # An index that differs from exact's at a rank where the two values agree to the dtype's
    # rounding is a reordered near-tie; any other difference would be a wrong answer.
    differ = indices != exact[1]
    agree = (values - exact[0]).abs() <= 1e-5 * exact[0].abs().amax(1, keepdim=True)
    depth = left[0][0].numel() if general else train[1].shape[1]
    picks = ops.precision.resolve("auto", general, len(left[0]), len(train[0]), depth, k, train[0].device)
    result = {"path": path, "N": len(train[0]), "T": len(left[0]), "auto": picks, "exact_s": min(exact_s),
              "bf16_s": min(screen_s), "auto_s": auto_s,
              "chunked_s": base_s, "same_indices": float((indices == exact[1]).double().mean()),
              "differ_beyond_ties": int((differ & ~agree).sum()),
              "chunked_same_indices": float((base_indices == exact[1]).double().mean()),
              "survivors_per_row": float(survivors.double().mean()), "survivors_max": int(survivors.max()),
              "exact_over_bf16": min(exact_s) / min(screen_s)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=20,000 T=200")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    N, T, D, C, k = (20_000, 200, 512, 10, 10) if args.quick else (100_000, 1_000, 512, 10, 10)
    print(json.dumps({"N": N, "T": T, "D": D, "C": C, "k": k, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "gemm_rates": gemm_rates()}), flush=True)
    rows = [measure(path, *operands(N, T, D, C, kfac_damping), k, args.rounds)
            for path, kfac_damping in (("general", "eigenbasis"), ("rank1", "factored"))]
    print_table(rows)


def print_table(rows) -> None:
    print("\n| workload | path | exact s (pairs/s) | bf16 screen s (pairs/s, x exact) | auto s (picks) "
          "| chunked float32 s | survivors per row (max) | same indices (beyond ties) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        pairs = r["N"] * r["T"]
        print(f"| {r.get('workload', 'W-CPU')} | {r['path']} | {r['exact_s']:.2f} ({pairs / r['exact_s']:.3g}) "
              f"| {r['bf16_s']:.2f} ({pairs / r['bf16_s']:.3g}, {r['exact_over_bf16']:.2f}x) "
              f"| {r['auto_s']:.2f} ({r['auto']}) | {r['chunked_s']:.2f} "
              f"| {r['survivors_per_row']:.0f} ({r['survivors_max']}) of {r['N']:,} | {r['same_indices']:.4f} "
              f"({r['differ_beyond_ties']}) |")


if __name__ == "__main__":
    main()
