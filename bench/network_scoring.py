"""How NetworkExplainer scores (docs/design.md §11, "measure and choose"): the
per-layer scores must be summed before the top-k selection. Three ways, one
run, the same answer checked:

* flattened (chosen): each block's rows flattened to (n, sum_l k_out k_in)
  (outer products of the stored factors) and one rank-1 top-k op with C = 1,
  exact and with precision="auto" (NetworkExplainer's default: the bf16
  screen on CPUs with bf16 instructions at these sizes);
* per-layer tiles: the general op's dense score tile per layer on the
  factored rows (ops.scores(S_l, delta_l, a_l)), summed, then a top-k;
* block-diagonal: one general top-k op on the concatenated factors
  [delta_1 .. delta_L], [a_1 .. a_L] with a block-diagonal S_t (zeros off
  the diagonal blocks): no flattening, but (sum k_out)(sum k_in) flops per pair.

    .venv/bin/python bench/network_scoring.py [--smoke]

Shapes: 4 vector-input layers projected to 64 x 64 (65 with the bias), as
bench/network_scale.py's model; N training rows in one block, T tests, k = 10."""
from __future__ import annotations

import argparse
import json
import time

import torch

from exemplar import ops
from exemplar.ops.order import merge_topk


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        start = time.monotonic()
        out = fn()
        times.append(time.monotonic() - start)
    return min(times), out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    N, T, shapes = (500, 20, [(8, 9), (8, 9), (3, 9)]) if args.smoke else \
        (16384, 1000, [(64, 65), (64, 65), (64, 65), (10, 65)])
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(N, o, generator=g) for o, _ in shapes]
    inputs = [torch.randn(N, i, generator=g) for _, i in shapes]
    S = [torch.randn(T, o, i, generator=g) for o, i in shapes]
    ones_n, ones_t = torch.ones(N), torch.ones(T, 1)
    k = 10

    def flattened(precision="exact"):
        phi = torch.cat([(d.unsqueeze(2) * a.unsqueeze(1)).flatten(1) for d, a in zip(deltas, inputs)], 1)
        beta = torch.cat([s.flatten(1) for s in S], 1)
        return ops.topk_rank1(ones_t, beta, torch.ones(N, 1), phi, ones_n, k, True, precision=precision)

    def tiles():
        total = sum(ops.scores(s, d, a, ones_n) for s, d, a in zip(S, deltas, inputs))
        top = total.topk(k, 1)
        return merge_topk([(top.values, top.indices)], k, True)

    def block_diagonal():
        o_total, i_total = sum(o for o, _ in shapes), sum(i for _, i in shapes)
        big = torch.zeros(T, o_total, i_total)
        oo = ii = 0
        for s, (o, i) in zip(S, shapes):
            big[:, oo:oo + o, ii:ii + i] = s
            oo, ii = oo + o, ii + i
        return ops.topk(big, torch.cat(deltas, 1), torch.cat(inputs, 1), ones_n, k, True, precision="exact")

    rows, answers = [], {}
    pairs = T * N
    for name, fn in (("flattened (rank-1 op, C=1)", flattened),
                     ("flattened, precision='auto' (the bf16 screen where it applies)", lambda: flattened("auto")),
                     ("per-layer tiles summed", tiles),
                     ("block-diagonal general op", block_diagonal)):
        seconds, (values, indices) = best_of(fn, 1 if args.smoke else 3)
        answers[name] = indices
        rows.append({"way": name, "N": N, "T": T, "layers": len(shapes), "seconds": round(seconds, 3),
                     "pairs_per_s": f"{pairs / seconds:.3g}",
                     "same_top10_as_flattened": bool(torch.equal(indices, answers["flattened (rank-1 op, C=1)"]))})
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
