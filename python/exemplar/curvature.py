"""Damped inverse curvature H_lambda^-1 in the forms the kernels consume
(DESIGN.md §2). Statistics come from the ops in float64; decompositions are
torch.linalg in float64; the operators used for scoring are cast to the data's
dtype. Each curvature answers two questions: precondition a batch of test
gradients g_t = r_t phi_t^T into S_t = H_lambda^-1 g_t (general or rank-1), and
give every training example's |H_lambda^-1 g_i|^2 and g_i^T H_lambda^-1 g_i."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import ops

# Eigen-directions whose damped eigenvalue falls below this fraction of the
# largest get weight 0 instead of 1/0: with damping 0 the inverse becomes the
# pseudo-inverse (H is singular along the softmax's redundant direction).
RCOND = 1e-10


@dataclass
class General:
    S: torch.Tensor  # (T, C, Dp)


@dataclass
class Rank1:
    alpha: torch.Tensor  # (T, C)
    beta: torch.Tensor  # (T, Dp)


def inverse_damped(eigenvalues: torch.Tensor, damping: float) -> torch.Tensor:
    damped = eigenvalues + damping
    floor = RCOND * float(damped.abs().max())
    return torch.where(damped > floor, 1.0 / damped, torch.zeros_like(damped))


class Exact:
    """H_lambda^-1 as an explicit (C*Dp, C*Dp) matrix."""

    def __init__(self, hinv):
        self.hinv = hinv  # (C*Dp, C*Dp)

    @classmethod
    def fit(cls, phi, logits, damping):
        e, V = torch.linalg.eigh(ops.exact_hessian(phi, logits))
        return cls(((V * inverse_damped(e, damping)) @ V.T).to(phi.dtype))

    def precondition(self, r, phi):
        T, C, Dp = r.shape[0], r.shape[1], phi.shape[1]
        g = (r.unsqueeze(2) * phi.unsqueeze(1)).reshape(T, C * Dp)
        return General((g @ self.hinv).view(T, C, Dp))

    def norms(self, R, Phi):
        return ops.dense_norms(R, Phi, self.hinv)


class Eigenbasis:
    """H_lambda^-1 = (Q_G x Q_A) diag(w) (Q_G x Q_A)^T with a full (C, Dp) weight
    grid: K-FAC with eigenbasis damping, and EK-FAC."""

    def __init__(self, qg, qa, w):
        self.qg, self.qa, self.w = qg, qa, w  # (C, C), (Dp, Dp), (C, Dp)

    def precondition(self, r, phi):
        rotated = (r @ self.qg).unsqueeze(2) * (phi @ self.qa).unsqueeze(1) * self.w
        return General(self.qg @ rotated @ self.qa.T)

    def norms(self, R, Phi):
        return ops.eigenbasis_norms(R, Phi, self.qg, self.qa, self.w)


class Factored:
    """K-FAC with factored damping: (G + pi sqrt(l) I)^-1 x (A + sqrt(l)/pi I)^-1,
    a Kronecker product, so every S_t is rank 1."""

    def __init__(self, qg, qa, u, v):
        self.qg, self.qa, self.u, self.v = qg, qa, u, v  # (C, C), (Dp, Dp), (C,), (Dp,)

    @classmethod
    def fit(cls, qg, sg, qa, sa, damping, dtype):
        C, Dp = sg.shape[0], sa.shape[0]
        mean_g, mean_a = float(sg.sum()) / C, float(sa.sum()) / Dp
        # pi balances the damping between the factors by their mean eigenvalue.
        pi = math.sqrt(mean_g / mean_a) if mean_g > 0 and mean_a > 0 else 1.0
        root = math.sqrt(damping)
        return cls(qg.to(dtype), qa.to(dtype), inverse_damped(sg, pi * root).to(dtype),
                   inverse_damped(sa, root / pi).to(dtype))

    def precondition(self, r, phi):
        return Rank1(((r @ self.qg) * self.u) @ self.qg.T, ((phi @ self.qa) * self.v) @ self.qa.T)

    def norms(self, R, Phi):
        return ops.eigenbasis_norms(R, Phi, self.qg, self.qa, torch.outer(self.u, self.v))


class Identity:
    """H_lambda^-1 = I / lambda, or I when lambda = 0 (plain gradient dot products)."""

    def __init__(self, scale):
        self.scale = scale  # 0-dim tensor

    @classmethod
    def fit(cls, damping, like):
        return cls(like.new_tensor(1.0 / damping if damping > 0 else 1.0))

    def precondition(self, r, phi):
        return Rank1(r * self.scale, phi)

    def norms(self, R, Phi):
        sq = R.square().sum(1) * Phi.square().sum(1)
        return sq * self.scale**2, sq * self.scale


KINDS = {cls.__name__: cls for cls in (Exact, Eigenbasis, Factored, Identity)}


def state(curvature) -> tuple[str, dict[str, torch.Tensor]]:
    """(kind, tensors): everything needed to rebuild `curvature` without refitting."""
    return type(curvature).__name__, dict(vars(curvature))


def from_state(kind: str, tensors: dict[str, torch.Tensor]):
    if kind not in KINDS:
        raise ValueError(f"unknown curvature kind {kind!r}; expected one of {tuple(KINDS)}")
    return KINDS[kind](**tensors)


def build(curvature: str, damping: float, kfac_damping: str, phi, logits):
    if curvature == "identity":
        return Identity.fit(damping, phi)
    if curvature == "exact":
        return Exact.fit(phi, logits, damping)
    A, G = ops.kfac_factors(phi, logits)
    sa, qa = torch.linalg.eigh(A)
    sg, qg = torch.linalg.eigh(G)
    if curvature == "kfac" and kfac_damping == "factored":
        return Factored.fit(qg, sg, qa, sa, damping, phi.dtype)
    if curvature == "kfac":
        eig = torch.outer(sg, sa)
    else:
        eig = ops.ekfac_eigenvalues(phi, logits, qa, qg)
    dtype = phi.dtype
    return Eigenbasis(qg.to(dtype), qa.to(dtype), inverse_damped(eig, damping).to(dtype))
