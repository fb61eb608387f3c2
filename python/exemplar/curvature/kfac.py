"""Kronecker-factored curvatures (docs/design.md §2): K-FAC and EK-FAC fit
the eigenbasis Q_G x Q_A of G x A and a (C, Dp) grid of damped inverse
eigenvalues (Eigenbasis), that grid truncated to rank m (LowRankEigenbasis),
or K-FAC with the damping split between the factors (Factored, rank 1)."""
from __future__ import annotations

import math

import torch

from .. import ops
from ..ops import General, LowRank, Rank1
from .base import (
    Curvature,
    LayerStatistics,
    Statistics,
    cast_inverse,
    check_pseudo_inverse,
    inverse_damped,
    mean_sq_norm,
    register,
    weighted,
)

# rank="auto": the smallest m with |W - W_m|_F <= LOW_RANK_TOL |W|_F, W the
# damped inverse eigenvalues in the K-FAC / EK-FAC eigenbasis.
LOW_RANK_TOL = 1e-3


def without_null_direction(weights: torch.Tensor, qg: torch.Tensor) -> torch.Tensor:
    """weights (C, ...) in G's eigenbasis qg (C, C), with the row of the column
    along 1/sqrt(C) zeroed: the direction in which every Lambda_i = diag(p) - p p^T
    is 0 and every residual has no component (see project_out_null)."""
    C = qg.shape[0]
    alignment = (qg.sum(0) / math.sqrt(C)).abs()
    j = int(alignment.argmax())
    if float(alignment[j]) > 1 - 1e-6:
        weights[j] = 0
    return weights


class Eigenbasis(Curvature):
    """H_lambda^-1 = (Q_G x Q_A) diag(w) (Q_G x Q_A)^T with a full (C, Dp) weight
    grid: K-FAC with eigenbasis damping, and EK-FAC."""

    def __init__(self, qg, qa, w):
        self.qg, self.qa, self.w = qg, qa, w  # (C, C), (Dp, Dp), (C, Dp)

    @staticmethod
    def shapes(C, Dp):
        return {"qg": (C, C), "qa": (Dp, Dp), "w": (C, Dp)}

    def precondition(self, r, phi):
        rotated = (r @ self.qg).unsqueeze(2) * (phi @ self.qa).unsqueeze(1) * self.w
        return General(self.qg @ rotated @ self.qa.T)

    def norms(self, R, Phi, N=None):
        return ops.eigenbasis_norms(R, Phi, self.qg, self.qa, self.w)

    def solve(self, V):
        qg, qa = self.qg.double(), self.qa.double()
        return qg @ ((qg.T @ V.double() @ qa) * self.w.double()) @ qa.T

    def matrix_norms(self, G):
        rotated = (self.qg.double().T @ G.double() @ self.qa.double()).square()
        w = self.w.double()
        return (rotated * w.square()).sum((1, 2)), (rotated * w).sum((1, 2))


class LowRankEigenbasis(Curvature):
    """Eigenbasis with its weight grid W (C, Dp) truncated to rank m, W_m =
    u^T v = sum_j sigma_j u_j v_j^T: every S_t is then m rank-1 terms,
    Q_G((Q_G^T r_t) * u_j)((Q_A^T phi_t) * v_j)^T Q_A^T, so a score costs
    2 m (C + Dp) flops instead of 2 C Dp. The normalisers use the same W_m."""

    def __init__(self, qg, qa, u, v):
        self.qg, self.qa, self.u, self.v = qg, qa, u, v  # (C, C), (Dp, Dp), (m, C), (m, Dp)

    @classmethod
    def truncated(cls, qg, qa, w, rank, dtype) -> "LowRankEigenbasis":
        """w (C, Dp) float64; rank: m, or "auto" for the smallest m with
        |W - W_m|_F <= LOW_RANK_TOL |W|_F."""
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        if rank == "auto":
            tail = S.flip(0).square().cumsum(0).flip(0)  # tail[m] = |W - W_m|_F^2
            within = (tail <= (LOW_RANK_TOL * float(S.square().sum().sqrt())) ** 2).nonzero()
            m = int(within[0]) if len(within) else len(S)
        else:
            m = min(rank, len(S))
        return cls(*(x.to(dtype) for x in (qg, qa, (U[:, :m] * S[:m]).T, Vh[:m])))

    @staticmethod
    def shapes(C, Dp):
        return {"qg": (C, C), "qa": (Dp, Dp), "u": ("m", C), "v": ("m", Dp)}

    def precondition(self, r, phi):
        a = (r @ self.qg).unsqueeze(1) * self.u  # (T, m, C)
        b = (phi @ self.qa).unsqueeze(1) * self.v  # (T, m, Dp)
        return LowRank(a @ self.qg.T, b @ self.qa.T)

    def norms(self, R, Phi, N=None):
        return ops.eigenbasis_norms(R, Phi, self.qg, self.qa, self.u.T @ self.v)


