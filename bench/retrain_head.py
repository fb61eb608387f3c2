"""Ground truth for LDS: exemplar.retrain_head (M softmax-regression refits at
once by batched, preconditioned Newton-CG) against what it replaces, a
Python loop of M independent fits, in one process:

* loop of Newton fits (exemplar.testing.linear.fit_softmax_regression, the
  exact (C Dp)^2 Hessian per step), warm-started from the trained layer;
* loop of torch.optim.LBFGS fits (float64, strong Wolfe), warm-started.

Both loops stop at the same gradient norm as retrain_head (1e-10). Agreement
is the largest difference in the test outputs (log p) between the batched
answer and each loop's.

    .venv/bin/python bench/retrain_head.py                    # digits (N=1,200, D=64, C=10), M=100
    .venv/bin/python bench/retrain_head.py --fashion          # + a 60,000-row head (D=576, C=10)
    .venv/bin/python bench/retrain_head.py --smoke            # M = 5: CI's check that it runs

Prints one JSON line per measurement (bench/RESULTS.md, "Ground truth for
LDS"). With --fashion the loops run 3 subsets and are scaled to M (said in
the output): a Newton step there is a 5,770 x 5,770 solve."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import exemplar
from exemplar.testing.linear import fit_softmax_regression

TOL = 1e-10
WEIGHT_DECAY = 1e-3


def with_bias(X):
    return torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)


def lbfgs(phi, labels, C, init):
    theta = init.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], max_iter=5000, tolerance_grad=TOL / 10, tolerance_change=0, history_size=30,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(phi @ theta.T, labels) + 0.5 * WEIGHT_DECAY * theta.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def log_p(theta, phi, labels):
    return torch.log_softmax(phi @ theta.T, 1).gather(1, labels.view(-1, 1)).squeeze(1)


def measure(name, train, test, subsets, loop_subsets):
    C = train.num_classes
    start = time.perf_counter()
    truth = exemplar.retrain_head(train, test, WEIGHT_DECAY, subsets=subsets, tol=TOL)
    batched = time.perf_counter() - start
    theta0 = truth.layer
    phi, phi_test = with_bias(train.features).double(), with_bias(test.features).double()
    result = {"workload": name, "N": len(train), "D": train.num_features, "C": C, "M": subsets,
              "batched_s": batched, "passes": truth.meta["passes"], "usable": len(truth.usable),
              "newton_steps_max": max(truth.meta["steps"])}
    for loop, fit in (("newton", lambda m: fit_softmax_regression(phi[m], train.labels[m], C, WEIGHT_DECAY,
                                                                   init=theta0, tol=TOL)),
                      ("lbfgs", lambda m: lbfgs(phi[m], train.labels[m], C, theta0))):
        start, worst = time.perf_counter(), 0.0
        for j in range(loop_subsets):
            out = log_p(fit(truth.masks[j]), phi_test, test.labels)
            worst = max(worst, float((out - truth.outputs[j]).abs().max()))
        seconds = (time.perf_counter() - start) * subsets / loop_subsets
        result.update({f"{loop}_loop_s": seconds, f"{loop}_max_output_diff": worst,
                       f"{loop}_subsets_timed": loop_subsets, f"speedup_vs_{loop}": seconds / batched})
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fashion", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="M = 5, loops of 2: checks the bench runs")
    args = parser.parse_args(argv)
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0), torch.tensor(y)
    zeros = lambda n: torch.zeros(n, 10, dtype=X.dtype)
    M, loop = (5, 2) if args.smoke else (100, 100)
    rows = [measure("digits LR", exemplar.LastLayerData(X[:1200], zeros(1200), y[:1200]),
                    exemplar.LastLayerData(X[1200:], zeros(len(y) - 1200), y[1200:]), M, loop)]
    if args.fashion:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from experiments.lds import fashion_features

        _, train, test = fashion_features()
        rows.append(measure("Fashion-MNIST ConvNet head", train, test, 100, 3))
    return rows


if __name__ == "__main__":
    main()
