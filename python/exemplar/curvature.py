"""Damped inverse curvature H_lambda^-1 in the forms the kernels consume
(docs/design.md §2). Statistics come from the ops in float64; decompositions are
torch.linalg in float64; the operators used for scoring are cast to the data's
dtype. Each curvature answers two questions: precondition a batch of test
gradients g_t = r_t phi_t^T into S_t = H_lambda^-1 g_t (general or rank-1), and
give every training example's |H_lambda^-1 g_i|^2 and g_i^T H_lambda^-1 g_i."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from . import ops

# With damping 0, eigen-directions whose eigenvalue falls below this fraction
# of the largest get weight 0 instead of 1/0: the inverse becomes the
# pseudo-inverse (H is singular along the softmax's redundant direction).
RCOND = 1e-10
# Curvatures whose largest eigenvalue is below this fraction of the scale of
# the terms summed into them are rounding noise (float64 eps is ~1e-16).
PSEUDO_INVERSE_FLOOR = 1e-12
# rank="auto": the smallest m with |W - W_m|_F <= LOW_RANK_TOL |W|_F, W the
# damped inverse eigenvalues in the K-FAC / EK-FAC eigenbasis.
LOW_RANK_TOL = 1e-3
# Float64 (C*Dp)^2 matrices exact curvature may hold at its peak: H, its
# eigenvectors, their weighted copy and the inverse (damping = 0); the
# Cholesky path's H, its reduced copy and factor, and the inverse fit within.
EXACT_MATRICES = 4
# Sustained GEMM/factorisation rate behind exact_cost's time estimates: about
# what 2 cores of the development machine give (bench/RESULTS.md measures it).
EXACT_GFLOPS = 100


@dataclass
class General:
    S: torch.Tensor  # (T, C, Dp)


@dataclass
class Rank1:
    alpha: torch.Tensor  # (T, C)
    beta: torch.Tensor  # (T, Dp)


@dataclass
class LowRank(Rank1):
    """S_t = sum_j alpha_tj beta_tj^T: the rank-1 ops take these as they are."""
    alpha: torch.Tensor  # (T, m, C)
    beta: torch.Tensor  # (T, m, Dp)


def scaled(gradient: General | Rank1, factor: float) -> General | Rank1:
    if isinstance(gradient, Rank1):
        return type(gradient)(gradient.alpha * factor, gradient.beta)
    return General(gradient.S * factor)


def gradient_sq_norms(R: torch.Tensor, Phi: torch.Tensor) -> torch.Tensor:
    """|r_i|^2 |phi_i|^2 = |g_i|^2, (N,) float64: the product of the row norms is
    squared in float64, where it cannot under- or overflow, with no (N, D) temporary."""
    return (torch.linalg.vector_norm(R, dim=1).double() * torch.linalg.vector_norm(Phi, dim=1).double()).square()


def inverse_damped(eigenvalues: torch.Tensor, damping: float) -> torch.Tensor:
    """1 / (eigenvalue + damping) of a PSD matrix's eigenvalues; negative ones
    are rounding and count as 0. Damping 0 gives the pseudo-inverse."""
    damped = eigenvalues.clamp_min(0) + damping
    if damping > 0:
        return 1.0 / damped
    floor = RCOND * float(damped.max())
    return torch.where(damped > floor, 1.0 / damped.clamp_min(floor), torch.zeros_like(damped))


def cast_inverse(x: torch.Tensor, dtype: torch.dtype, damping: float) -> torch.Tensor:
    """x (float64) in the data's dtype, refusing what that dtype cannot hold
    instead of scoring with inf and NaN."""
    out = x.to(dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"damping={damping}: the inverse curvature (largest entry "
                         f"{float(x.abs().max()):.3g}) exceeds the range of {dtype}; the curvature is "
                         "nearly singular (a very confident fit). Use damping > 0 or float64 data")
    return out


def check_pseudo_inverse(eigenvalues: torch.Tensor, mean_sq_norm: float, damping: float) -> None:
    """With damping 0 the inverse is the pseudo-inverse of H itself, which is
    meaningless when H is below the rounding of its own sums: a training set
    fit so confidently that every p(1 - p) underflows against 1 - p."""
    if damping > 0:
        return
    scale = 0.25 * mean_sq_norm  # largest p(1-p) times mean |phi|^2
    largest = float(eigenvalues.max())
    if not largest > PSEUDO_INVERSE_FLOOR * scale:
        raise ValueError(f"damping=0: the curvature is below float64 rounding (largest eigenvalue "
                         f"{largest:.3g}, scale {scale:.3g}); the model fits the training set so "
                         "confidently that its pseudo-inverse is noise. Use damping > 0")


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


def project_out_null(hinv: torch.Tensor, C: int, Dp: int) -> torch.Tensor:
    """P hinv P with P = (I - 11^T/C) x I. Every gradient r phi^T has r summing
    to 0, so P g = g and no score changes; but the 1/damping that H_lambda^-1
    holds on the null space would otherwise swamp, in float32 rounding, the
    ~1/|phi|^2 it holds elsewhere once features are large."""
    h = hinv.view(C, Dp, C, Dp)
    h.sub_(h.mean(0, keepdim=True))  # in place: the inverse may be most of memory
    h.sub_(h.mean(2, keepdim=True))
    return hinv


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def exact_cost(C: int, Dp: int, N: int) -> dict[str, float]:
    """Upper bounds on the peak bytes and seconds of exact curvature for C
    classes, Dp feature columns and N training examples. The flops are counted
    as for all C(C+1)/2 Gram blocks (N Dp^2 C(C+1); exact_hessian computes
    C(C-1)/2 of them) and a factor of side C Dp ((C Dp)^3 / 3; the Cholesky
    path's side is (C-1) Dp) in `fit_s`; `norms_s` adds the RelatIF
    normalisers (an inverse, 2/3 (C Dp)^3, and one (N, C Dp) x (C Dp, C Dp)
    product). Seconds assume EXACT_GFLOPS."""
    n = C * Dp
    fit = N * Dp**2 * C * (C + 1) + n**3 / 3
    norms = 2 * n**3 / 3 + 2 * N * n**2
    return {"bytes": EXACT_MATRICES * 8.0 * n * n, "fit_s": fit / EXACT_GFLOPS / 1e9,
            "norms_s": norms / EXACT_GFLOPS / 1e9}


def check_exact_fits(C: int, Dp: int, N: int, device: torch.device) -> None:
    """Refuses exact curvature before allocating when its matrices cannot fit,
    saying what it would cost and what to use instead."""
    cost = exact_cost(C, Dp, N)
    have = available_bytes(device)
    if cost["bytes"] > have:
        raise MemoryError(f"exact curvature for C*Dp = {C * Dp} needs about {cost['bytes'] / 1e9:.1f} GB "
                          f"({EXACT_MATRICES} float64 matrices of {C * Dp} x {C * Dp}), more than the "
                          f"{have / 1e9:.1f} GB available on {device}, and about {cost['fit_s']:.0f} s to fit "
                          f"(+{cost['norms_s']:.0f} s for RelatIF normalisers) at N = {N}; use "
                          "curvature='ekfac' (or 'kfac') for a head this large")


class Curvature:
    """What every curvature answers: precondition(r (T, C), phi (T, Dp)) -> General
    or Rank1; norms(R, Phi) -> (|H^-1 g_i|^2, g_i^T H^-1 g_i), each (N,); and
    quad_norms, the second alone, where a curvature gets it for less."""

    def quad_norms(self, R, Phi):
        return self.norms(R, Phi)[1]

    def norms(self, R, Phi, N=None):
        """N: rows in the whole training set, when R and Phi are one block of it."""
        raise NotImplementedError


class Exact(Curvature):
    """H_lambda^-1 as an explicit (C*Dp, C*Dp) matrix: the pseudo-inverse, from an
    eigendecomposition, when damping = 0."""

    def __init__(self, hinv):
        self.hinv = hinv  # (C*Dp, C*Dp)

    @classmethod
    def fit(cls, data: Statistics, damping):
        check_exact_fits(data.C, data.Dp, data.N, data.device)
        # float64 GEMMs: the pseudo-inverse reads the smallest eigenvalues, which
        # float32 sums would bury in rounding.
        H, sq = data.mean(lambda phi, logits: (ops.exact_hessian(phi.double(), logits.double()),
                                               mean_sq_norm(phi)))
        e, V = torch.linalg.eigh(H)
        del H
        check_pseudo_inverse(e, float(sq), damping)
        hinv = project_out_null((V * inverse_damped(e, damping)) @ V.T, data.C, data.Dp)
        return cls(cast_inverse(hinv, data.dtype, damping))

    @staticmethod
    def shapes(C, Dp):
        return {"hinv": (C * Dp, C * Dp)}

    def precondition(self, r, phi):
        T, C, Dp = r.shape[0], r.shape[1], phi.shape[1]
        g = (r.unsqueeze(2) * phi.unsqueeze(1)).reshape(T, C * Dp)
        return General((g @ self.hinv).view(T, C, Dp))

    def norms(self, R, Phi, N=None):
        return ops.dense_norms(R, Phi, self.hinv)


def residual_basis(C: int, device=None) -> torch.Tensor:
    """(C, C-1) float64 orthonormal columns spanning {r : sum r = 0}, where
    every residual p - e_y lies (Helmert's basis). In these coordinates the
    softmax's null directions, where H is 0, are gone."""
    j = torch.arange(1, C, dtype=torch.float64, device=device)
    c = torch.arange(C, device=device).unsqueeze(1)
    scale = (j * (j + 1)).rsqrt()
    return torch.where(c < j, scale, torch.where(c == j, -j * scale, torch.zeros_like(scale)))


class ExactCholesky(Curvature):
    """H_lambda^-1 through a Cholesky factor (damping > 0), a third of the flops
    of an eigendecomposition, in the residual basis E = residual_basis(C):
    every gradient is g = (E s) phi^T with s = E^T r, so H_lambda^-1 g =
    (E x I) H~^-1 (s x phi) with H~ = (E x I)^T H (E x I) + lambda I of side
    (C-1) Dp. That is smaller than H ((C-1)^2/C^2 the work per solve) and has
    no null directions for float32 rounding to be amplified in by 1/damping.
    Test gradients are solved for; the training set's norms are triangular
    solves, or one GEMM against the inverse when N is large enough to pay for it."""

    def __init__(self, chol):
        self.chol = chol  # ((C-1)*Dp, (C-1)*Dp) float64, lower triangular

    @classmethod
    def fit(cls, data: Statistics, damping):
        C, Dp = data.C, data.Dp
        check_exact_fits(C, Dp, data.N, data.device)
        cast_inverse(torch.tensor(1.0 / damping, dtype=torch.float64), data.dtype, damping)  # its largest entry
        E = residual_basis(C, data.device)
        (H,) = data.mean(lambda phi, logits: (ops.exact_hessian(phi, logits),))
        # (E x I)^T H (E x I) as two thin products, the second batched over rows,
        # so the result is laid out (a, d, b, e) with no permuted copy.
        rows = E.T @ H.view(C, -1)  # (C-1, Dp*C*Dp)
        del H
        reduced = torch.matmul(E.T, rows.view((C - 1) * Dp, C, Dp)).view((C - 1) * Dp, (C - 1) * Dp)
        del rows
        reduced.diagonal().add_(damping)
        chol, info = torch.linalg.cholesky_ex(reduced)
        if int(info) != 0:  # H is PSD, so only rounding far beyond damping gets here
            raise ValueError(f"damping={damping}: H + damping I is not positive definite in float64 "
                             f"(Cholesky failed at row {int(info)}); use a larger damping")
        return cls(chol)

    @staticmethod
    def shapes(C, Dp):
        return {"chol": ((C - 1) * Dp, (C - 1) * Dp, torch.float64)}

    def _reduced(self, R):
        """R (N, C) -> R E (N, C-1), the residuals' coordinates in the basis."""
        return (R.double() @ residual_basis(R.shape[1], R.device)).to(R.dtype)

    def precondition(self, r, phi):
        T, C, Dp = r.shape[0], r.shape[1], phi.shape[1]
        E = residual_basis(C, r.device)
        g = ((r.double() @ E).unsqueeze(2) * phi.double().unsqueeze(1)).reshape(T, (C - 1) * Dp)
        y = torch.cholesky_solve(g.T, self.chol).T.reshape(T, C - 1, Dp)
        return General(torch.einsum("ck,tkd->tcd", E, y).to(r.dtype))

    def norms(self, R, Phi, N=None):
        # Both norms cost 2 N ((C-1) Dp)^2 either way; a GEMM against the
        # explicit inverse runs faster than triangular solves on small factors,
        # and the inverse's (2/3)((C-1) Dp)^3 pays off once the N rows of the
        # whole training set are several times (C-1) Dp (bench/RESULTS.md,
        # exact curvature). It is computed once, not per block of rows.
        if 4 * self.chol.shape[0] < (N or R.shape[0]):
            if getattr(self, "_inverse", None) is None or self._inverse.dtype != R.dtype:
                self._inverse = torch.cholesky_inverse(self.chol).to(R.dtype)
            return ops.dense_norms(self._reduced(R), Phi, self._inverse)
        return ops.cholesky_norms(self._reduced(R), Phi, self.chol)

    def quad_norms(self, R, Phi):
        return ops.cholesky_quad_norms(self._reduced(R), Phi, self.chol)


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


class LowRankEigenbasis(Curvature):
    """Eigenbasis with its weight grid W (C, Dp) truncated to rank m, W_m =
    u^T v = sum_j sigma_j u_j v_j^T: every S_t is then m rank-1 terms,
    Q_G((Q_G^T r_t) * u_j)((Q_A^T phi_t) * v_j)^T Q_A^T, so a score costs
    2 m (C + Dp) flops instead of 2 C Dp. The normalisers use the same W_m."""

    def __init__(self, qg, qa, u, v):
        self.qg, self.qa, self.u, self.v = qg, qa, u, v  # (C, C), (Dp, Dp), (m, C), (m, Dp)

    @classmethod
    def fit(cls, qg, qa, w, rank, dtype):
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
    def fit(cls, qg, sg, qa, sa, damping, dtype):
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


class Identity(Curvature):
    """H_lambda^-1 = I / lambda, or I when lambda = 0 (plain gradient dot products)."""

    def __init__(self, scale):
        self.scale = scale  # 0-dim tensor

    @classmethod
    def fit(cls, damping, dtype, device):
        return cls(cast_inverse(torch.tensor(1.0 / damping if damping > 0 else 1.0, dtype=torch.float64),
                                dtype, damping).to(device))

    @staticmethod
    def shapes(C, Dp):
        return {"scale": ()}

    def precondition(self, r, phi):
        return Rank1(r * self.scale, phi)

    def norms(self, R, Phi, N=None):
        sq = gradient_sq_norms(R, Phi)
        scale = self.scale.double()
        return (sq * scale**2).to(R.dtype), (sq * scale).to(R.dtype)


KINDS = {cls.__name__: cls for cls in (Exact, ExactCholesky, Eigenbasis, LowRankEigenbasis, Factored, Identity)}


def state(curvature) -> tuple[str, dict[str, torch.Tensor]]:
    """(kind, tensors): everything needed to rebuild `curvature` without refitting."""
    return type(curvature).__name__, {k: v for k, v in vars(curvature).items() if not k.startswith("_")}


def from_state(kind: str, tensors: dict[str, torch.Tensor]):
    if kind not in KINDS:
        raise ValueError(f"unknown curvature kind {kind!r}; expected one of {tuple(KINDS)}")
    return KINDS[kind](**tensors)


def kinds_of(curvature: str, kfac_damping: str, damping: float, rank=None) -> tuple[str, ...]:
    """The class names a curvature with these settings may be stored as (the
    first is what `build` returns; exact curvature saved as an explicit inverse
    stays loadable at any damping)."""
    if rank is not None:
        return ("LowRankEigenbasis",)
    if curvature == "kfac":
        return ("Factored",) if kfac_damping == "factored" else ("Eigenbasis",)
    if curvature == "exact":
        return ("ExactCholesky", "Exact") if damping > 0 else ("Exact",)
    return {"ekfac": ("Eigenbasis",), "identity": ("Identity",)}[curvature]


class Statistics:
    """Means over the training set for fitting a curvature: `mean(fn)` is
    (1/N) sum_i of what fn(phi (b, Dp), logits (b, C)) returns as per-block
    means (a tuple of float64 tensors), block by block and across ranks."""
    N: int
    C: int
    Dp: int
    dtype: torch.dtype
    device: torch.device

    def mean(self, fn) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


def mean_sq_norm(phi: torch.Tensor) -> torch.Tensor:
    """mean |phi_i|^2 (0-dim float64), row norms so no (b, Dp) float64 copy."""
    return torch.linalg.vector_norm(phi, dim=1).double().square().mean()


def build(curvature: str, damping: float, kfac_damping: str, data: Statistics, rank=None):
    """The damped inverse curvature of these settings, fitted on `data`; its
    tensors contiguous, as saved state holds them, so a curvature reloaded
    from a file or a store scores bit for bit the same."""
    fitted = _build(curvature, damping, kfac_damping, data, rank)
    for name, value in vars(fitted).items():
        setattr(fitted, name, value.contiguous())
    return fitted


def _build(curvature, damping, kfac_damping, data, rank):
    if curvature == "identity":
        return Identity.fit(damping, data.dtype, data.device)
    if curvature == "exact":
        return (ExactCholesky if damping > 0 else Exact).fit(data, damping)
    A, G, sq = data.mean(lambda phi, logits: (*ops.kfac_factors(phi, logits), mean_sq_norm(phi)))
    sa, qa = torch.linalg.eigh(A)
    sg, qg = torch.linalg.eigh(G)
    if curvature == "ekfac":
        (eig,) = data.mean(lambda phi, logits: (ops.ekfac_eigenvalues(phi, logits, qa, qg),))
    else:
        eig = torch.outer(sg, sa)
    check_pseudo_inverse(eig, float(sq), damping)
    dtype = data.dtype
    if curvature == "kfac" and kfac_damping == "factored":
        return Factored.fit(qg, sg, qa, sa, damping, dtype)
    w = without_null_direction(inverse_damped(eig, damping), qg)
    w_cast = cast_inverse(w, dtype, damping)
    if rank is not None:
        return LowRankEigenbasis.fit(qg, qa, w, rank, dtype)
    return Eigenbasis(qg.to(dtype), qa.to(dtype), w_cast)