class Factored(Curvature):
    """K-FAC with factored damping: (G + pi sqrt(l) I)^-1 x (A + sqrt(l)/pi I)^-1,
    a Kronecker product, so every S_t is rank 1."""

    def __init__(self, qg, qa, u, v):
        self.qg, self.qa, self.u, self.v = qg, qa, u, v  # (C, C), (Dp, Dp), (C,), (Dp,)

    @classmethod
    def from_factors(cls, qg, sg, qa, sa, damping, dtype) -> "Factored":
        """From the eigendecompositions (qg, sg) of G and (qa, sa) of A, with
        pi balancing the damping between them."""
        C, Dp = sg.shape[0], sa.shape[0]
        mean_g, mean_a = float(sg.sum()) / C, float(sa.sum()) / Dp
        # pi balances the damping between the factors by their mean eigenvalue.
        pi = math.sqrt(mean_g / mean_a) if mean_g > 0 and mean_a > 0 else 1.0
        root = math.sqrt(damping)
        u = without_null_direction(inverse_damped(sg, pi * root), qg)
        return cls(qg.to(dtype), qa.to(dtype), cast_inverse(u, dtype, damping),
                   cast_inverse(inverse_damped(sa, root / pi), dtype, damping))

    @staticmethod
    def shapes(C, Dp):
        return {"qg": (C, C), "qa": (Dp, Dp), "u": (C,), "v": (Dp,)}

    def precondition(self, r, phi):
        return Rank1(((r @ self.qg) * self.u) @ self.qg.T, ((phi @ self.qa) * self.v) @ self.qa.T)

    def norms(self, R, Phi, N=None):
        return ops.eigenbasis_norms(R, Phi, self.qg, self.qa, torch.outer(self.u, self.v))


def _rotated_sq_sum(choices, qg, qa) -> torch.Tensor:
    """sum_i w_i (Q_G^T g_i Q_A)^2 over one batch's Fisher choices, (k_out, k_in).
    One position per example: (Q_G^T delta)^2 (Q_A^T a)^2^T, one GEMM per choice."""
    total = 0
    for w, d, a in choices:
        qg, qa = qg.to(d.device), qa.to(d.device)
        if d.shape[1] == 1:
            total = total + weighted((d[:, 0] @ qg).square(), w).T @ (a[:, 0] @ qa).square()
        else:
            total = total + weighted((qg.T @ (d.transpose(1, 2) @ a) @ qa).square(), w).sum(0)
    return total


