"""The influence family (Koh & Liang; Barshan et al. 2020): IF, theta-RelatIF,
l-RelatIF, grad-dot and grad-cos; scores are changes in the test loss."""
from __future__ import annotations

from ..curvature import gradient_sq_norms
from ..ops import Query, Rank1
from .base import Method, register, safe_reciprocal, test_residuals


@register
class InfluenceFunction(Method):
    """Koh & Liang: score = g_t^T H^-1 g_i."""
    name = "if"

    def query(self, ctx, test):
        return Query(ctx.curvature.precondition(*test_residuals(ctx, test)))

    def self_influence(self, ctx, rows):
        return ctx.curvature_quad_norms(rows) * self.inv_norm(ctx, rows)


@register
class ThetaRelatIF(InfluenceFunction):
    """Barshan et al.: IF / |H^-1 g_i|."""
    name = "theta_relatif"
    saved = {"inv_theta": ("N",)}

    def inv_norm(self, ctx, rows):
        return ctx.per_example("inv_theta", rows, lambda r: safe_reciprocal(ctx.curvature_norms(r)[0].sqrt()))


@register
class LRelatIF(InfluenceFunction):
    """Barshan et al.: IF / sqrt(g_i^T H^-1 g_i)."""
    name = "l_relatif"
    saved = {"inv_l": ("N",)}

    def inv_norm(self, ctx, rows):
        return ctx.per_example("inv_l", rows,
                                lambda r: safe_reciprocal(ctx.curvature_quad_norms(r).clamp_min(0).sqrt()))


@register
class GradDot(Method):
    """g_t^T g_i: influence with the identity for curvature."""
    name = "grad_dot"

    def query(self, ctx, test):
        return Query(Rank1(*test_residuals(ctx, test)))

    def self_influence(self, ctx, rows):
        return ctx.gradient_sq_norms(rows) * self.inv_norm(ctx, rows).square()


@register
class GradCos(GradDot):
    """g_t^T g_i / (|g_t| |g_i|)."""
    name = "grad_cos"
    saved = {"inv_grad": ("N",)}

    def inv_norm(self, ctx, rows):
        return ctx.per_example("inv_grad", rows, lambda r: safe_reciprocal(ctx.gradient_sq_norms(r).sqrt()))

    def query(self, ctx, test):
        r, phi = test_residuals(ctx, test)
        norms = gradient_sq_norms(r, phi).sqrt()
        return Query(Rank1(r * safe_reciprocal(norms).to(r.dtype).unsqueeze(1), phi))
