"""The int8 candidate for issue 26's screen, measured against the bf16 op on
the same operands, in one process: would an int8 screen (per-row scales,
exact int32 accumulation through torch._int_mm) be faster than the bf16 one at
equal exactness?

An exact screen's time is its GEMMs, the per-pair bound, and the exact
rescoring of its survivors; the survivors are set by how wide its error bound
is. This script measures the GEMMs and the survivors for int8 with the
tightest rigorous bound we know for per-row scales, and the same for the bf16
op, and projects an int8 op from the bf16 op's own costs:

* GEMMs: the screen's GEMMs over the whole training set in its tiles (4,096
  rows), int8 (`torch._int_mm`) against bf16 (`torch.mm`), best of 3 each.
* Survivors: for every pair, x = s_x q_x + e_x with q_x int8 and e_x the
  rounding residual, so |x.y - s_x s_y q_x.q_y| <= ||s_x q_x|| ||e_y|| +
  ||e_x|| ||s_y q_y|| + ||e_x|| ||e_y|| (Cauchy-Schwarz, per-row norms,
  float64); a training row survives a test row when its upper bound reaches the
  k-th best lower bound. The general path quantises each test operator S_t and
  each per-example gradient R_i (x) Phi_i (K = C * D'); the rank-1 path
  quantises the K = D' GEMM's operands and takes the K = C factor exactly (in
  float64), int8's most favourable case. The bf16 survivors are the op's own
  count (exemplar.ops.screened_topk*).
* Projection: the bf16 op's time with its GEMMs replaced by int8's, plus its
  marginal cost per extra survivor (measured from the op itself: the extra
  time at k = 100 over k = 10, per extra surviving pair) times the extra
  survivors int8 would have. That takes int8's bound and heap work per pair
  as equal to bf16's, in int8's favour.

    .venv/bin/python bench/screen_int8.py            # W-CPU: N=100,000 T=1,000 D=512 C=10 (about 5 minutes)
    .venv/bin/python bench/screen_int8.py --quick    # N=20,000 T=200

Prints one JSON line per path and a Markdown table (bench/RESULTS.md,
"Screens on the CPU")."""
from __future__ import annotations

import argparse
import json

import torch

from exemplar import ops
from screen_cpu import best_of, operands

TILE = 4096


def quantised(x):
    """Per-row int8 of x (n, K): (q int8, ||s q|| float64, ||x - s q|| float64, s float64)."""
    x = x.double()
    s = x.abs().amax(1) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(x / s[:, None]).clamp_(-127, 127)
    kept = q * s[:, None]
    return q.to(torch.int8), kept.norm(dim=1), (x - kept).norm(dim=1), s


def pair_error(left, right):
    """The bound above for every (left row, right row) pair, (n_left, n_right) float64."""
    _, lq, le, _ = left
    _, rq, re, _ = right
    return (lq[:, None] * re[None] + le[:, None] * rq[None] + le[:, None] * re[None]) * (1 + 1e-12)


def int8_screen(path, left, train, k, exact_indices):
    """Survivors per test row of the int8 bound (two passes: the k-th best lower
    bound per test, then the count of upper bounds reaching it), and how many of
    the exact top-k are not among them (0 unless the bound is wrong)."""
    r, phi, inv = train
    T, N = len(left[0]), len(r)
    if path == "general":
        test = quantised(left[0].reshape(T, -1))
    else:
        test = quantised(left[1])
        alpha = left[0].double()

    def tile_scores(n0):
        n = min(TILE, N - n0)
        rs = (r[n0:n0 + n] * inv[n0:n0 + n, None]).double()
        if path == "general":
            rows = quantised((rs[:, :, None] * phi[n0:n0 + n, None, :].double()).reshape(n, -1))
            approx = (test[0].double() @ rows[0].double().T) * test[3][:, None] * rows[3][None]
            return approx, pair_error(test, rows)
        rows = quantised(phi[n0:n0 + n])
        a = alpha @ rs.T
        c = (test[0].double() @ rows[0].double().T) * test[3][:, None] * rows[3][None]
        return a * c, a.abs() * pair_error(test, rows)

    best = None
    for n0 in range(0, N, TILE):
        s, b = tile_scores(n0)
        lower = s - b
        best = lower.topk(min(k, lower.shape[1]), 1).values if best is None else \
            torch.cat([best, lower], 1).topk(k, 1).values
    threshold = best[:, -1:]
    kept = torch.zeros(T, N, dtype=torch.bool)
    for n0 in range(0, N, TILE):
        s, b = tile_scores(n0)
        kept[:, n0:n0 + s.shape[1]] = s + b >= threshold
    return kept.sum(1), int((~kept.gather(1, exact_indices)).sum())


