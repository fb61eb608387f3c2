"""Thesis (2022) Table 2: running time per test point of IF and RelatIF. The
thesis saw RelatIF 20-40x slower than IF; here the RelatIF normalisers are
computed once per training set, so a RelatIF query costs what an IF query does."""
from __future__ import annotations

import time

import torch

from . import datasets
from .common import LogisticRegression, Results, table


def _per_test(attr, test, method, k=10, repeats=5):
    attr.topk(test, k, method)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        attr.topk(test, k, method)
        best = min(best, time.perf_counter() - start)
    return best / len(test)


def running_time(quick: bool, results: Results) -> dict:
    pool = 2 if quick else 1
    Xtr, ytr, Xte, _ = datasets.mnist(pool=pool)
    n_test = 200 if quick else 1000
    # 28x28: Newton's (7850)^2 Hessian is too slow on 2 cores, so L-BFGS fits it.
    model = LogisticRegression(Xtr, ytr, solver="newton" if pool > 1 else "lbfgs")
    rows, ratios = [], {}
    for curvature in ("kfac", "ekfac") + (("exact",) if quick else ()):
        fit_start = time.perf_counter()
        attr = model.attributor(curvature)
        for m in ("theta_relatif", "l_relatif"):
            attr.prepare(m)  # the normalisers, once per training set
        setup = time.perf_counter() - fit_start
        test = model.data(Xte[:n_test])
        times = {m: _per_test(attr, test, m) for m in ("if", "theta_relatif", "l_relatif")}
        ratios[curvature] = times["theta_relatif"] / times["if"]
        rows.append([curvature, f"{setup:.2f}", *(f"{1e3 * times[m]:.3f}" for m in times),
                     f"{ratios[curvature]:.2f}"])
    side = 28 // pool
    results.add(f"### Time per test point, top-10 over {len(ytr)} training points, LR on MNIST 5k "
                f"({side}×{side}, {side * side + 1} features × 10 classes), {n_test} test points per call, "
                f"{torch.get_num_threads()} threads, best of 5\n\n"
                + table(["curvature", "fit incl. normalisers (s, once)", "IF (ms/test)", "θ-RelatIF (ms/test)",
                         "ℓ-RelatIF (ms/test)",
                         "θ-RelatIF / IF"], rows)
                + "\n\nThesis Table 2: RelatIF several times slower than IF on small models and 20-40× on "
                  "large ones, because it recomputes H⁻¹g_i per query.")
    return {"ratio": ratios}

