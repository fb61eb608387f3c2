"""Top-k with a reduced-precision screen and exact answers (precision="tf32" |
"bf16"): score tiles are first computed from operands rounded to the reduced
format, with float32 accumulation (tensor cores on a GPU); a training example
survives for a test row when its screened score is within a rigorous error
bound of the row's running k-th best; survivors are rescored from the
original operands and the top-k is taken from those exact scores, in the
order of every other top-k (NaN last, ties by index). docs/design.md §8
derives the bound.

Scores are written as m terms, score(t, i) = inv_i * sum_j a_tj,i * b_tj,i:
the general path is m = C with a_tc,i = R_ic (exact) and b_tc,i = S_tc . Phi_i;
the low-rank path a_tj,i = alpha_tj . R_i and b_tj,i = beta_tj . Phi_i."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .order import merge_topk

PRECISIONS = ("exact", "tf32", "bf16")
# Unit roundoff of each reduced input format (round to nearest): 2^-(mantissa bits + 1).
UNIT_ROUNDOFF = {"tf32": 2.0 ** -11, "bf16": 2.0 ** -8}
F32_ROUNDOFF = 2.0 ** -24
SCREEN_CELLS = 1 << 22  # (test terms x train rows) per screened tile


def check_precision(precision) -> None:
    """Refuses a precision= that is not one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


class Screened(NamedTuple):
    values: torch.Tensor  # (T, k)
    indices: torch.Tensor  # (T, k)
    survivors: torch.Tensor  # (T,) training rows rescored per test row


def gamma(n: int, u: float) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of an n-term float sum."""
    return n * u / (1 - n * u)


def dot_error(depth: int, precision: str) -> float:
    """eps such that |fl(x~ . y~) - x . y| <= eps |x| |y| for x, y of `depth`
    entries rounded to `precision` and multiplied and summed in float32."""
    # Inputs of float64 reach the reduced format through float32: a second rounding.
    u = UNIT_ROUNDOFF[precision] * (1 + F32_ROUNDOFF) + F32_ROUNDOFF
    # A bf16 GEMM on the GPU returns bf16: one more rounding of the result.
    output = UNIT_ROUNDOFF[precision] if precision == "bf16" else 0.0
    # Tensor cores may truncate while accumulating: twice float32's unit roundoff.
    return (2 * u + u * u) + gamma(depth, 2 * F32_ROUNDOFF) * (1 + u) ** 2 * (1 + output) + output


def _reduced(x: torch.Tensor, precision: str) -> torch.Tensor:
    """x rounded to the reduced format, held in the dtype its GEMM runs in."""
    if precision == "bf16":
        return x.to(torch.bfloat16)
    # tf32: float32 with the low 13 mantissa bits rounded away (round to nearest even)
    bits = x.float().contiguous().view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


def _gemm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (a, K) @ y (b, K)^T in the reduced operands' format, accumulated in float32."""
    if x.device.type != "cuda":
        return torch.matmul(x.float(), y.float().T)
    if x.dtype == torch.bfloat16:
        return torch.matmul(x, y.T).float()  # bf16 tensor cores, float32 accumulation
    # tf32 operands multiply exactly in float32, so letting cuBLAS use TF32 changes nothing but speed
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return torch.matmul(x, y.T)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


