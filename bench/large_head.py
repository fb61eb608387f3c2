"""Large heads at rank-m cost: θ-RelatIF top-10 with EK-FAC through the general
path (S_t a full C×D′ matrix) and through rank-m truncations of the damped
inverse eigenvalues (Attributor(rank=m or "auto")), on an ImageNet-style head
(C = 1000, D = 2048, at a size 2 CPU cores finish in minutes) and on the peers'
workload (C = 10). Query time (training side prepared beforehand, as an
Explainer does once), fit time, top-10 overlap with the general path.

    .venv/bin/python bench/large_head.py [--smoke]"""
from __future__ import annotations

import argparse
import time

import torch

import exemplar
from exemplar import curvature as curv
from workloads import topk_overlap

K = 10


def workload(N, T, D, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.relu(torch.randn(N + T, D, generator=g))
    logits = features @ (torch.randn(C, D, generator=g) / D**0.5).T
    labels = logits.argmax(1)
    return (exemplar.LastLayerData(features[:N], logits[:N], labels[:N]),
            exemplar.LastLayerData(features[N:], logits[N:]))


def run(train, test, rank, method="theta_relatif"):
    start = time.perf_counter()
    attr = exemplar.Attributor(train, curvature="ekfac", damping=1e-3, rank=rank)
    attr.prepare(method)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    values, indices = attr.topk(test, K, method)
    query = time.perf_counter() - start
    m = attr.curvature.u.shape[0] if isinstance(attr.curvature, curv.LowRankEigenbasis) else None
    return fit, query, indices, m


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    sizes = [(400, 5, 64, 50)] if args.smoke else [(20_000, 20, 2048, 1000), (10_000, 100, 512, 10)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; EK-FAC, damping 1e-3, θ-RelatIF, "
          f"k={K}; rank 'auto' = |W - W_m|_F <= {curv.LOW_RANK_TOL} |W|_F")
    print("| N | T | D | C | path | m | fit s | query s | query speed-up | top-10 overlap with general |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for N, T, D, C in sizes:
        train, test = workload(N, T, D, C)
        fit, query, want, _ = run(train, test, None)
        print(f"| {N:,} | {T} | {D} | {C} | general | {C} | {fit:.2f} | {query:.2f} | 1.00x | 1.000 |", flush=True)
        for rank in ("auto", 8, 32):
            fit_m, query_m, got, m = run(train, test, rank)
            overlap = topk_overlap(got, want)
            rows.append(dict(N=N, C=C, rank=rank, m=m, overlap=overlap, speedup=query / query_m))
            print(f"| {N:,} | {T} | {D} | {C} | rank={rank!r} | {m} | {fit_m:.2f} | {query_m:.2f} | "
                  f"{query / query_m:.2f}x | {overlap:.3f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
