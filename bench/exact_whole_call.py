"""Exact influence, the whole user call (fit + top-10 for T test points), against
the chunked closed form (baselines.closed_form_exact) on the peers' workload:
nn.Linear(D, 10) on ReLU features, mean cross-entropy, damping 1e-3, float32.

    .venv/bin/python bench/exact_whole_call.py            # the table in bench/RESULTS.md
    .venv/bin/python bench/exact_whole_call.py --smoke    # tiny sizes, what CI runs

Both run in this process, alternating, each timed whole (its fit included);
the median of 3 is reported, with the top-10 overlap and value agreement."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import baselines  # noqa: E402
import exemplar  # noqa: E402
from workloads import topk_overlap  # noqa: E402

WORKLOADS = [  # (D, N, methods)
    (128, 10_000, ("if",)),
    (128, 50_000, ("if", "theta_relatif", "l_relatif")),
    (512, 10_000, ("if", "theta_relatif")),
]
SMOKE = [(16, 500, ("if", "theta_relatif", "l_relatif"))]
C, T, K, DAMPING = 10, 100, 10, 1e-3


def workload(D, N, seed=0):
    """ReLU features through a random linear head; labels from the head with 20 % noise."""
    g = torch.Generator().manual_seed(seed)
    features = torch.relu(torch.randn(N + T, D, generator=g))
    weight = torch.randn(C, D, generator=g) / D**0.5
    logits = features @ weight.T + 0.1 * torch.randn(C, generator=g)
    labels = logits.argmax(1)
    noisy = torch.rand(N + T, generator=g) < 0.2
    labels[noisy] = torch.randint(0, C, (int(noisy.sum()),), generator=g)
    return (features[:N], logits[:N], labels[:N]), (features[N:], logits[N:])


def ours(train, test, method):
    attr = exemplar.Attributor(exemplar.LastLayerData(*train), curvature="exact", damping=DAMPING)
    return attr.topk(exemplar.LastLayerData(*test), K, method)


def closed_form(train, test, method):
    return baselines.closed_form_exact(*train, *test, K, method, DAMPING)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; C={C}, T={T}, k={K}, damping={DAMPING}")
    print("| D | N | method | exemplar exact (s) | chunked closed form (s) | closed form / exemplar "
          "| top-10 overlap | max rel diff of values |")
    print("|---|---|---|---|---|---|---|---|")
    for D, N, methods in SMOKE if args.smoke else WORKLOADS:
        train, test = workload(D, N)
        for method in methods:
            times = {"ours": [], "closed": []}
            for _ in range(1 if args.smoke else args.rounds):
                t, (v_ours, i_ours) = timed(ours, train, test, method)
                times["ours"].append(t)
                t, (v_closed, i_closed) = timed(closed_form, train, test, method)
                times["closed"].append(t)
            overlap = topk_overlap(i_ours, i_closed)
            diff = float((v_ours - v_closed).abs().max() / v_closed.abs().max())
            med = {key: statistics.median(v) for key, v in times.items()}
            rows.append(dict(D=D, N=N, method=method, ours=med["ours"], closed=med["closed"],
                             overlap=overlap, diff=diff))
            print(f"| {D} | {N:,} | {method} | {med['ours']:.2f} | {med['closed']:.2f} | "
                  f"{med['closed'] / med['ours']:.2f}x | {overlap:.3f} | {diff:.1e} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
