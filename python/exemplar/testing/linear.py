"""Multinomial logistic regression fitted to machine precision by Newton's
method: the model the demo explains and the leave-one-out checks retrain."""
from __future__ import annotations

import torch

from .. import ops


def objective(theta, phi, labels, weight_decay, n_total):
    """(1/n_total) * summed cross-entropy + weight_decay/2 * |theta|^2."""
    loss = torch.nn.functional.cross_entropy(phi @ theta.T, labels, reduction="sum")
    return loss / n_total + 0.5 * weight_decay * theta.square().sum()


def fit_softmax_regression(phi: torch.Tensor, labels: torch.Tensor, num_classes: int,
                           weight_decay: float, n_total: int | None = None,
                           init: torch.Tensor | None = None, tol: float = 1e-12,
                           max_iter: int = 100) -> torch.Tensor:
    """phi (N, Dp) float64 (bias column included if wanted), labels (N,) ->
    theta (C, Dp) minimising `objective`. n_total (default N) is the loss's
    divisor: leave-one-out fits pass the full N so the other examples keep
    their 1/N weight, the perturbation influence functions describe."""
    n_total = phi.shape[0] if n_total is None else n_total
    Dp = phi.shape[1]
    theta = torch.zeros(num_classes, Dp, dtype=phi.dtype) if init is None else init.clone()
    eye = torch.eye(num_classes * Dp, dtype=phi.dtype)
    for _ in range(max_iter):
        z = phi @ theta.T
        grad = ops.residuals(z, labels).T @ phi / n_total + weight_decay * theta
        if float(grad.norm()) < tol:
            return theta
        H = ops.exact_hessian(phi, z) * (phi.shape[0] / n_total) + weight_decay * eye
        step = torch.linalg.solve(H, grad.reshape(-1)).view_as(theta)
        current, t = objective(theta, phi, labels, weight_decay, n_total), 1.0
        while objective(theta - t * step, phi, labels, weight_decay, n_total) > current and t > 1e-4:
            t /= 2  # backtracking: the first steps from zero can overshoot
        theta = theta - t * step
    raise RuntimeError(f"Newton's method did not reach |grad| < {tol} in {max_iter} steps "
                       f"(|grad| = {float(grad.norm()):.3g})")
