"""Representer points (Sui et al. 2021): the l2-regularised refit of the last
layer that RPS-l2 decomposes (Yeh et al. 2018, Sui Eq. 2-4), and the one
gradient-ascent step that RPS-LJE expands around (Sui Eq. 7-11)."""
from __future__ import annotations

import torch


def fit_l2(phi: torch.Tensor, target_logits: torch.Tensor, strength: float,
           init: torch.Tensor | None = None, tol: float = 1e-10, max_rounds: int = 100):
    """phi (N, Dp), target_logits (N, C) -> (theta (C, Dp) float64, alpha (N, C) float64).

    Minimises (1/N) sum_i CE(softmax(theta phi_i), softmax(target_i)) + strength |theta|^2
    with L-BFGS, then polishes with Newton-CG steps until max|grad| < tol. At that stationary point
    theta = sum_i alpha_i phi_i^T with alpha_i = -(p_i - target_i) / (2 strength N),
    so the refit logits decompose exactly over the training set."""
    if not strength > 0:
        raise ValueError(f"rps_lambda must be > 0 (the representer values divide by it), got {strength}")
    phi64 = phi.double()
    target = torch.softmax(target_logits.double(), dim=1)
    N = phi.shape[0]
    start = torch.zeros(target.shape[1], phi.shape[1], dtype=torch.float64, device=phi.device)
    theta = (start if init is None else init.double().clone()).requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=200, history_size=20, tolerance_grad=tol,
                            tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        log_p = torch.log_softmax(phi64 @ theta.T, dim=1)
        loss = -(target * log_p).sum() / N + strength * theta.square().sum()
        loss.backward()
        return loss

    previous = float("inf")
    for _ in range(max_rounds):
        loss = opt.step(closure).item()
        if float(theta.grad.abs().max()) < tol or loss >= previous:
            break  # converged, or the line search can no longer resolve a decrease in float64
        previous = loss
    theta = _newton_polish(phi64, target, strength, theta.detach(), tol)
    # theta - sum_i alpha_i phi_i^T = grad / (2 strength): that gap is what the decomposition misses.
    grad = _gradient(phi64, target, strength, theta)
    gap = float(grad.abs().max()) / (2.0 * strength)
    if gap > 1e-6 * max(1.0, float(theta.abs().max())):
        raise RuntimeError(f"RPS-l2 refit: stopped with max|grad| = {float(grad.abs().max()):.3g}, "
                           f"too far from stationary for the representer decomposition (gap {gap:.3g})")
    alpha = -(torch.softmax(phi64 @ theta.T, dim=1) - target) / (2.0 * strength * N)
    return theta, alpha


def _gradient(phi, target, strength, theta):
    return (torch.softmax(phi @ theta.T, 1) - target).T @ phi / phi.shape[0] + 2 * strength * theta


def _newton_polish(phi, target, strength, theta, tol, steps=5, cg_iters=100):
    """Newton steps by conjugate gradients on the exact Hessian-vector product,
    accepted while they shrink the gradient. L-BFGS's line search stops near
    max|grad| ~ 1e-9 because the loss no longer changes in float64; the
    representer decomposition needs the gradient itself small."""
    p = torch.softmax(phi @ theta.T, 1)

    def hvp(v):  # (1/N) sum_i (diag(p_i) - p_i p_i^T)(v phi_i) phi_i^T + 2 strength v
        z = phi @ v.T
        return (p * z - p * (p * z).sum(1, keepdim=True)).T @ phi / phi.shape[0] + 2 * strength * v

    grad = _gradient(phi, target, strength, theta)
    for _ in range(steps):
        if float(grad.abs().max()) < tol:
            break
        x, r = torch.zeros_like(theta), -grad
        d, rr = r.clone(), float((r * r).sum())
        for _ in range(cg_iters):
            Hd = hvp(d)
            a = rr / float((d * Hd).sum())
            x, r = x + a * d, r - a * Hd
            rr_new = float((r * r).sum())
            if rr_new ** 0.5 < 1e-3 * tol:
                break
            d, rr = r + (rr_new / rr) * d, rr_new
        new_grad = _gradient(phi, target, strength, theta + x)
        if float(new_grad.abs().max()) >= float(grad.abs().max()):
            break
        theta, grad = theta + x, new_grad
        p = torch.softmax(phi @ theta.T, 1)
    return theta


def ascent_step(phi: torch.Tensor, residuals: torch.Tensor, theta: torch.Tensor, step: float):
    """Theta* = Theta + step * mean training gradient (Sui Eq. 10), float64 (C, Dp)."""
    grad = residuals.double().T @ phi.double() / phi.shape[0]
    return theta.double() + step * grad
