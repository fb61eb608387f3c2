"""Representer points (Sui et al. 2021): RPS-l2 (the l2-regularised refit
decomposed, Yeh et al. 2018) and RPS-LJE (a local Jacobian expansion at one
ascent step); scores are shares of the explained logit."""
from __future__ import annotations

import torch

from .. import ops
from ..ops import Query, Rank1, TrainOperands, scaled
from . import rps
from .base import Method, register


def _explained_onehot(ctx, test):
    """(onehot (T, C), phi (T, Dp)): the test side of a logit, e_y phi_t^T."""
    phi = ctx.augment(test.features)
    return torch.nn.functional.one_hot(test.explained_labels(), test.num_classes).to(phi.dtype), phi


@register
class RpsL2(Method):
    """Yeh et al. / Sui Eq. 2-4: the explained logit of the l2-regularised refit,
    sum_i alpha_iy <phi_i, phi_t>."""
    name = "rps_l2"
    family = "representer"
    needs_head = True
    saved = {"rps_l2_theta": ("C", "Dp", torch.float64)}

    def refit(self, ctx) -> torch.Tensor:
        """(C, Dp) float64: the l2-regularised refit, fitted once."""
        return ctx.cached("rps_l2_theta", lambda: rps.fit_l2(
            ctx.means("rps_l2 refit"), ctx.settings.rps_lambda, init=ctx.theta))

    def alpha(self, ctx, rows) -> torch.Tensor:
        """(b, C): the rows' representer values under the refit."""
        return rps.representer_values(rows.phi, rows.logits, self.refit(ctx), ctx.settings.rps_lambda,
                                      ctx.num_train).to(ctx.dtype)

    def operands(self, ctx, rows):
        return TrainOperands(self.alpha(ctx, rows), rows.phi, self.inv_norm(ctx, rows))

    def query(self, ctx, test):
        return Query(Rank1(*_explained_onehot(ctx, test)))

    def self_influence(self, ctx, rows):
        return self.alpha(ctx, rows).gather(1, rows.labels.view(-1, 1)).view(-1) * rows.phi.square().sum(1)


@register
class RpsLJE(Method):
    """Sui Eq. 7-11: the explained logit at Theta* = Theta + gamma mean gradient,
    expanded around Theta by the curvature at Theta*."""
    name = "rps_lje"
    family = "representer"
    needs_head = True
    saved = {"lje_theta": ("C", "Dp", torch.float64)}
    curvatures = ("lje_curvature",)

    def expansion(self, ctx):
        """(Theta* (C, Dp) float64, curvature at Theta*)."""
        if ctx.theta is None:
            raise ValueError("method 'rps_lje' needs the trained layer: pass weight= (and the bias "
                             "vector as bias=) to the Attributor")
        theta_star = ctx.cached("lje_theta", lambda: rps.ascent_step(
            ctx.means("rps_lje ascent").mean_rows(
                lambda rows: (rows.r.double().T @ rows.phi.double() / len(rows),))[0],
            ctx.theta, ctx.settings.lje_step))
        return theta_star, ctx.curvature_at("lje_curvature", lambda rows: self.logits_star(theta_star, rows))

    @staticmethod
    def logits_star(theta_star, rows) -> torch.Tensor:
        """(b, C): the rows' logits at Theta*."""
        return (rows.phi.double() @ theta_star.T).to(rows.phi.dtype)

    def residuals_star(self, ctx, rows) -> torch.Tensor:
        """(b, C): the rows' residuals at Theta*."""
        return ops.residuals(self.logits_star(self.expansion(ctx)[0], rows), rows.labels)

    def operands(self, ctx, rows):
        return TrainOperands(self.residuals_star(ctx, rows), rows.phi, self.inv_norm(ctx, rows))

    def query(self, ctx, test):
        onehot, phi = _explained_onehot(ctx, test)
        theta_star, curvature_star = self.expansion(ctx)
        N = ctx.num_train
        logit = (phi.double() @ theta_star.T).gather(1, test.explained_labels().view(-1, 1)).view(-1)
        return Query(scaled(curvature_star.precondition(onehot, phi), -1.0 / N), (logit / N).to(phi.dtype))

    def self_influence(self, ctx, rows):
        theta_star, curvature_star = self.expansion(ctx)
        r_star, y, phi = self.residuals_star(ctx, rows), rows.labels, rows.phi
        onehot = torch.nn.functional.one_hot(y, ctx.num_classes).to(phi.dtype)
        # e_y^T H*^-1 (r*_i phi_i^T) phi_i by polarisation: both sides are rank 1 in phi_i.
        cross = (curvature_star.norms(onehot + r_star, phi)[1] - curvature_star.norms(onehot - r_star, phi)[1]) / 4
        logit = (phi.double() @ theta_star.T).gather(1, y.view(-1, 1)).view(-1)
        return (logit.to(phi.dtype) - cross) / ctx.num_train
