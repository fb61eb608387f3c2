"""Influence predicts leave-one-out retraining (Koh & Liang): multinomial
logistic regression with weight decay on scikit-learn digits, trained to
convergence by Newton's method, retrained without each removed example."""
import numpy as np
import pytest
import torch

import exemplar
from exemplar import ops

LAMBDA = 1e-2


def objective(theta, phi, y, n_total):
    """(1/n_total) sum of cross-entropy + lambda/2 |theta|^2: removing an example
    keeps the 1/N weight of the others, the perturbation IF/N describes."""
    z = phi @ theta.T
    return torch.nn.functional.cross_entropy(z, y, reduction="sum") / n_total + 0.5 * LAMBDA * theta.square().sum()


def newton_fit(phi, y, n_total, theta):
    C, Dp = theta.shape
    for _ in range(100):
        z = phi @ theta.T
        R = ops.residuals(z, y)
        grad = (R.T @ phi) / n_total + LAMBDA * theta
        if float(grad.norm()) < 1e-13:
            return theta
        H = ops.exact_hessian(phi, z) * (phi.shape[0] / n_total) + LAMBDA * torch.eye(C * Dp, dtype=phi.dtype)
        step = torch.linalg.solve(H, grad.reshape(-1)).view(C, Dp)
        t = 1.0  # backtracking keeps the first steps from zero safe
        while objective(theta - t * step, phi, y, n_total) > objective(theta, phi, y, n_total) and t > 1e-4:
            t /= 2
        theta = theta - t * step
    raise AssertionError(f"Newton did not converge: |grad| = {float(grad.norm())}")


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
    theta = newton_fit(phi, ytr, N, torch.zeros(10, 65, dtype=torch.float64))

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
            theta_i = newton_fit(phi[keep], ytr[keep], N, theta)
            loss_i = torch.nn.functional.cross_entropy(phi_te[t] @ theta_i.T, yte[t])
            actual.append(float(loss_i - test_loss[t]))
            predicted.append(float(influence[row, i]) / N)
    pearson = np.corrcoef(predicted, actual)[0, 1]
    print(f"IF/N vs leave-one-out change in test loss: Pearson {pearson:.4f} over {len(actual)} pairs")
    assert pearson >= 0.95
