"""Speed before and after an engine change, one tree per process: run it
under two checkouts (PYTHONPATH picks the tree), alternating, and compare
the JSON lines. It times what users call, through the public API:

* wcpu: W-CPU (N = 100,000, T = 1,000, D = 512, C = 10, float32), an
  Attributor with K-FAC (eigenbasis damping: the general path; factored: the
  rank-1 path), theta-RelatIF top-10 with precision="exact": fit + first
  top-k, then the best of 3 top-k calls;
* digits: experiments/lds.py's digits MLP through NetworkExplainer (EK-FAC
  and exact, expected Fisher, batches of 64): fit, and fit + top-10 of the
  last 1,000 digits (IF), with a digest of the indices (equal answers).

    for tree in OLD NEW OLD NEW; do
      (cd $tree && PYTHONPATH=$tree/python .venv/bin/python bench/one_engine_speed.py wcpu)
      (cd $tree && PYTHONPATH=$tree/python .venv/bin/python bench/one_engine_speed.py digits)
    done

Results: bench/RESULTS.md, "One engine: speed before and after"."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import exemplar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/

BATCH = 64


def wcpu() -> dict:
    g = torch.Generator().manual_seed(0)
    N, T, D, C = 100_000, 1_000, 512, 10
    train = exemplar.LastLayerData(torch.randn(N, D, generator=g), 2 * torch.randn(N, C, generator=g),
                                   torch.randint(0, C, (N,), generator=g))
    test = exemplar.LastLayerData(torch.randn(T, D, generator=g), torch.randn(T, C, generator=g))
    out = {}
    for damping in ("eigenbasis", "factored"):
        start = time.monotonic()
        attr = exemplar.Attributor(train, curvature="kfac", damping=1e-3, kfac_damping=damping, progress=False)
        attr.topk(test, 10, "theta_relatif", precision="exact")
        first = time.monotonic() - start
        times = []
        for _ in range(3):
            start = time.monotonic()
            attr.topk(test, 10, "theta_relatif", precision="exact")
            times.append(time.monotonic() - start)
        out[damping] = {"fit+first_topk_s": round(first, 3), "topk_best_of_3_s": round(min(times), 3)}
    return out


def digits() -> dict:
    from experiments.lds import whole_model_setup
    setup = whole_model_setup()
    X, y = torch.cat([setup.Xtr, setup.Xte]), torch.cat([setup.ytr, setup.yte])

    def batches(a, b):
        return [(a[i:i + BATCH], b[i:i + BATCH]) for i in range(0, len(b), BATCH)]
    out = {}
    for curvature in ("ekfac", "exact"):
        start = time.monotonic()
        e = exemplar.NetworkExplainer(setup.model, batches(setup.Xtr, setup.ytr), curvature=curvature,
                                      damping=1e-3, progress=False)
        fit = time.monotonic() - start
        top = e.topk(batches(X[-1000:], y[-1000:]), 10, "if")
        out[curvature] = {"fit_s": round(fit, 3), "fit+top10_s": round(time.monotonic() - start, 3),
                          "indices_sum": int(top.indices.sum())}
    return out


if __name__ == "__main__":
    torch.set_num_threads(2)
    which = sys.argv[1] if len(sys.argv) > 1 else "wcpu"
    found = {"wcpu": wcpu, "digits": digits}[which]()
    print(json.dumps({"tree": exemplar.__file__.split("/python/")[0], which: found}))
