"""How well each curvature approximates exact influence, on real data: the
fraction of exact curvature's top-10 training examples that each curvature
also puts in its top-10, averaged over every test image. scikit-learn's 8x8
digits, 1,200 train / 597 test, logistic regression with weight decay 1e-3
(= the damping, so exact is the true influence of the regularised fit).

    .venv/bin/python bench/approximation_quality.py     # the table in docs/design.md §2"""
from __future__ import annotations

import torch

import exemplar
from exemplar.testing.linear import fit_softmax_regression
from workloads import topk_overlap

CURVATURES = [("kfac", "eigenbasis", None), ("kfac", "factored", None), ("ekfac", "eigenbasis", None),
              ("ekfac", "eigenbasis", "auto"), ("identity", "eigenbasis", None)]
METHODS = ("if", "theta_relatif", "l_relatif")
K, DAMPING = 10, 1e-3


def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.long)
    phi = torch.cat([X, torch.ones(len(X), 1, dtype=torch.float64)], 1)
    theta = fit_softmax_regression(phi[:1200], y[:1200], 10, DAMPING)
    logits = phi @ theta.T
    return exemplar.LastLayerData(X[:1200], logits[:1200], y[:1200]), exemplar.LastLayerData(X[1200:], logits[1200:])


def overlaps() -> dict[tuple[str, str, str | None], dict[str, float]]:
    """(curvature, kfac_damping, rank) -> method -> mean top-10 overlap with exact."""
    train, test = digits()
    exact = exemplar.Attributor(train, curvature="exact", damping=DAMPING)
    want = {m: exact.topk(test, K, m)[1] for m in METHODS}
    out = {}
    for curvature, kfac_damping, rank in CURVATURES:
        attr = exemplar.Attributor(train, curvature=curvature, damping=DAMPING, kfac_damping=kfac_damping, rank=rank)
        out[curvature, kfac_damping, rank] = {m: topk_overlap(attr.topk(test, K, m)[1], want[m]) for m in METHODS}
    return out


def main() -> None:
    print("| curvature | " + " | ".join(METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for (curvature, kfac_damping, rank), row in overlaps().items():
        name = curvature + (f" ({kfac_damping} damping)" if curvature == "kfac" else "")
        name += f", rank={rank!r}" if rank else ""
        print(f"| {name} | " + " | ".join(f"{row[m]:.2f}" for m in METHODS) + " |")


if __name__ == "__main__":
    main()
