"""CPU benchmark: exemplar's score ops vs the naive and chunked baselines for
theta-RelatIF with K-FAC (eigenbasis damping: general path; factored damping:
rank-1 path), dense and top-k.

    .venv/bin/python -m pytest bench/test_bench_cpu.py --benchmark-json=bench/cpu.json
    .venv/bin/python bench/table.py bench/cpu.json

EXEMPLAR_BENCH=smoke runs tiny sizes once (CI keeps the suite working)."""
import os

import pytest
import torch

import baselines
from exemplar import ops
from workloads import theta_relatif_operands

SMOKE = os.environ.get("EXEMPLAR_BENCH") == "smoke"
SIZES = [(2_000, 50, 64, 10)] if SMOKE else [(10_000, 100, 512, 10), (100_000, 1_000, 512, 10)]
NAIVE_MAX_N = 10_000  # explicit float64 gradients: N * C * Dp * 8 bytes
K = 10
ROUNDS = 1 if SMOKE else 3

_cache = {}


def operands(size, path):
    key = (size, path)
    if key not in _cache:
        _cache.clear()
        N, T, D, C = size
        _cache[key] = theta_relatif_operands(N, T, D, C, "factored" if path == "rank1" else "eigenbasis")
    return _cache[key]


def run(benchmark, fn, *args, **kw):
    return benchmark.pedantic(fn, args=args, kwargs=kw, rounds=ROUNDS, iterations=1, warmup_rounds=0)


IMPLS = {
    ("general", "exemplar", "dense"): lambda a: ops.scores(*a),
    ("general", "exemplar", "topk"): lambda a: ops.topk(*a, K, True),
    ("general", "chunked", "dense"): lambda a: baselines.chunked_general(*a),
    ("general", "chunked", "topk"): lambda a: baselines.chunked_general(*a, k=K),
    ("general", "naive", "dense"): lambda a: baselines.naive_scores(*a),
    ("rank1", "exemplar", "dense"): lambda a: ops.scores_rank1(*a),
    ("rank1", "exemplar", "topk"): lambda a: ops.topk_rank1(*a, K, True),
    ("rank1", "chunked", "dense"): lambda a: baselines.chunked_rank1(*a),
    ("rank1", "chunked", "topk"): lambda a: baselines.chunked_rank1(*a, k=K),
}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "N{}_T{}_D{}_C{}".format(*s))
@pytest.mark.parametrize("path,impl,variant", list(IMPLS), ids="-".join)
def test_theta_relatif_kfac(benchmark, size, path, impl, variant):
    if impl == "naive" and size[0] > NAIVE_MAX_N:
        pytest.skip("naive float64 baseline needs N*C*Dp*8 bytes of explicit gradients")
    _, args = operands(size, path)
    benchmark.group = f"{path} {variant} N={size[0]} T={size[1]} D={size[2]} C={size[3]}"
    benchmark.extra_info.update(path=path, impl=impl, variant=variant, N=size[0], T=size[1], D=size[2],
                                C=size[3], k=K, threads=torch.get_num_threads())
    result = run(benchmark, IMPLS[(path, impl, variant)], args)
    if variant == "topk" and impl != "exemplar":  # every implementation returns the same top-k
        want = IMPLS[(path, "exemplar", "topk")](args)[0]
        torch.testing.assert_close(result[0], want, rtol=1e-4, atol=1e-5)
