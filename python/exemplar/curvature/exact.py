"""Exact curvature: the last layer's Gauss-Newton Hessian itself, (C*Dp)^2
entries, as an explicit pseudo-inverse (damping 0) or a Cholesky factor in
the residual basis (damping > 0); it refuses heads too large for memory."""
from __future__ import annotations

import os

import torch

from .. import ops
from ..ops import General
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

# Float64 (C*Dp)^2 matrices exact curvature may hold at its peak: H, its
# eigenvectors, their weighted copy and the inverse (damping = 0); the
# Cholesky path's H, its reduced copy and factor, and the inverse fit within.
EXACT_MATRICES = 4
# Sustained GEMM/factorisation rate behind exact_cost's time estimates: about
# what 2 cores of the development machine give (bench/RESULTS.md measures it).
EXACT_GFLOPS = 100
# Widest network layer gradient (k_out k_in) exact curvature takes: its float64 square is 2 GiB.
EXACT_MAX_WIDTH = 16384
# Elements of a batch's per-example second moments the factored fast path may hold.
MOMENT_ELEMENTS = 1 << 25


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
    """Free memory on `device`: the GPU's, or the host's MemAvailable."""
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


def residual_basis(C: int, device=None) -> torch.Tensor:
    """(C, C-1) float64 orthonormal columns spanning {r : sum r = 0}, where
    every residual p - e_y lies (Helmert's basis). In these coordinates the
    softmax's null directions, where H is 0, are gone."""
    j = torch.arange(1, C, dtype=torch.float64, device=device)
    c = torch.arange(C, device=device).unsqueeze(1)
    scale = (j * (j + 1)).rsqrt()
    return torch.where(c < j, scale, torch.where(c == j, -j * scale, torch.zeros_like(scale)))


@register
class Exact(Curvature):
    """H_lambda^-1 as an explicit (C*Dp, C*Dp) matrix: the pseudo-inverse, from an
    eigendecomposition, when damping = 0. With damping > 0, `fit` returns the
    Cholesky form (ExactCholesky), a third of the flops."""
    name = "exact"

    def __init__(self, hinv):
        self.hinv = hinv  # (C*Dp, C*Dp)

    @classmethod
    def forms(cls, settings):
        # an explicit inverse saved at any damping stays loadable
        return ("ExactCholesky", "Exact") if settings.damping > 0 else ("Exact",)

    @classmethod
    def fit(cls, data: Statistics, settings):
        if settings.damping > 0:
            return ExactCholesky.from_hessian(data, settings.damping)
        return cls.from_hessian(data, settings.damping)

    @classmethod
    def fit_layers(cls, data: LayerStatistics, settings):
        """Each layer's (1/N) sum_ic w_ic vec(g_ic) vec(g_ic)^T + damping I, as
        its Cholesky factor (LayerCholesky); damping > 0 (a layer with more
        gradient entries than training examples has a singular Fisher)."""
        damping = settings.damping
        if not damping > 0:
            raise ValueError("curvature='exact' needs damping > 0 for a whole network (each layer's Fisher is "
                             "singular when the layer has more gradient entries than training examples)")
        for j, (k_out, k_in) in enumerate(data.shapes):
            if k_out * k_in > EXACT_MAX_WIDTH:
                raise ValueError(f"curvature='exact': layer {data.names[j]!r} has {k_out * k_in} gradient entries "
                                 f"per example (k_out {k_out} x k_in {k_in}), more than {EXACT_MAX_WIDTH} (its "
                                 "Fisher would not fit); use projection= (e.g. 64) or curvature='ekfac'")
        out = []
        for (moment,) in data.sums(lambda j, choices: (_moment(choices),)):
            moment.div_(data.N).diagonal().add_(damping)
            out.append(LayerCholesky(torch.linalg.cholesky(moment)))
        return out

    @classmethod
    def from_hessian(cls, data: Statistics, damping: float) -> "Exact":
        """The eigendecomposition path (any damping >= 0)."""
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
    def from_hessian(cls, data: Statistics, damping: float) -> "ExactCholesky":
        """Fitted on `data` with damping > 0."""
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

    def solve(self, V):
        E = residual_basis(V.shape[1], V.device)
        M, Dp = V.shape[0], V.shape[2]
        y = torch.einsum("ck,mcd->mkd", E, V.double()).reshape(M, -1)
        x = torch.cholesky_solve(y.T, self.chol).T.reshape(M, -1, Dp)
        return torch.einsum("ck,mkd->mcd", E, x)

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


def _moment(choices) -> torch.Tensor:
    """sum_i sum_c w_ic vec(g_ic) vec(g_ic)^T over one batch's Fisher choices,
    (W, W) with W = k_out k_in. With one position per example g_ic =
    delta_ic a_i^T, so this is sum_i G_i x a_i a_i^T with G_i = sum_c w_ic
    delta_ic delta_ic^T: one GEMM of (k_out^2, B) by (B, k_in^2), C times
    fewer flops than per choice."""
    B, P, k_out = choices[0][1].shape
    k_in = choices[0][2].shape[2]
    if P == 1 and B * (k_out ** 2 + k_in ** 2) <= MOMENT_ELEMENTS:
        a = choices[0][2][:, 0]
        G = sum(torch.einsum("bo,bp->bop", weighted(d[:, 0], w), d[:, 0]) for w, d, _ in choices)
        moment = G.reshape(B, -1).T @ torch.einsum("bi,bj->bij", a, a).reshape(B, -1)
        return moment.view(k_out, k_out, k_in, k_in).permute(0, 2, 1, 3).reshape(k_out * k_in, -1)
    total = 0
    for w, d, a in choices:
        g = (d.transpose(1, 2) @ a).flatten(1)
        total = total + weighted(g, w).T @ g
    return total


class LayerCholesky(Curvature):
    """One network layer's whole damped Fisher F + damping I = L L^T in its
    (k_out k_in) gradient space, kept as its Cholesky factor L (solves,
    never an inverse): what curvature='exact' fits per layer."""

    def __init__(self, chol):
        if not (bool(torch.equal(chol, chol.tril())) and bool((chol.diagonal() > 0).all())):
            raise ValueError("chol is not a Cholesky factor (lower triangular with a positive diagonal)")
        self.chol = chol  # (W, W) lower-triangular float64

    @staticmethod
    def shapes(C, Dp):
        return {"chol": (C * Dp, C * Dp, torch.float64)}

    def solve(self, V):
        return torch.cholesky_solve(V.double().flatten(1).T, self.chol.to(V.device)).T.reshape(V.shape)