class Screen:
    """Screened scores of tiles of training rows with their error bounds, for
    alpha (T, m, C) or None (the general path), beta (T, m, Dp), R (N, C),
    Phi (N, Dp), inv_norm (N,)."""

    def __init__(self, alpha, beta, R, Phi, inv_norm, precision: str):
        if precision not in UNIT_ROUNDOFF:
            raise ValueError(f"a screen's precision must be one of {tuple(UNIT_ROUNDOFF)}, got {precision!r}")
        T, m, Dp = beta.shape
        C = R.shape[1]
        self.alpha, self.R, self.Phi, self.inv_norm, self.precision = alpha, R, Phi, inv_norm, precision
        self.T, self.m = T, m
        self.eps_b = dot_error(Dp, precision)
        self.eps_a = 0.0 if alpha is None else dot_error(C, precision)
        # float32 work on the screened terms (products, the m-term sum, inv, casts) and
        # the exact path's own rounding, both relative to W = sum_j A_j B_j.
        self.rounding = gamma(m * (C + Dp) + 2, torch.finfo(R.dtype).eps / 2) + (4 * m + 8) * F32_ROUNDOFF
        self.b_norm = torch.linalg.vector_norm(beta.float(), dim=2)  # (T, m)
        self.phi_norm = torch.linalg.vector_norm(Phi.float(), dim=1)  # (N,)
        self.r_norm = torch.linalg.vector_norm(R.float(), dim=1)  # (N,)
        self.beta_low = _reduced(beta.reshape(T * m, Dp), precision)
        self.alpha_low = None if alpha is None else _reduced(alpha.reshape(T * m, C), precision)
        self.a_norm = None if alpha is None else torch.linalg.vector_norm(alpha.float(), dim=2)  # (T, m)

    def tile(self, n0: int, nt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(screened (T, nt), bound (T, nt)) float32 for training rows [n0, n0 + nt):
        |screened - score| <= bound, for the exact score and for the exact
        path's computed one."""
        T, m = self.T, self.m
        b = _gemm(self.beta_low, _reduced(self.Phi[n0:n0 + nt], self.precision)).view(T, m, nt)
        B = self.b_norm.unsqueeze(2) * self.phi_norm[n0:n0 + nt]  # (T, m, nt) >= |b_tj,i| (Cauchy-Schwarz)
        if self.alpha is None:
            a = self.R[n0:n0 + nt].float().T.unsqueeze(0)  # (1, C, nt): the exact a side
            A, a_err = a.abs(), torch.zeros((), device=a.device)
        else:
            a = _gemm(self.alpha_low, _reduced(self.R[n0:n0 + nt], self.precision)).view(T, m, nt)
            A = self.a_norm.unsqueeze(2) * self.r_norm[n0:n0 + nt]
            a_err = self.eps_a * A
        b_err = self.eps_b * B
        # |a~ b~ - a b| <= |a~ - a| |b~| + |a| |b~ - b|, with |a| <= |a~| + a_err.
        term_err = (a_err * b.abs() + (a.abs() + a_err) * b_err).sum(1)
        W = (A * B).sum(1)
        inv = self.inv_norm[n0:n0 + nt].float()
        bound = (term_err + self.rounding * (W + term_err)) * inv.abs() * (1 + 1e-5) \
            + torch.finfo(torch.float32).tiny
        return (a * b).sum(1) * inv, bound


# The bound is relative: it holds while every rounded operand and every product
# is a normal number of float32 / bf16 / tf32 (8-bit exponents, normal from
# 2^-126, finite below 2^128). Entries within 2^+-SAFE_EXPONENT and norm products
# below 2^SAFE_PRODUCT keep every product, sum and bound there, with room for
# D up to 2^26 terms; anything else goes to the exact path.
SAFE_EXPONENT = 60
SAFE_PRODUCT = 100


def check_finite(*operands: torch.Tensor | None) -> None:
    """Refuses NaN and inf: the screen's bound is for finite operands."""
    if not all(bool(torch.isfinite(x).all()) for x in operands if x is not None):
        raise ValueError("precision='tf32'/'bf16' screens finite operands only; use precision='exact' "
                         "for operands with NaN or inf")


def bound_applies(*operands: torch.Tensor | None) -> bool:
    """Whether every nonzero entry of the operands lies within 2^+-SAFE_EXPONENT
    and the product of their largest entries within 2^SAFE_PRODUCT, so the
    screen's error bound holds (no overflow, no gradual underflow)."""
    largest = 1.0
    for x in (o for o in operands if o is not None):
        magnitude = x.detach().abs()
        top = float(magnitude.max()) if magnitude.numel() else 0.0
        nonzero = magnitude[magnitude > 0]
        if top > 2.0 ** SAFE_EXPONENT or (nonzero.numel() and float(nonzero.min()) < 2.0 ** -SAFE_EXPONENT):
            return False
        largest *= max(top, 1.0)
    return largest <= 2.0 ** SAFE_PRODUCT


def screened_topk(alpha, beta, R, Phi, inv_norm, k: int, largest: bool, precision: str) -> Screened:
    """alpha (T, m, C) or None (the general path: m = C, alpha = identity),
    beta (T, m, Dp), R (N, C), Phi (N, Dp), inv_norm (N,) -> Screened."""
    T, m, _ = beta.shape
    N = R.shape[0]
    check_finite(alpha, beta, R, Phi, inv_norm)
    screen = Screen(alpha, beta, R, Phi, inv_norm, precision)
    sign = 1.0 if largest else -1.0
    rows = max(1, SCREEN_CELLS // max(T * m, 1))
    lower_best = torch.full((T, k), -float("inf"), device=R.device)  # k best lower bounds so far
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (test, train, upper) per tile
    for n0 in range(0, N, rows):
        screened, bound = screen.tile(n0, min(rows, N - n0))
        lower, upper = sign * screened - bound, sign * screened + bound
        lower_best = torch.cat([lower_best, lower], 1).topk(k, dim=1).values
        test, train = torch.nonzero(upper >= lower_best[:, -1:], as_tuple=True)
        kept.append((test, train + n0, upper[test, train]))
    threshold = lower_best[:, -1]
    test = torch.cat([t for t, _, _ in kept])
    train = torch.cat([i for _, i, _ in kept])
    upper = torch.cat([u for _, _, u in kept])
    alive = upper >= threshold[test]  # the final k-th best lower bound prunes earlier tiles too
    test, train = test[alive], train[alive]
    exact = _rescore(alpha, beta, R, Phi, inv_norm, test, train)
    survivors = torch.bincount(test, minlength=T)
    width = int(survivors.max())
    order = torch.argsort(test, stable=True)
    test, train, exact = test[order], train[order], exact[order]
    starts = torch.cumsum(survivors, 0) - survivors
    slot = torch.arange(len(test), device=R.device) - starts[test]
    # Padding: NaN at indices >= N, after every real entry in the top-k order.
    values = torch.full((T, width), float("nan"), dtype=R.dtype, device=R.device)
    indices = N + torch.arange(width, device=R.device).expand(T, width).clone()
    values[test, slot] = exact
    indices[test, slot] = train
    values, indices = merge_topk([(values, indices)], k, largest)
    return Screened(values, indices, survivors)


def _rescore(alpha, beta, R, Phi, inv_norm, test, train) -> torch.Tensor:
    """Exact scores of the (test, train) pairs from the original operands."""
    m, Dp, C = beta.shape[1], beta.shape[2], R.shape[1]
    pairs = max(1, SCREEN_CELLS // (m * (Dp + C)))  # bounds the gathered (pairs, m, Dp) operands
    out = []
    for p0 in range(0, len(test), pairs):
        t, i = test[p0:p0 + pairs], train[p0:p0 + pairs]
        b = torch.einsum("pmd,pd->pm", beta[t], Phi[i])
        a = R[i] if alpha is None else torch.einsum("pmc,pc->pm", alpha[t], R[i])
        out.append((a * b).sum(1) * inv_norm[i])
    return torch.cat(out) if out else torch.zeros(0, dtype=R.dtype, device=R.device)
