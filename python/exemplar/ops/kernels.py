"""Thin wrappers over torch.ops.exemplar and the fake kernels that let
torch.compile and opcheck trace them. Shapes: N train, T test, C classes,
Dp feature columns (bias column included)."""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the op registrations)
from . import precision as precisions
from .order import check_k, k_message

_ops = torch.ops.exemplar


def cuda_compiled() -> bool:
    """True when this build of exemplar registered CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("exemplar::fused_topk", "CUDA")


# kernel= of topk / topk_rank1: "default" is the CPU's streaming heap on the CPU
# and the streamed composite (cuBLAS tiles, sorted merges) on CUDA; "streamed"
# is that composite on any device; "fused" the fused CUDA kernel, not yet the
# default because it has not been proven on a GPU. All return the same order.
TOPK_KERNELS = {"default": ("topk", "topk_rank1"), "streamed": ("streamed_topk", "streamed_topk_rank1"),
                "fused": ("fused_topk", "fused_topk_rank1")}


def residuals(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (N, C), labels (N,) int64 -> softmax(logits) - onehot(labels), (N, C)."""
    return _ops.residuals(logits, labels)


def kfac_factors(phi: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """phi (N, Dp), logits (N, C) -> A (Dp, Dp), G (C, C), accumulated in float64."""
    return _ops.kfac_factors(phi, logits)


def ekfac_eigenvalues(phi, logits, qa, qg) -> torch.Tensor:
    """phi (N, Dp), logits (N, C), qa (Dp, Dp), qg (C, C) -> corrected eigenvalues (C, Dp), float64."""
    return _ops.ekfac_eigenvalues(phi, logits, qa, qg)


def exact_hessian(phi, logits) -> torch.Tensor:
    """phi (N, Dp), logits (N, C) -> H (C*Dp, C*Dp) float64, flattening c*Dp + d."""
    return _ops.exact_hessian(phi, logits)


def eigenbasis_norms(r, phi, qg, qa, w):
    """r (N, C), phi (N, Dp), qg (C, C), qa (Dp, Dp), w (C, Dp)
    -> (sum r'^2 phi'^2 w^2, sum r'^2 phi'^2 w), each (N,)."""
    return _ops.eigenbasis_norms(r, phi, qg, qa, w)


def dense_norms(r, phi, hinv):
    """r (N, C), phi (N, Dp), hinv (C*Dp, C*Dp) -> (|Hinv g|^2, g^T Hinv g), each (N,)."""
    return _ops.dense_norms(r, phi, hinv)


def cholesky_norms(r, phi, chol):
    """r (N, C), phi (N, Dp), chol (C*Dp, C*Dp) lower, H = chol chol^T
    -> (|H^-1 g|^2, g^T H^-1 g), each (N,), by triangular solves."""
    return _ops.cholesky_norms(r, phi, chol)


def cholesky_quad_norms(r, phi, chol) -> torch.Tensor:
    """r (N, C), phi (N, Dp), chol (C*Dp, C*Dp) lower -> g^T H^-1 g (N,): one triangular solve."""
    return _ops.cholesky_quad_norms(r, phi, chol)


def scores(s, r, phi, inv_norm) -> torch.Tensor:
    """Every score of the general path, score(t, i) = <S_t, r_i phi_i^T> inv_norm_i.

    Arguments:
        s: (T, C, Dp) preconditioned test gradients.
        r: (N, C), phi: (N, Dp), inv_norm: (N,): the training side.

    Returns:
        (T, N)."""
    return _ops.scores(s, r, phi, inv_norm)


def scores_rank1(alpha, beta, r, phi, inv_norm) -> torch.Tensor:
    """Every score of the rank-1 path, S_t = alpha_t beta_t^T.

    Arguments:
        alpha: (T, C) (or (T, m, C) for m rank-1 terms), beta: (T, Dp) (or (T, m, Dp)).
        r: (N, C), phi: (N, Dp), inv_norm: (N,): the training side.

    Returns:
        (T, N)."""
    return _ops.scores_rank1(alpha, beta, r, phi, inv_norm)


def _topk_op(k, largest, r, kernel: str, rank1: bool):
    # Types only: the dispatcher takes a Python bool as an int and None as False.
    # The range of k is checked once, by the op itself (csrc/checks.h).
    check_k(k, r.shape[0], check_range=False)
    if not isinstance(largest, bool):
        raise TypeError(f"largest must be True or False, got {largest!r}")
    if kernel not in TOPK_KERNELS:
        raise ValueError(f"kernel must be one of {tuple(TOPK_KERNELS)}, got {kernel!r}")
    if kernel == "fused" and not (r.is_cuda and cuda_compiled()):
        raise ValueError(f"kernel='fused' is the CUDA kernel: it needs CUDA tensors and a CUDA build "
                         f"(r is on {r.device}, CUDA kernels compiled: {cuda_compiled()})")
    return getattr(_ops, TOPK_KERNELS[kernel][rank1])


def _run_topk(kernel, rank1, test_side, r, phi, inv_norm, k, largest, precision):
    """The top-k op for kernel= and precision= (ops.precision.resolve)."""
    op = _topk_op(k, largest, r, kernel, rank1)
    precisions.check_precision(precision)
    if kernel != "default":
        if precision == "bf16":
            raise ValueError(f"precision='bf16' screens on its own op; kernel must be 'default', got {kernel!r}")
        return op(*test_side, r, phi, inv_norm, k, largest)
    tests, train = (len(x) if x.dim() else 0 for x in (test_side[0], r))
    depth = phi.shape[1] if rank1 else test_side[0][0].numel() if tests else 0  # the GEMM's: Dp or C * Dp
    if precisions.resolve(precision, not rank1, tests, train, depth, k, r.device) == "exact":
        return op(*test_side, r, phi, inv_norm, k, largest)
    screened = _ops.screened_topk_rank1 if rank1 else _ops.screened_topk
    values, indices, _ = screened(*test_side, r, phi, inv_norm, k, largest)
    return values, indices


def topk(s, r, phi, inv_norm, k: int, largest: bool = True, kernel: str = "default",
         precision: str = "auto"):
    """Top-k of scores(s, r, phi, inv_norm) per row without the (T, N) matrix.

    Arguments:
        s, r, phi, inv_norm: as for scores().
        k: an integer in [1, N].
        largest: True ranks larger scores first.
        kernel: see TOPK_KERNELS ("default", "streamed", "fused" on CUDA).
        precision: "auto" (default), "exact" or "bf16": "bf16" screens every
            score tile in bfloat16 with a rigorous error bound and rescores
            exactly what the bound cannot rule out (the same indices as
            "exact" up to rounding-level ties, exact scores); "auto" takes it
            where it was measured faster (exemplar.ops.precision).

    Returns:
        (values (T, k), indices (T, k) int64), best first. Order: the larger
        score first (smaller with largest=False), NaN after every number,
        ties by ascending training index; so topk(k) is a prefix of topk(k + 1)
        and, for k <= N, every index is a real training row."""
    return _run_topk(kernel, False, (s,), r, phi, inv_norm, k, largest, precision)


def topk_rank1(alpha, beta, r, phi, inv_norm, k: int, largest: bool = True, kernel: str = "default",
               precision: str = "auto"):
    """Top-k of scores_rank1(...) per row without the (T, N) matrix.

    Arguments:
        alpha, beta, r, phi, inv_norm: as for scores_rank1().
        k, largest, kernel, precision: as for topk().

    Returns:
        (values (T, k), indices (T, k) int64), in topk's order."""
    return _run_topk(kernel, True, (alpha, beta), r, phi, inv_norm, k, largest, precision)


def screened_topk(s, r, phi, inv_norm, k: int, largest: bool = True):
    """topk(..., precision="bf16") with the survivor counts.

    Arguments:
        s, r, phi, inv_norm, k, largest: as for topk().

    Returns:
        (values (T, k), indices (T, k) int64, survivors (T,) int64): the
        training rows each test row rescored exactly (N where the op took the
        exact path because the bound does not hold for these operands)."""
    return _ops.screened_topk(s, r, phi, inv_norm, k, largest)


def screened_topk_rank1(alpha, beta, r, phi, inv_norm, k: int, largest: bool = True):
    """topk_rank1(..., precision="bf16") with the survivor counts.

    Arguments:
        alpha, beta, r, phi, inv_norm, k, largest: as for topk_rank1().

    Returns:
        (values, indices, survivors) as for screened_topk()."""
    return _ops.screened_topk_rank1(alpha, beta, r, phi, inv_norm, k, largest)


# ------------------------------------------------------------------ fake kernels


def _fake(*names: str):
    """Registers the decorated function as the fake (and meta) kernel of each
    exemplar::<name>, after the check every device's kernel runs first: all
    tensor operands on one device (csrc/checks.h's message, naming the
    schema's arguments), so an operand on the meta device among CPU ones is
    refused, not answered with memory the fake kernel allocated."""
    def register(fn):
        for name in names:
            params = [a.name for a in getattr(_ops, name).default._schema.arguments]  # the schema's names

            def checked(*args, name=name, params=params):
                tensors = [(p, a) for p, a in zip(params, args) if isinstance(a, torch.Tensor)]
                first, ref = tensors[0]
                for p, t in tensors[1:]:
                    if t.device != ref.device:
                        raise RuntimeError(f"exemplar::{name}: {p} is on {t.device} but {first} is on {ref.device}")
                return fn(*args)
            torch.library.register_fake(f"exemplar::{name}")(checked)
        return fn
    return register


@_fake("residuals")
def _(logits, labels):
    return torch.empty_like(logits)


@_fake("kfac_factors")
def _(phi, logits):
    dp, c = phi.shape[1], logits.shape[1]
    return phi.new_empty(dp, dp, dtype=torch.float64), phi.new_empty(c, c, dtype=torch.float64)


@_fake("ekfac_eigenvalues")
def _(phi, logits, qa, qg):
    return phi.new_empty(logits.shape[1], phi.shape[1], dtype=torch.float64)


@_fake("exact_hessian")
def _(phi, logits):
    n = logits.shape[1] * phi.shape[1]
    return phi.new_empty(n, n, dtype=torch.float64)


@_fake("eigenbasis_norms")
def _(r, phi, qg, qa, w):
    return r.new_empty(r.shape[0]), r.new_empty(r.shape[0])


@_fake("dense_norms", "cholesky_norms")
def _(r, phi, factor):
    return r.new_empty(r.shape[0]), r.new_empty(r.shape[0])


@_fake("cholesky_quad_norms")
def _(r, phi, chol):
    return r.new_empty(r.shape[0])


@_fake("scores")
def _(s, r, phi, inv_norm):
    return r.new_empty(s.shape[0], r.shape[0])


@_fake("scores_rank1")
def _(alpha, beta, r, phi, inv_norm):
    return r.new_empty(alpha.shape[0], r.shape[0])


def _fake_topk(rows, r, k):
    torch._check_value(1 <= k <= r.shape[0], lambda: k_message(k, r.shape[0]))
    return r.new_empty(rows, k), r.new_empty(rows, k, dtype=torch.int64)


@_fake(*(general for general, _ in TOPK_KERNELS.values()))
def _(s, r, phi, inv_norm, k, largest):
    return _fake_topk(s.shape[0], r, k)


@_fake(*(rank1 for _, rank1 in TOPK_KERNELS.values()))
def _(alpha, beta, r, phi, inv_norm, k, largest):
    return _fake_topk(alpha.shape[0], r, k)


@_fake("screened_topk")
def _(s, r, phi, inv_norm, k, largest):
    return (*_fake_topk(s.shape[0], r, k), r.new_empty(s.shape[0], dtype=torch.int64))


@_fake("screened_topk_rank1")
def _(alpha, beta, r, phi, inv_norm, k, largest):
    return (*_fake_topk(alpha.shape[0], r, k), r.new_empty(alpha.shape[0], dtype=torch.int64))
