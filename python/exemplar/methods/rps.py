"""Representer points (Sui et al. 2021): the l2-regularised refit of the last
layer that RPS-l2 decomposes (Yeh et al. 2018, Sui Eq. 2-4), and the one
gradient-ascent step that RPS-LJE expands around (Sui Eq. 7-11)."""
from __future__ import annotations

import torch


def fit_l2(data, strength: float, init: torch.Tensor | None = None, tol: float = 1e-10,
           max_steps: int = 100) -> torch.Tensor:
    """data: curvature.Statistics over (phi (N, Dp), target_logits (N, C)) -> theta (C, Dp) float64.

    Minimises (1/N) sum_i CE(softmax(theta phi_i), softmax(target_i)) + strength |theta|^2
    by Newton-CG with a backtracking line search until max|grad| < tol, every
    sum a pass over the training set's blocks. At that stationary point
    theta = sum_i alpha_i phi_i^T with alpha_i = representer_values(...)."""
    if not strength > 0:
        raise ValueError(f"rps_lambda must be > 0 (the representer values divide by it), got {strength}")
    theta = torch.zeros(data.C, data.Dp, dtype=torch.float64, device=data.device) \
        if init is None else init.double().clone()
    loss, grad = _objective(data, strength, theta)
    for _ in range(max_steps):
        if float(grad.abs().max()) < tol:
            break
        step = _newton_direction(data, strength, theta, grad)
        slope = float((grad * step).sum())
        for t in (0.5 ** i for i in range(30)):
            new_loss, new_grad = _objective(data, strength, theta + t * step)
            # Near the optimum the loss stops changing in float64; the gradient still shrinks.
            unresolved = abs(new_loss - loss) <= 1e-13 * abs(loss)
            if new_loss <= loss + 1e-4 * t * slope or (unresolved and new_grad.abs().max() < grad.abs().max()):
                break
        else:
            break  # no step length makes progress: the gap check below reports how far off it is
        theta, loss, grad = theta + t * step, new_loss, new_grad
    # theta - sum_i alpha_i phi_i^T = grad / (2 strength): that gap is what the decomposition misses.
    gap = float(grad.abs().max()) / (2.0 * strength)
    if gap > 1e-6 * max(1.0, float(theta.abs().max())):
        raise RuntimeError(f"RPS-l2 refit: stopped with max|grad| = {float(grad.abs().max()):.3g}, "
                           f"too far from stationary for the representer decomposition (gap {gap:.3g})")
    return theta


def representer_values(phi, target_logits, theta, strength: float, N: int) -> torch.Tensor:
    """alpha (b, C) float64 of rows phi (b, Dp): -(p_i - target_i) / (2 strength N)."""
    p = torch.softmax(phi.double() @ theta.T, dim=1)
    return -(p - torch.softmax(target_logits.double(), dim=1)) / (2.0 * strength * N)


def _objective(data, strength, theta):
    """(loss, gradient) of the refit objective at theta."""
    def block(phi, target_logits):
        phi = phi.double()
        log_p = torch.log_softmax(phi @ theta.T, 1)
        target = torch.softmax(target_logits.double(), 1)
        return -(target * log_p).sum(1).mean(), (log_p.exp() - target).T @ phi / phi.shape[0]
    loss, grad = data.mean(block)
    return float(loss + strength * theta.square().sum()), grad + 2 * strength * theta


def _newton_direction(data, strength, theta, grad, max_iters=500):
    """Solves H x = -grad by conjugate gradients on the exact Hessian-vector product,
    to a relative residual min(0.5, sqrt|grad|) (superlinear once close)."""
    def hvp(v):  # (1/N) sum_i (diag(p_i) - p_i p_i^T)(v phi_i) phi_i^T + 2 strength v
        def block(phi, target_logits):
            phi = phi.double()
            p = torch.softmax(phi @ theta.T, 1)
            z = phi @ v.T
            return ((p * z - p * (p * z).sum(1, keepdim=True)).T @ phi / phi.shape[0],)
        return data.mean(block)[0] + 2 * strength * v

    x, r = torch.zeros_like(theta), -grad
    d, rr = r.clone(), float((r * r).sum())
    stop = min(0.5, rr ** 0.25) * rr ** 0.5
    for _ in range(max_iters):
        Hd = hvp(d)
        a = rr / float((d * Hd).sum())
        x, r = x + a * d, r - a * Hd
        rr_new = float((r * r).sum())
        if rr_new ** 0.5 <= stop:
            break
        d, rr = r + (rr_new / rr) * d, rr_new
    return x


def ascent_step(mean_gradient: torch.Tensor, theta: torch.Tensor, step: float):
    """Theta* = Theta + step * mean training gradient (Sui Eq. 10), float64 (C, Dp)."""
    return theta.double() + step * mean_gradient