class _KroneckerFit(Curvature):
    """What K-FAC and EK-FAC share: one pass for the factors A = E[phi phi^T]
    and G = E[Lambda] and their eigenbases, then damped inverse eigenvalues
    on the (C, Dp) grid (`eigenvalues` says which), truncated to rank m when
    settings.rank is set. A network's layer: A = E[a a^T] over positions and
    G = E[sum_p delta delta^T] from the Fisher's output gradients, damped in
    their eigenbasis (`layer_eigenvalues`)."""

    @classmethod
    def check(cls, settings):
        if settings.rank is not None and settings.kfac_damping != "eigenbasis":
            super().check(settings)

    @classmethod
    def forms(cls, settings):
        return ("LowRankEigenbasis",) if settings.rank is not None else ("Eigenbasis",)

    @classmethod
    def eigenvalues(cls, data, sa, qa, sg, qg) -> torch.Tensor:
        """(C, Dp) float64: H's eigenvalues in the eigenbasis Q_G x Q_A."""
        raise NotImplementedError

    @classmethod
    def factored(cls, settings) -> bool:
        """Whether fit returns the Factored form."""
        return False

    @classmethod
    def fit(cls, data: Statistics, settings):
        damping = settings.damping
        A, G, sq = data.mean(lambda phi, logits: (*ops.kfac_factors(phi, logits), mean_sq_norm(phi)))
        sa, qa = torch.linalg.eigh(A)
        sg, qg = torch.linalg.eigh(G)
        eig = cls.eigenvalues(data, sa, qa, sg, qg)
        check_pseudo_inverse(eig, float(sq), damping)
        dtype = data.dtype
        if cls.factored(settings):
            return Factored.from_factors(qg, sg, qa, sa, damping, dtype)
        w = without_null_direction(inverse_damped(eig, damping), qg)
        w_cast = cast_inverse(w, dtype, damping)
        if settings.rank is not None:
            return LowRankEigenbasis.truncated(qg, qa, w, settings.rank, dtype)
        return Eigenbasis(qg.to(dtype), qa.to(dtype), w_cast)

    @classmethod
    def layer_eigenvalues(cls, data: LayerStatistics, bases) -> list[torch.Tensor]:
        """Per layer (k_out, k_in) float64: its Fisher's eigenvalues in its
        eigenbasis, bases [(qg, sg, qa, sa)] per layer."""
        raise NotImplementedError

    @classmethod
    def fit_layers(cls, data: LayerStatistics, settings):
        def factors(j, choices):
            A = sum(torch.einsum("bpi,bpj->ij", weighted(a, w), a) for w, _, a in choices)
            G = sum(torch.einsum("bpi,bpj->ij", weighted(d, w), d) for w, d, _ in choices)
            positions = sum(float(a.shape[1] * (len(a) if w is None else w.sum())) for w, _, a in choices)
            return A, G, torch.tensor(positions, dtype=torch.float64)
        bases = []
        for A, G, positions in data.sums(factors):
            sa, qa = torch.linalg.eigh(A / max(float(positions), 1.0))
            sg, qg = torch.linalg.eigh(G / data.N)
            bases.append((qg, sg.clamp_min(0), qa, sa.clamp_min(0)))
        return [Eigenbasis(qg, qa, inverse_damped(eig, settings.damping))
                for (qg, _, qa, _), eig in zip(bases, cls.layer_eigenvalues(data, bases))]


@register
class KFAC(_KroneckerFit):
    """K-FAC: H ~ G x A, eigenvalues sg_c sa_d; with kfac_damping="factored"
    the damping is split between the factors (the rank-1 Factored form)."""
    name = "kfac"

    @classmethod
    def factored(cls, settings):
        return settings.kfac_damping == "factored"

    @classmethod
    def forms(cls, settings):
        return ("Factored",) if cls.factored(settings) else super().forms(settings)

    @classmethod
    def eigenvalues(cls, data, sa, qa, sg, qg):
        return torch.outer(sg, sa)

    @classmethod
    def layer_eigenvalues(cls, data, bases):
        return [torch.outer(sg, sa) for _, sg, _, sa in bases]


@register
class EKFAC(_KroneckerFit):
    """EK-FAC: K-FAC's eigenbasis with the eigenvalues refitted in it (a
    second pass over the training set); damped in the eigenbasis whatever
    kfac_damping says."""
    name = "ekfac"

    @classmethod
    def eigenvalues(cls, data, sa, qa, sg, qg):
        return data.mean(lambda phi, logits: (ops.ekfac_eigenvalues(phi, logits, qa, qg),))[0]

    @classmethod
    def layer_eigenvalues(cls, data, bases):
        sums = data.sums(lambda j, choices: (_rotated_sq_sum(choices, bases[j][0], bases[j][2]),))
        return [total / data.N for (total,) in sums]
