"""The attribution methods, one class each, registered by name (docs/design.md §1).

Every method reduces to the fused score op (`ops.scores`/`ops.topk` and their
rank-1 forms): a training side `TrainOperands(r, phi, inv_norm)` for each block
of training rows, and a test side `Query(gradient, offset)`, so that

    score(t, i) = <S_t, r_i phi_i^T> * inv_norm_i + offset_t.

A method is a subclass of `Method` decorated with `@register`. It sees the
training set one block at a time (`attributor.Rows`: features, logits, labels,
phi, r, start), reads the Attributor's public state (`curvature`, `theta`,
`config`, `num_train`), and keeps what it fits in `attr.per_example(...)`
(per-example values such as normalisers) or `attr.cached(...)` (fits on the
whole set), so saved state and stores carry them. The Attributor itself holds
no per-method code and never holds more than one block of training rows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from . import curvature as curv
from . import ops, rps
from .data import LastLayerData

if TYPE_CHECKING:
    from .attributor import Attributor, Rows


@dataclass(frozen=True)
class TrainOperands:
    """The training side of the score ops, exactly as they take it."""
    r: torch.Tensor  # (N, C') per-example factor on the class side
    phi: torch.Tensor  # (N, Dp') per-example factor on the feature side
    inv_norm: torch.Tensor  # (N,) multiplies every score of training example i


@dataclass(frozen=True)
class Query:
    """The test side of the score ops: `gradient` is curvature.General(S (T, C', Dp')),
    curvature.Rank1(alpha (T, C'), beta (T, Dp')) with S_t = alpha_t beta_t^T, or
    curvature.LowRank(alpha (T, m, C'), beta (T, m, Dp')) with S_t = sum_j
    alpha_tj beta_tj^T (the rank-1 ops take both); `offset` (T,) or None is added
    to every score of test t."""
    gradient: curv.General | curv.Rank1
    offset: torch.Tensor | None = None

    def _shifted(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.offset is None else values + self.offset.unsqueeze(1)

    def scores(self, train: TrainOperands) -> torch.Tensor:
        """(T, N): ops.scores / ops.scores_rank1 plus the offset."""
        g = self.gradient
        if isinstance(g, curv.Rank1):
            return self._shifted(ops.scores_rank1(g.alpha, g.beta, train.r, train.phi, train.inv_norm))
        return self._shifted(ops.scores(g.S, train.r, train.phi, train.inv_norm))

    def topk(self, train: TrainOperands, k: int, largest: bool = True, precision: str = "exact"):
        """(values (T, k), indices (T, k)): ops.topk / ops.topk_rank1 plus the offset,
        which is the same for every training example so it never changes the order."""
        g = self.gradient
        if isinstance(g, curv.Rank1):
            values, indices = ops.topk_rank1(g.alpha, g.beta, train.r, train.phi, train.inv_norm, k, largest,
                                             precision=precision)
        else:
            values, indices = ops.topk(g.S, train.r, train.phi, train.inv_norm, k, largest, precision=precision)
        return self._shifted(values), indices

    def total(self, train: TrainOperands) -> torch.Tensor:
        """(N,): sum over tests of score(t, i) in one pass; the score is linear in
        S_t, so the test side is summed first."""
        g = self.gradient
        if isinstance(g, curv.Rank1):
            S = torch.einsum("t...c,t...d->cd", g.alpha, g.beta)  # rank 1 or m alike
        else:
            S = g.S.sum(0)
        out = ops.scores(S.unsqueeze(0).contiguous(), train.r, train.phi, train.inv_norm)[0]
        return out if self.offset is None else out + self.offset.sum()


def safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    # A zero-gradient example (a perfectly fit one) scores 0 under every method.
    return torch.where(x > 0, 1.0 / x.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


class Method:
    """One attribution method. `family` is "influence" (score = loss change,
    self-influence ranks by value), "representer" (score = a logit
    contribution, rank self-influence by magnitude) or "distance" (no
    self-influence). `saved` maps each tensor the method caches to its shape
    in N, C, D, Dp, "D+1", optionally followed by a dtype (default: the
    training features'); ("N",) ones are per-example values (attr.per_example).
    `curvatures` names the extra curvatures it fits, so saved state is checked.

    operands(attr, rows) gives the training side for one block of rows,
    query(attr, test) the test side, self_influence(attr, rows) (b,) values."""
    name: ClassVar[str]
    family: ClassVar[str] = "influence"
    saved: ClassVar[dict[str, tuple]] = {}
    curvatures: ClassVar[tuple[str, ...]] = ()

    def inv_norm(self, attr: Attributor, rows: Rows) -> torch.Tensor:
        """(b,) the factor each training row's score is multiplied by (1 for
        unnormalised methods; 1/|H^-1 g_i| for theta-RelatIF, ...)."""
        return torch.ones_like(rows.phi[:, 0])

    def operands(self, attr: Attributor, rows: Rows) -> TrainOperands:
        """TrainOperands(r (b, C'), phi (b, Dp'), inv_norm (b,)) of one block of rows."""
        return TrainOperands(rows.r, rows.phi, self.inv_norm(attr, rows))

    def query(self, attr: Attributor, test: LastLayerData) -> Query:
        """Query(gradient, offset): the test side for a (checked) test set."""
        raise NotImplementedError

    def self_influence(self, attr: Attributor, rows: Rows) -> torch.Tensor:
        """(b,) score(i, i) of each row of the block for its own label."""
        raise NotImplementedError


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: makes `cls.name` a method every API accepts."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    del _REGISTRY[name]


def names(family: str | None = None) -> tuple[str, ...]:
    return tuple(n for n, m in _REGISTRY.items() if family is None or m.family == family)


def get(name) -> Method:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"method must be one of {names()}, got {name!r}")
    return _REGISTRY[name]


def test_residuals(attr: Attributor, test: LastLayerData) -> tuple[torch.Tensor, torch.Tensor]:
    """(r (T, C), phi (T, Dp)): the factored loss gradients of the explained classes."""
    return ops.residuals(test.logits, test.explained_labels()), attr.augment(test.features)


# ------------------------------------------------------------ influence family


@register
class InfluenceFunction(Method):
    """Koh & Liang: score = g_t^T H^-1 g_i."""
    name = "if"

    def query(self, attr, test):
        return Query(attr.curvature.precondition(*test_residuals(attr, test)))

    def self_influence(self, attr, rows):
        return attr.curvature_quad_norms(rows) * self.inv_norm(attr, rows)


@register
class ThetaRelatIF(InfluenceFunction):
    """Barshan et al.: IF / |H^-1 g_i|."""
    name = "theta_relatif"
    saved = {"inv_theta": ("N",)}

    def inv_norm(self, attr, rows):
        return attr.per_example("inv_theta", rows, lambda r: safe_reciprocal(attr.curvature_norms(r)[0].sqrt()))


@register
class LRelatIF(InfluenceFunction):
    """Barshan et al.: IF / sqrt(g_i^T H^-1 g_i)."""
    name = "l_relatif"
    saved = {"inv_l": ("N",)}

    def inv_norm(self, attr, rows):
        return attr.per_example("inv_l", rows,
                                lambda r: safe_reciprocal(attr.curvature_quad_norms(r).clamp_min(0).sqrt()))


@register
class GradDot(Method):
    """g_t^T g_i: influence with the identity for curvature."""
    name = "grad_dot"

    def query(self, attr, test):
        return Query(curv.Rank1(*test_residuals(attr, test)))

    def self_influence(self, attr, rows):
        return attr.gradient_sq_norms(rows) * self.inv_norm(attr, rows).square()


@register
class GradCos(GradDot):
    """g_t^T g_i / (|g_t| |g_i|)."""
    name = "grad_cos"
    saved = {"inv_grad": ("N",)}

    def inv_norm(self, attr, rows):
        return attr.per_example("inv_grad", rows, lambda r: safe_reciprocal(attr.gradient_sq_norms(r).sqrt()))

    def query(self, attr, test):
        r, phi = test_residuals(attr, test)
        norms = curv.gradient_sq_norms(r, phi).sqrt()
        return Query(curv.Rank1(r * safe_reciprocal(norms).to(r.dtype).unsqueeze(1), phi))


# ------------------------------------------------------------ representer points


def _explained_onehot(attr, test):
    """(onehot (T, C), phi (T, Dp)): the test side of a logit, e_y phi_t^T."""
    phi = attr.augment(test.features)
    return torch.nn.functional.one_hot(test.explained_labels(), test.num_classes).to(phi.dtype), phi


@register
class RpsL2(Method):
    """Yeh et al. / Sui Eq. 2-4: the explained logit of the l2-regularised refit,
    sum_i alpha_iy <phi_i, phi_t>."""
    name = "rps_l2"
    family = "representer"
    saved = {"rps_l2_theta": ("C", "Dp", torch.float64)}

    def refit(self, attr) -> torch.Tensor:
        """(C, Dp) float64: the l2-regularised refit, fitted once."""
        return attr.cached("rps_l2_theta", lambda: rps.fit_l2(
            attr.means("rps_l2 refit"), attr.config["rps_lambda"], init=attr.theta))

    def alpha(self, attr, rows) -> torch.Tensor:
        """(b, C): the rows' representer values under the refit."""
        return rps.representer_values(rows.phi, rows.logits, self.refit(attr), attr.config["rps_lambda"],
                                      attr.num_train).to(attr.dtype)

    def operands(self, attr, rows):
        return TrainOperands(self.alpha(attr, rows), rows.phi, self.inv_norm(attr, rows))

    def query(self, attr, test):
        return Query(curv.Rank1(*_explained_onehot(attr, test)))

    def self_influence(self, attr, rows):
        return self.alpha(attr, rows).gather(1, rows.labels.view(-1, 1)).view(-1) * rows.phi.square().sum(1)


