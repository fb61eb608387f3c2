"""Peak RSS of an in-memory Attributor against the size of its inputs: N =
1,000,000 training rows of D = 512 float32 features (2 GB), C = 10; K-FAC fit
and θ-RelatIF top-10 for 100 tests on the rank-1 path (factored damping) and
the general path (eigenbasis damping). The bias column is appended per block
into a reused buffer, so no second copy of the features exists.

    .venv/bin/python bench/in_memory_rss.py [--rows 1000000] [--smoke]"""
from __future__ import annotations

import argparse
import json
import time

import torch

import exemplar
from workloads import status_bytes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    N, D, C, T = (20_000, 64, 10, 10) if args.smoke else (args.rows, args.dim, 10, 100)
    empty = status_bytes("VmRSS")  # Python, torch and exemplar loaded, no data
    g = torch.Generator().manual_seed(0)
    features = torch.relu(torch.randn(N, D, generator=g))
    head = torch.randn(C, D, generator=g) / D**0.5
    logits = features @ head.T
    train = exemplar.LastLayerData(features, logits, logits.argmax(1))
    test = exemplar.LastLayerData(torch.relu(torch.randn(T, D, generator=g)), torch.randn(T, C, generator=g))
    inputs = features.nbytes + logits.nbytes + train.labels.nbytes
    baseline = status_bytes("VmRSS")
    print(json.dumps({"N": N, "D": D, "C": C, "T": T, "inputs_gb": round(inputs / 1e9, 3),
                      "rss_before_inputs_gb": round(empty / 1e9, 3),
                      "rss_with_inputs_gb": round(baseline / 1e9, 3)}), flush=True)
    for path, kfac_damping in (("rank1", "factored"), ("general", "eigenbasis")):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = time.perf_counter()
        attr = exemplar.Attributor(train, curvature="kfac", kfac_damping=kfac_damping, progress=False)
        fit = time.perf_counter() - start
        attr.topk(test[:1], 10, "theta_relatif")
        start = time.perf_counter()
        attr.topk(test, 10, "theta_relatif")
        query = time.perf_counter() - start
        peak = status_bytes("VmHWM")
        print(json.dumps({"path": path, "fit_s": round(fit, 2), "query_s": round(query, 2),
                          "peak_rss_gb": round(peak / 1e9, 3), "peak_over_inputs": round(peak / inputs, 3),
                          "peak_above_empty_over_inputs": round((peak - empty) / inputs, 3)}),
              flush=True)
        del attr


if __name__ == "__main__":
    main()
