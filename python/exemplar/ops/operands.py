"""The operands of the score ops (docs/design.md §1): every method's training
side is TrainOperands(r, phi, inv_norm) for a block of training rows, its
test side a Query(gradient, offset), so that

    score(t, i) = <S_t, r_i phi_i^T> * inv_norm_i + offset_t,

with S_t held as General (T, C, Dp), Rank1 (alpha_t beta_t^T) or LowRank
(m rank-1 terms). Curvatures produce the gradients, methods the operands."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels


@dataclass
class General:
    """Preconditioned test gradients as full matrices: S (T, C, Dp)."""
    S: torch.Tensor


@dataclass
class Rank1:
    """S_t = alpha_t beta_t^T: alpha (T, C), beta (T, Dp)."""
    alpha: torch.Tensor
    beta: torch.Tensor


@dataclass
class LowRank(Rank1):
    """S_t = sum_j alpha_tj beta_tj^T: alpha (T, m, C), beta (T, m, Dp); the rank-1 ops take these as they are."""
    alpha: torch.Tensor
    beta: torch.Tensor


def scaled(gradient: General | Rank1, factor: float) -> General | Rank1:
    """The same gradient times a scalar."""
    if isinstance(gradient, Rank1):
        return type(gradient)(gradient.alpha * factor, gradient.beta)
    return General(gradient.S * factor)


@dataclass(frozen=True)
class TrainOperands:
    """The training side of the score ops, exactly as they take it: r (N, C')
    on the class side, phi (N, Dp') on the feature side, inv_norm (N,)
    multiplying every score of training example i."""
    r: torch.Tensor
    phi: torch.Tensor
    inv_norm: torch.Tensor


@dataclass(frozen=True)
class Query:
    """The test side of the score ops: `gradient` is General(S (T, C', Dp')),
    Rank1(alpha (T, C'), beta (T, Dp')) or LowRank(alpha (T, m, C'), beta
    (T, m, Dp')) (the rank-1 ops take both); `offset` (T,) or None is added
    to every score of test t."""
    gradient: General | Rank1
    offset: torch.Tensor | None = None

    def _shifted(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.offset is None else values + self.offset.unsqueeze(1)

    def scores(self, train: TrainOperands) -> torch.Tensor:
        """(T, N): ops.scores / ops.scores_rank1 plus the offset."""
        g = self.gradient
        if isinstance(g, Rank1):
            return self._shifted(kernels.scores_rank1(g.alpha, g.beta, train.r, train.phi, train.inv_norm))
        return self._shifted(kernels.scores(g.S, train.r, train.phi, train.inv_norm))

    def topk(self, train: TrainOperands, k: int, largest: bool = True, precision: str = "auto"):
        """(values (T, k), indices (T, k)): ops.topk / ops.topk_rank1 plus the offset,
        which is the same for every training example so it never changes the order."""
        g = self.gradient
        if isinstance(g, Rank1):
            values, indices = kernels.topk_rank1(g.alpha, g.beta, train.r, train.phi, train.inv_norm, k, largest,
                                                 precision=precision)
        else:
            values, indices = kernels.topk(g.S, train.r, train.phi, train.inv_norm, k, largest,
                                           precision=precision)
        return self._shifted(values), indices

    def total(self, train: TrainOperands) -> torch.Tensor:
        """(N,): sum over tests of score(t, i) in one pass; the score is linear in
        S_t, so the test side is summed first."""
        g = self.gradient
        if isinstance(g, Rank1):
            S = torch.einsum("t...c,t...d->cd", g.alpha, g.beta)  # rank 1 or m alike
        else:
            S = g.S.sum(0)
        out = kernels.scores(S.unsqueeze(0).contiguous(), train.r, train.phi, train.inv_norm)[0]
        return out if self.offset is None else out + self.offset.sum()