@register
class RpsLJE(Method):
    """Sui Eq. 7-11: the explained logit at Theta* = Theta + gamma mean gradient,
    expanded around Theta by the curvature at Theta*."""
    name = "rps_lje"
    family = "representer"
    saved = {"lje_theta": ("C", "Dp", torch.float64)}
    curvatures = ("lje_curvature",)

    def expansion(self, attr):
        """(Theta* (C, Dp) float64, curvature at Theta*)."""
        if attr.theta is None:
            raise ValueError("method 'rps_lje' needs the trained layer: pass weight= (and the bias "
                             "vector as bias=) to the Attributor")
        theta_star = attr.cached("lje_theta", lambda: rps.ascent_step(
            attr.means("rps_lje ascent").mean_rows(
                lambda rows: (rows.r.double().T @ rows.phi.double() / len(rows),))[0],
            attr.theta, attr.config["lje_step"]))
        return theta_star, attr.curvature_at("lje_curvature", lambda rows: self.logits_star(theta_star, rows))

    @staticmethod
    def logits_star(theta_star, rows) -> torch.Tensor:
        return (rows.phi.double() @ theta_star.T).to(rows.phi.dtype)

    def residuals_star(self, attr, rows) -> torch.Tensor:
        """(b, C): the rows' residuals at Theta*."""
        return ops.residuals(self.logits_star(self.expansion(attr)[0], rows), rows.labels)

    def operands(self, attr, rows):
        return TrainOperands(self.residuals_star(attr, rows), rows.phi, self.inv_norm(attr, rows))

    def query(self, attr, test):
        onehot, phi = _explained_onehot(attr, test)
        theta_star, curvature_star = self.expansion(attr)
        N = attr.num_train
        logit = (phi.double() @ theta_star.T).gather(1, test.explained_labels().view(-1, 1)).view(-1)
        return Query(curv.scaled(curvature_star.precondition(onehot, phi), -1.0 / N), (logit / N).to(phi.dtype))

    def self_influence(self, attr, rows):
        theta_star, curvature_star = self.expansion(attr)
        r_star, y, phi = self.residuals_star(attr, rows), rows.labels, rows.phi
        onehot = torch.nn.functional.one_hot(y, attr.num_classes).to(phi.dtype)
        # e_y^T H*^-1 (r*_i phi_i^T) phi_i by polarisation: both sides are rank 1 in phi_i.
        cross = (curvature_star.norms(onehot + r_star, phi)[1] - curvature_star.norms(onehot - r_star, phi)[1]) / 4
        logit = (phi.double() @ theta_star.T).gather(1, y.view(-1, 1)).view(-1)
        return (logit.to(phi.dtype) - cross) / attr.num_train


# ------------------------------------------------------------ nearest neighbours


@register
class Knn(Method):
    """-|f_t - f_i|^2 on the raw features = [2 f_t, -1] . [f_i, |f_i|^2] - |f_t|^2:
    a rank-1 dot product plus a per-test offset."""
    name = "knn"
    family = "distance"

    def operands(self, attr, rows):
        f = rows.features
        phi = torch.cat([f, f.square().sum(1, keepdim=True)], 1)
        return TrainOperands(torch.ones_like(f[:, :1]), phi, torch.ones_like(f[:, 0]))

    def query(self, attr, test):
        f = test.features
        ones = torch.ones_like(f[:, :1])
        return Query(curv.Rank1(ones, torch.cat([2 * f, -ones], 1)), -f.square().sum(1))

    def self_influence(self, attr, rows):
        return torch.zeros_like(rows.features[:, 0])
