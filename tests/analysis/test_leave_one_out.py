"""Influence predicts leave-one-out retraining (Koh & Liang): multinomial
logistic regression with weight decay on scikit-learn digits, trained to
convergence by Newton's method, retrained without each removed example (the
others keep their 1/N weight, the perturbation IF/N describes)."""
import numpy as np
import pytest
import torch

import exemplar
from exemplar.testing.linear import fit_softmax_regression

LAMBDA = 1e-2


@pytest.mark.slow
def test_influence_predicts_leave_one_out_loss_change():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.long)
    Xtr, ytr, Xte, yte = X[:1000], y[:1000], X[1000:], y[1000:]
    N = Xtr.shape[0]
    phi = torch.cat([Xtr, torch.ones(N, 1, dtype=torch.float64)], 1)
    phi_te = torch.cat([Xte, torch.ones(Xte.shape[0], 1, dtype=torch.float64)], 1)
    theta = fit_softmax_regression(phi, ytr, 10, LAMBDA)

    train = exemplar.LastLayerData(Xtr, phi @ theta.T, ytr)
    test_loss = torch.nn.functional.cross_entropy(phi_te @ theta.T, yte, reduction="none")
    tests = torch.argsort(test_loss, descending=True)[:20]  # the 20 hardest test points
    test = exemplar.LastLayerData(Xte[tests], phi_te[tests] @ theta.T, yte[tests])
    attr = exemplar.Attributor(train, curvature="exact", damping=LAMBDA)
    influence = attr.scores(test, "if")  # (20, N)

    predicted, actual = [], []
    for row, t in enumerate(tests.tolist()):
        for i in torch.argsort(influence[row].abs(), descending=True)[:3].tolist():
            keep = torch.arange(N) != i
            theta_i = fit_softmax_regression(phi[keep], ytr[keep], 10, LAMBDA, n_total=N, init=theta)
            loss_i = torch.nn.functional.cross_entropy(phi_te[t] @ theta_i.T, yte[t])
            actual.append(float(loss_i - test_loss[t]))
            predicted.append(float(influence[row, i]) / N)
    pearson = np.corrcoef(predicted, actual)[0, 1]
    print(f"IF/N vs leave-one-out change in test loss: Pearson {pearson:.4f} over {len(actual)} pairs")
    assert pearson >= 0.95
