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
# Bytes of float64 (C*Dp)^2 matrices exact curvature holds at its peak: H, its
# eigenvectors, their weighted copy and the inverse.
EXACT_MATRICES = 4


@dataclass
class General:
    S: torch.Tensor  # (T, C, Dp)


@dataclass
class Rank1:
    alpha: torch.Tensor  # (T, C)
    beta: torch.Tensor  # (T, Dp)


def scaled(gradient: General | Rank1, factor: float) -> General | Rank1:
    if isinstance(gradient, Rank1):
        return Rank1(gradient.alpha * factor, gradient.beta)
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


def check_pseudo_inverse(eigenvalues: torch.Tensor, phi: torch.Tensor, damping: float) -> None:
    """With damping 0 the inverse is the pseudo-inverse of H itself, which is
    meaningless when H is below the rounding of its own sums: a training set
    fit so confidently that every p(1 - p) underflows against 1 - p."""
    if damping > 0:
        return
    # largest p(1-p) times mean |phi|^2; row norms, so no (N, Dp) float64 copy
    scale = 0.25 * float(torch.linalg.vector_norm(phi, dim=1).double().square().mean())
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
    h = h - h.mean(0, keepdim=True)
    h = h - h.mean(2, keepdim=True)
    return h.reshape(C * Dp, C * Dp)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_exact_fits(C: int, Dp: int, device: torch.device) -> None:
    """Refuses exact curvature before allocating when its matrices cannot fit."""
    n = C * Dp
    need = EXACT_MATRICES * 8 * n * n
    have = available_bytes(device)
    if need > have:
        raise MemoryError(f"exact curvature for C*Dp = {n} needs about {need / 1e9:.1f} GB "
                          f"({EXACT_MATRICES} float64 matrices of {n} x {n}), more than the "
                          f"{have / 1e9:.1f} GB available on {device}; use curvature='ekfac' "
                          "(or 'kfac') for a head this large")


class Exact:
    """H_lambda^-1 as an explicit (C*Dp, C*Dp) matrix."""

    def __init__(self, hinv):
        self.hinv = hinv  # (C*Dp, C*Dp)

    @classmethod
    def fit(cls, phi, logits, damping):
        check_exact_fits(logits.shape[1], phi.shape[1], phi.device)
        e, V = torch.linalg.eigh(ops.exact_hessian(phi, logits))
        check_pseudo_inverse(e, phi, damping)
        hinv = project_out_null((V * inverse_damped(e, damping)) @ V.T, logits.shape[1], phi.shape[1])
        return cls(cast_inverse(hinv, phi.dtype, damping))

    @staticmethod
    def shapes(C, Dp):
        return {"hinv": (C * Dp, C * Dp)}

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

    @staticmethod
    def shapes(C, Dp):
        return {"qg": (C, C), "qa": (Dp, Dp), "w": (C, Dp)}

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
        u = without_null_direction(inverse_damped(sg, pi * root), qg)
        return cls(qg.to(dtype), qa.to(dtype), cast_inverse(u, dtype, damping),
                   cast_inverse(inverse_damped(sa, root / pi), dtype, damping))

    @staticmethod
    def shapes(C, Dp):
        return {"qg": (C, C), "qa": (Dp, Dp), "u": (C,), "v": (Dp,)}

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
        return cls(cast_inverse(torch.tensor(1.0 / damping if damping > 0 else 1.0, dtype=torch.float64),
                                like.dtype, damping).to(like.device))

    @staticmethod
    def shapes(C, Dp):
        return {"scale": ()}

    def precondition(self, r, phi):
        return Rank1(r * self.scale, phi)

    def norms(self, R, Phi):
        sq = gradient_sq_norms(R, Phi)
        scale = self.scale.double()
        return (sq * scale**2).to(R.dtype), (sq * scale).to(R.dtype)


KINDS = {cls.__name__: cls for cls in (Exact, Eigenbasis, Factored, Identity)}


def state(curvature) -> tuple[str, dict[str, torch.Tensor]]:
    """(kind, tensors): everything needed to rebuild `curvature` without refitting."""
    return type(curvature).__name__, dict(vars(curvature))


def from_state(kind: str, tensors: dict[str, torch.Tensor]):
    if kind not in KINDS:
        raise ValueError(f"unknown curvature kind {kind!r}; expected one of {tuple(KINDS)}")
    return KINDS[kind](**tensors)


def kind_of(curvature: str, kfac_damping: str) -> str:
    """The class name `build` returns for these settings."""
    if curvature == "kfac":
        return "Factored" if kfac_damping == "factored" else "Eigenbasis"
    return {"exact": "Exact", "ekfac": "Eigenbasis", "identity": "Identity"}[curvature]


def build(curvature: str, damping: float, kfac_damping: str, phi, logits):
    if curvature == "identity":
        return Identity.fit(damping, phi)
    if curvature == "exact":
        return Exact.fit(phi, logits, damping)
    A, G = ops.kfac_factors(phi, logits)
    sa, qa = torch.linalg.eigh(A)
    sg, qg = torch.linalg.eigh(G)
    eig = ops.ekfac_eigenvalues(phi, logits, qa, qg) if curvature == "ekfac" else torch.outer(sg, sa)
    check_pseudo_inverse(eig, phi, damping)
    if curvature == "kfac" and kfac_damping == "factored":
        return Factored.fit(qg, sg, qa, sa, damping, phi.dtype)
    w = without_null_direction(inverse_damped(eig, damping), qg)
    dtype = phi.dtype
    return Eigenbasis(qg.to(dtype), qa.to(dtype), cast_inverse(w, dtype, damping))