def gemm_seconds(path, left, train):
    """The screen's GEMMs over all training tiles: (int8 s, bf16 s), best of 3 each."""
    r, phi, _ = train
    T, N = len(left[0]), len(r)
    width = left[0][0].numel() if path == "general" else phi.shape[1]
    g = torch.Generator().manual_seed(2)
    test_i8 = torch.randint(-127, 128, (T, width), generator=g, dtype=torch.int8)
    test_bf = torch.randn(T, width, generator=g).bfloat16()
    tile_i8 = torch.randint(-127, 128, (TILE, width), generator=g, dtype=torch.int8)
    tile_bf = torch.randn(TILE, width, generator=g).bfloat16()
    tiles = [min(TILE, N - n0) for n0 in range(0, N, TILE)]
    int8 = best_of(lambda: [torch._int_mm(test_i8, tile_i8[:n].T) for n in tiles], 3)[0]
    bf16 = best_of(lambda: [test_bf @ tile_bf[:n].T for n in tiles], 3)[0]
    return int8, bf16


def measure(path, left, train, k):
    screened = ops.screened_topk if path == "general" else ops.screened_topk_rank1
    op = ops.topk if path == "general" else ops.topk_rank1
    exact_s, exact = best_of(lambda: op(*left, *train, k, True, precision="exact"), 2)
    bf16_s, (_, _, bf16_survivors) = best_of(lambda: screened(*left, *train, k, True), 2)
    wide_s, (_, _, wide_survivors) = best_of(lambda: screened(*left, *train, 100, True), 2)
    per_survivor = (wide_s - bf16_s) / max(1, int(wide_survivors.sum() - bf16_survivors.sum()))
    int8_gemm, bf16_gemm = gemm_seconds(path, left, train)
    survivors, missed = int8_screen(path, left, train, k, exact[1])
    assert missed == 0, f"the int8 bound lost {missed} of the exact top-k"
    N = len(train[0])
    result = {"path": path, "N": N, "T": len(left[0]), "exact_s": exact_s, "bf16_screen_s": bf16_s,
              "bf16_gemm_s": bf16_gemm, "int8_gemm_s": int8_gemm,
              "bf16_survivors_per_row": float(bf16_survivors.double().mean()),
              "int8_survivors_per_row": float(survivors.double().mean()), "int8_survivors_max": int(survivors.max()),
              "seconds_per_extra_survivor": per_survivor,
              "int8_screen_projected_s": bf16_s - bf16_gemm + int8_gemm
              + per_survivor * int(survivors.sum() - bf16_survivors.sum())}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=20,000 T=200")
    args = parser.parse_args()
    N, T, D, C, k = (20_000, 200, 512, 10, 10) if args.quick else (100_000, 1_000, 512, 10, 10)
    print(json.dumps({"N": N, "T": T, "D": D, "C": C, "k": k, "threads": torch.get_num_threads(),
                      "torch": torch.__version__}), flush=True)
    rows = [measure(path, *operands(N, T, D, C, kfac_damping), k)
            for path, kfac_damping in (("general", "eigenbasis"), ("rank1", "factored"))]
    print("\n| path | exact s | bf16 screen s | GEMMs bf16 s | GEMMs int8 s | survivors per row bf16 | "
          "survivors per row int8 (max) | int8 screen projected s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['exact_s']:.2f} | {r['bf16_screen_s']:.2f} | {r['bf16_gemm_s']:.2f} "
              f"| {r['int8_gemm_s']:.2f} | {r['bf16_survivors_per_row']:.0f} of {r['N']:,} "
              f"| {r['int8_survivors_per_row']:.0f} ({r['int8_survivors_max']}) | {r['int8_screen_projected_s']:.2f} |")


if __name__ == "__main__":
    main()
