"""Many softmax regressions refitted at once (docs/design.md §10): the last
layer retrained on M subsets of one training set, each to a stated gradient
tolerance, in float64, by a batched Newton-CG whose every pass over the
training set's blocks (stores included) serves all M problems with one GEMM.

Subset j minimises f_j(Θ) = (1/n_j) Σ_i m_ji CE(Θ φ_i, y_i) + λ/2 |Θ|_F²
over Θ (C, Dp), with m_j its 0/1 mask and n_j its divisor (|S_j| for a
retrain on the subset, N for a removal that keeps the others' 1/N weights).
Newton's systems are solved by conjugate gradients preconditioned with the
damped inverse Hessian of the whole training set (curvature.Curvature.solve,
exact where it fits, EK-FAC otherwise): a random half's Hessian is close to
the whole set's, so a few CG steps solve each system. Every Θ keeps the sum
of its class rows at 0: softmax ignores that direction and weight decay
sends it to 0 at the minimum, so the minimiser lies in that subspace."""
from __future__ import annotations

import math

import torch

from ..engine.passes import Passes
from ..progress import Progress

# Elements of one (rows, subsets, classes) temporary: rows per chunk of a block.
CHUNK_ELEMENTS = 1 << 22
# Conjugate-gradient steps per Newton system, and step halvings per line search.
MAX_CG = 200
MAX_HALVINGS = 40


def centred(theta: torch.Tensor) -> torch.Tensor:
    """theta (..., C, Dp) with the mean class row subtracted: the same softmax."""
    return theta - theta.mean(-2, keepdim=True)


