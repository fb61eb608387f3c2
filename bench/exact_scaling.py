"""How far exact curvature goes: fit time, normaliser time and peak memory at
C*D' = 1k, 5k, 10k, 20k (C = 10, N = 10,000, float32, damping 1e-3), each size
in a fresh process so its peak RSS is its own, next to exact_cost's estimate.

    .venv/bin/python bench/exact_scaling.py [--sizes 1000 5000 10000 20000] [--n 10000]"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

C = 10


def measure(n_cols: int, N: int) -> dict:
    import torch

    import exemplar
    from exemplar import curvature as curv

    D = n_cols // C - 1
    g = torch.Generator().manual_seed(0)
    features = torch.relu(torch.randn(N, D, generator=g))
    logits = features @ (torch.randn(C, D, generator=g) / D**0.5).T
    train = exemplar.LastLayerData(features, logits, logits.argmax(1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    attr = exemplar.Attributor(train, curvature="exact", damping=1e-3)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    attr.prepare("theta_relatif")
    norms = time.perf_counter() - start
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    cost = curv.exact_cost(C, D + 1, N)
    return dict(cols=C * (D + 1), fit_s=fit, norms_s=norms, peak_gb=peak / 1e9, est_gb=cost["bytes"] / 1e9,
                est_fit_s=cost["fit_s"], est_norms_s=cost["norms_s"], threads=torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000, 20000])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.n)))
        return
    print("| C·D′ | fit s | θ-RelatIF normalisers s | peak extra RSS GB | estimate: GB, fit s, normalisers s |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(size), "--n", str(args.n)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out)
        print(f"| {r['cols']:,} | {r['fit_s']:.2f} | {r['norms_s']:.2f} | {r['peak_gb']:.2f} | "
              f"{r['est_gb']:.1f}, {r['est_fit_s']:.1f}, {r['est_norms_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