class SubsetObjectives:
    """The M objectives f_j over a training set's blocks, evaluated together
    for any selection of them (`which`, indices into 0..M-1).

    Arguments:
        passes: the training set's blocks (Passes of the engine).
        masks: (M, N) bool, the rows each subset trains on.
        divisors: (M,) float64, each objective's n_j.
        weight_decay: lambda > 0."""

    def __init__(self, passes: Passes, masks: torch.Tensor, divisors: torch.Tensor, weight_decay: float,
                 progress: Progress | None = None):
        self.passes, self.masks, self.weight_decay, self.progress = passes, masks.cpu(), weight_decay, progress
        t = passes.train
        self.device = t.device
        self.divisors = divisors.double().to(self.device)
        self.C, self.Dp = t.num_classes, t.num_features + passes.bias

    def _chunks(self, which: torch.Tensor):
        """(phi (b, Dp) float64, labels (b,), weights (b, m) = m_ji / n_j) per chunk of rows."""
        m = len(which)
        step = max(64, CHUNK_ELEMENTS // max(m * self.C, 1))
        divisors = self.divisors[which]
        rows_of = which.cpu()
        for rows in self.passes.rows(self.passes.own(), None):
            mask = self.masks[rows_of, rows.start:rows.start + len(rows)].to(self.device)
            for a in range(0, len(rows), step):
                weights = mask[:, a:a + step].T.double() / divisors
                yield rows.phi[a:a + step].double(), rows.labels[a:a + step], weights
        if self.progress is not None:
            self.progress.update()

    def value_grad(self, theta: torch.Tensor, which: torch.Tensor):
        """f (m,) and the gradients (m, C, Dp) at theta (m, C, Dp)."""
        m, C, Dp = theta.shape
        f = torch.zeros(m, dtype=torch.float64, device=self.device)
        grad = torch.zeros(m * C, Dp, dtype=torch.float64, device=self.device)
        flat = theta.reshape(m * C, Dp)
        for phi, labels, w in self._chunks(which):
            b = len(labels)
            logp = torch.log_softmax((phi @ flat.T).view(b, m, C), dim=2)
            index = labels.view(b, 1, 1).expand(b, m, 1)
            f -= (w * logp.gather(2, index).squeeze(2)).sum(0)
            residual = logp.exp_().scatter_add_(2, index, torch.full((b, m, 1), -1.0, dtype=torch.float64,
                                                                                device=self.device))
            grad.addmm_((residual * w.unsqueeze(2)).view(b, m * C).T, phi)
        lam = self.weight_decay
        return f + 0.5 * lam * theta.square().sum((1, 2)), grad.view(m, C, Dp) + lam * theta

    def hessian_times(self, theta: torch.Tensor, V: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """H_j(theta_j) V_j for every selected j: (m, C, Dp)."""
        m, C, Dp = theta.shape
        out = torch.zeros(m * C, Dp, dtype=torch.float64, device=self.device)
        both = torch.cat([theta.reshape(m * C, Dp), V.reshape(m * C, Dp)])
        for phi, _, w in self._chunks(which):
            b = phi.shape[0]
            Z = (phi @ both.T).view(b, 2, m, C)
            p, u = torch.softmax(Z[:, 0], dim=2), Z[:, 1]
            ju = p * (u - (p * u).sum(2, keepdim=True))  # (diag(p) - p p^T) u
            out.addmm_((ju * w.unsqueeze(2)).view(b, m * C).T, phi)
        return out.view(m, C, Dp) + self.weight_decay * V


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum((1, 2))


def conjugate_gradients(hessian_times, rhs: torch.Tensor, precondition, rtol: torch.Tensor):
    """Solves H_j x_j = rhs_j for every j by preconditioned CG, each system
    stopping once |residual_j| <= rtol_j |rhs_j|; only unfinished systems are
    multiplied. hessian_times(V, running) -> H V for the systems `running`."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = precondition(r)
    p, rz = z.clone(), _dot(r, z)
    goal = rtol * rhs.flatten(1).norm(dim=1)
    running = torch.nonzero(r.flatten(1).norm(dim=1) > goal).flatten()
    for _ in range(MAX_CG):
        if len(running) == 0:
            break
        Ap = hessian_times(p[running], running)
        alpha = rz[running] / _dot(p[running], Ap)
        x[running] += alpha.view(-1, 1, 1) * p[running]
        r[running] -= alpha.view(-1, 1, 1) * Ap
        still = r[running].flatten(1).norm(dim=1) > goal[running]
        running = running[still]
        if len(running) == 0:
            break
        z = precondition(r[running])
        rz_new = _dot(r[running], z)
        p[running] = z + (rz_new / rz[running]).view(-1, 1, 1) * p[running]
        rz[running] = rz_new
    return x


def newton(objectives: SubsetObjectives, theta: torch.Tensor, which: torch.Tensor, precondition, tol: float,
           max_iter: int):
    """Minimises the selected objectives from theta (m, C, Dp) by Newton-CG
    with a backtracking (Armijo) line search.

    Returns:
        (theta (m, C, Dp), gradient norms (m,), Newton steps (m,)); a subset
        converged when its gradient norm is <= tol."""
    theta = centred(theta.double()).clone()
    m, device = len(which), theta.device
    which = which.to(device)
    f, grad = objectives.value_grad(theta, which)
    norms = grad.flatten(1).norm(dim=1)
    steps = torch.zeros(m, dtype=torch.int64, device=device)
    active = torch.nonzero(norms > tol).flatten()  # positions in 0..m-1
    for _ in range(max_iter):
        if len(active) == 0:
            break
        g, th, subsets = grad[active], theta[active], which[active]
        rtol = norms[active].sqrt().clamp(max=0.5)  # forcing terms: superlinear near the minimum

        def hessian_times(V, run, th=th, subsets=subsets):
            return objectives.hessian_times(th[run], V, subsets[run])

        direction = conjugate_gradients(hessian_times, -g, precondition, rtol)
        slope = _dot(g, direction)
        step = torch.ones(len(active), dtype=torch.float64, device=device)
        pending = torch.arange(len(active), device=device)
        for _ in range(MAX_HALVINGS):
            trial = th[pending] + step[pending].view(-1, 1, 1) * direction[pending]
            f_new, g_new = objectives.value_grad(trial, which[active[pending]])
            f_old = f[active[pending]]
            # Armijo, with slack for float64 rounding of f where Newton steps are tiny
            ok = f_new <= f_old + 1e-4 * step[pending] * slope[pending] + 1e-14 * f_old.abs().clamp(min=1)
            ok &= torch.isfinite(f_new)
            done = active[pending[ok]]
            theta[done], f[done], grad[done] = trial[ok], f_new[ok], g_new[ok]
            steps[done] += 1
            step[pending[~ok]] /= 2
            pending = pending[~ok]
            if len(pending) == 0:
                break
        norms = grad.flatten(1).norm(dim=1)
        stuck = torch.zeros(m, dtype=torch.bool, device=device)
        stuck[active[pending]] = True  # no step decreased f: leave it unconverged
        active = active[(norms[active] > tol) & ~stuck[active]]
    return theta, norms, steps


def target_outputs(theta: torch.Tensor, phi: torch.Tensor, labels: torch.Tensor, target: str) -> torch.Tensor:
    """The output a retrained layer theta (m, C, Dp) gives each test (phi (T, Dp)
    float64, labels (T,)): "log_prob" log p(label), "prob" p(label), or
    "margin" z_label - logsumexp of the other logits = log(p / (1 - p)). (m, T)."""
    z = torch.einsum("mcd,td->mtc", theta, phi)
    index = labels.view(1, -1, 1).expand(z.shape[0], -1, 1)
    own = z.gather(2, index).squeeze(2)
    if target == "margin":
        others = z.scatter(2, index, -math.inf)
        return own - torch.logsumexp(others, dim=2)
    log_p = own - torch.logsumexp(z, dim=2)
    return log_p if target == "log_prob" else log_p.exp()
